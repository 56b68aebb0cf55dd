"""The coco30k protocol end to end through the flow with the tiny SD teacher on a COCO-format fixture:
deterministic captions, reference statistics computed once, FID and CLIP rows, comparison grid, report."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from storage.layout import RESULTS, root_store, run_store

IMAGES = [(42, "COCO_val2014_000000000042.jpg", (40, 30)), (73, "COCO_val2014_000000000073.png", (24, 36)),
          (74, "COCO_val2014_000000000074.png", (32, 32)), (133, "COCO_val2014_000000000133.jpg", (48, 20)),
          (139, "COCO_val2014_000000000139.png", (30, 30))]


def write_fixture(folder):
    """A captions json with the real captions_val2014.json schema and its images."""
    (folder / "val2014").mkdir(parents=True)
    (folder / "annotations").mkdir()
    rng = np.random.default_rng(0)
    annotations = []
    for k, (image_id, name, (w, h)) in enumerate(IMAGES):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / "val2014" / name)
        for j in range(2):
            annotations.append({"image_id": image_id, "id": 1000 + 2 * k + j,
                                "caption": f"a photo of thing {k} seen from side {j} "})
    data = {"info": {"description": "fixture"}, "licenses": [],
            "images": [{"id": i, "file_name": n, "width": w, "height": h} for i, n, (w, h) in IMAGES],
            "annotations": annotations}
    (folder / "annotations" / "captions_val2014.json").write_text(json.dumps(data))
    return str(folder / "annotations" / "captions_val2014.json"), str(folder / "val2014")


@pytest.mark.slow
def test_coco30k_protocol_through_the_flow(prefect_api, tmp_path):
    from flows.pipeline import dmd

    captions, images = write_fixture(tmp_path / "coco")
    root = str(tmp_path / "artifacts")
    overrides = ["evaluate.protocol=coco30k", "evaluate.n_samples=4", "evaluate.batch_size=2",
                 f"evaluate.captions={captions}", f"evaluate.reference_images={images}",
                 "evaluate.random_extractors=true", "evaluate.clip_prefix=A photo depicts "]
    out = dmd(preset="sd-tiny", root=root, run_name="coco", overrides=overrides)
    store = run_store(root, "coco")
    rows = store.read_table(RESULTS).to_pylist()
    metrics = {(r["model"], r["steps"], r["metric"]) for r in rows}
    assert {("teacher", 3, "fid"), ("teacher", 1, "fid"), ("student", 1, "fid"),
            ("teacher", 3, "clip"), ("student", 1, "clip")} <= metrics
    assert all(np.isfinite(r["value"]) and r["n_samples"] == 4 for r in rows)
    assert all(-1 <= r["value"] <= 1 for r in rows if r["metric"] == "clip")
    listing = root_store(root).ls("_reference")
    cache = [k for k in listing if "coco30k" in k]  # the reference statistics
    assert len(cache) == 1
    # the two teacher baselines (teacher 3-step, teacher at the generator's step), each scores + preview images
    assert len([k for k in listing if k.startswith("_reference/teacher-")]) == 4
    # the captions' CLIP text features, once per protocol
    text_cache = [k for k in listing if k.startswith("_reference/clip-text-")]
    assert len(text_cache) == 1
    assert not any(r["cached"] for r in rows)
    assert out["evaluate"]["compare"] and store.exists("eval/compare.png") and store.exists("eval/trend.png")

    # A second run (another run name, same root and protocol) reads the cached reference statistics.
    before = root_store(root).info(cache[0])
    from tasks import eval_protocols

    calls, teacher_images = [], []
    original = eval_protocols.reference_stats
    samplers = eval_protocols.Models.teacher_steps, eval_protocols.Models.teacher_generator

    def counted(make):  # a teacher sampler that counts the images it generates
        def wrapped(self):
            sample = make(self)
            return lambda z, raw: teacher_images.append(z.shape[0]) or sample(z, raw)
        return wrapped

    eval_protocols.reference_stats = lambda *a, **k: calls.append(1) or original(*a, **k)
    from dmd_core import evaluation

    text_calls, text_original = [], evaluation.text_features
    evaluation.text_features = lambda *a, **k: text_calls.append(1) or text_original(*a, **k)
    eval_protocols.Models.teacher_steps, eval_protocols.Models.teacher_generator = map(counted, samplers)
    try:
        out2 = dmd(preset="sd-tiny", root=root, run_name="coco2", overrides=overrides,
                   stages=["teacher", "pairs", "distill", "export", "evaluate"])
    finally:
        eval_protocols.reference_stats = original
        evaluation.text_features = text_original
        eval_protocols.Models.teacher_steps, eval_protocols.Models.teacher_generator = samplers
    assert calls == [] and root_store(root).info(cache[0]) == before
    assert text_calls == [] and text_cache[0] in root_store(root).ls("_reference")
    rows2 = run_store(root, "coco2").read_table(RESULTS).to_pylist()
    # The teacher baselines come from the root's cache: no teacher image generated, the values repeat exactly,
    # and the rows, the summary and its table say so.
    assert teacher_images == []
    first = {(r["model"], r["steps"], r["metric"]): r["value"] for r in rows if r["model"] == "teacher"}
    second = {(r["model"], r["steps"], r["metric"]): r["value"] for r in rows2 if r["model"] == "teacher"}
    assert first == second and len(second) == 4
    assert all(r["cached"] == (r["model"] == "teacher") for r in rows2)
    from tasks.evaluate import summary_markdown

    table = summary_markdown(out2["evaluate"])
    assert "| teacher 3-step (cached) |" in table and "| DMD 1-step |" in table

    # Without the Inception file the stage fails with one line naming it, and writes nothing.
    from tasks.evaluate import run_evaluate

    store2 = run_store(root, "coco2")
    cfg = store2.read_json("config.json")
    cfg["evaluate"].update(random_extractors=False, inception_weights=str(tmp_path / "nowhere" / "inception-2015-12-05.pt"),
                           seed=99)
    store2.write_json("config.json", cfg)
    before = {k: store2.sha256(k) for k in store2.ls("eval")}
    with pytest.raises(FileNotFoundError) as err:
        run_evaluate(root, "coco2")
    assert str(tmp_path / "nowhere") in str(err.value) and "\n" not in str(err.value)
    assert {k: store2.sha256(k) for k in store2.ls("eval")} == before
    assert not (tmp_path / "nowhere").exists()

    # The fast path's wiring (on CUDA in production; here eager on the CPU): the student's network in bf16,
    # batches of one shape (n = 4 in batches of 3: the last one padded), crops and resizes on the tensors' device.
    from functools import partial

    from dmd_core import inference
    from tasks import eval_protocols, evaluate

    cfg = store.read_json("config.json")
    cfg["evaluate"].update(precision="bf16", batch_size=3)
    store.write_json("config.json", cfg)
    made, halves = [], []
    fast_path, fast_generation = eval_protocols.fast_path, eval_protocols.fast_generation
    half_text_encoders = eval_protocols.half_text_encoders
    eval_protocols.fast_path = evaluate.fast_path = lambda *a: True  # the stage then loads its own teacher copy
    eval_protocols.fast_generation = lambda G, *a: made.append(G) or partial(inference.fast_generation, mode="none")(G, *a)
    eval_protocols.half_text_encoders = lambda *a: halves.append(half_text_encoders(*a)) or halves[-1]
    try:
        run_evaluate(root, "coco")
    finally:
        eval_protocols.fast_path, eval_protocols.fast_generation, evaluate.fast_path = fast_path, fast_generation, fast_path
        eval_protocols.half_text_encoders = half_text_encoders
    # the student's captions through bf16 copies of the text encoders; the teacher's own stay in fp32
    assert len(halves) == 1 and halves[0].encoders
    for name, encoder in halves[0].encoders.items():
        assert {p.dtype for p in encoder.parameters()} == {torch.bfloat16}, name
    fast_rows = [r for r in store.read_table(RESULTS).to_pylist() if r["precision"] == "bf16"]
    assert len(made) == 1 and {(r["model"], r["metric"]) for r in fast_rows} >= {("student", "fid"), ("student", "clip")}
    assert all(np.isfinite(r["value"]) and r["n_samples"] == 4 for r in fast_rows)
