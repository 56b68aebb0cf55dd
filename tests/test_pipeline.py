"""The flow `dmd` end to end on the tiny preset, under one session-wide Prefect test server."""
import numpy as np
import pytest
import torch

from storage import read_manifest, verify_manifest
from storage.layout import (CONFIG, EXPORT, METRICS, PAIRS_MANIFEST, RESULTS, SUMMARY, checkpoint_steps,
                            run_store)


def snapshot(store):
    """Change tokens of every file of a run (size + etag/mtime/inode)."""
    return {k: (i["size"], i["token"]) for k in store.ls() for i in [store.info(k)]}


def test_full_pipeline_writes_every_artifact(tiny_run):
    root, run, out = tiny_run
    store = run_store(root, run)
    assert out["stages"] == ["teacher", "pairs", "distill", "export", "evaluate"]
    records = read_manifest(store, PAIRS_MANIFEST)
    indices = [i for r in records for i in range(r.first_index, r.last_index + 1)]
    assert sorted(indices) == list(range(96)) and len(records) == 3
    verify_manifest(store, records)
    assert checkpoint_steps(store) == [2, 4]
    metrics = store.read_table(METRICS).to_pylist()
    assert [r["step"] for r in metrics] == [0, 1, 2, 3] and all(np.isfinite(r["loss_G"]) for r in metrics)
    assert store.exists("distill/samples/step-00000004.png")
    assert store.read_json(CONFIG)["name"] == "digits-tiny"
    summary = store.read_json(SUMMARY)
    models = {(r["model"], r["steps"], r["metric"]) for r in summary["rows"]}
    assert {("real", 0, "fd"), ("teacher", 3, "fd"), ("teacher", 1, "fd"), ("student", 1, "fd"),
            ("student", 1, "accuracy")} <= models
    assert summary["checkpoint_step"] == 4
    # each row records the autocast its model generated under: evaluate.precision=auto is fp32 on the CPU
    assert {(r["model"], r["precision"]) for r in store.read_table(RESULTS).to_pylist()} == \
           {("real", None), ("teacher", "fp32"), ("student", "fp32")}


def test_export_loads_with_plain_diffusers(tiny_run, tmp_path):
    from diffusers import DiffusionPipeline

    from storage.models import local_folder

    root, run, _ = tiny_run
    store = run_store(root, run)
    assert store.exists(f"{EXPORT}/README.md") and "DMD generator" in store.read_bytes(f"{EXPORT}/README.md").decode()
    with local_folder(store, EXPORT) as path:
        pipe = DiffusionPipeline.from_pretrained(path, custom_pipeline=path, trust_remote_code=True,
                                                 low_cpu_mem_usage=False)
        out = pipe(batch_size=4, class_labels=[0, 1, 2, 3], generator=torch.Generator().manual_seed(0),
                   output_type="np").images
    assert type(pipe).__name__ == "DMDPipeline"
    assert out.shape == (4, 8, 8, 1) and out.min() >= 0 and out.max() <= 1


def test_rerun_rewrites_nothing(tiny_run):
    from flows.pipeline import dmd

    root, run, _ = tiny_run
    store = run_store(root, run)
    before = snapshot(store)
    out = dmd(preset="digits-tiny", root=root, run_name=run)
    assert out["teacher"] == "cached" and out["pairs_shards_written"] == 0
    assert snapshot(store) == before


def test_nightly_evaluates_new_checkpoints_once(prefect_api, tmp_path):
    from flows.pipeline import dmd

    root = str(tmp_path)
    dmd(preset="digits-tiny", root=root, run_name="n", stages=["teacher", "pairs", "distill"])
    store = run_store(root, "n")
    nightly = dict(preset="digits-tiny", root=root, run_name="n", stages=["evaluate"], evaluate_all_checkpoints=True)

    def student_rows():
        rows = store.read_table(RESULTS).to_pylist()
        keys = [(r["checkpoint_step"], r["model"], r["steps"], r["metric"]) for r in rows]
        assert len(keys) == len(set(keys)), "duplicate result rows"
        return sorted({r["checkpoint_step"] for r in rows if r["model"] == "student"}), len(rows)

    dmd(**nightly)
    steps, n_rows = student_rows()
    assert steps == [2, 4]
    dmd(**nightly)
    assert student_rows() == (steps, n_rows)
    # Train longer (resumes from step 4), then the nightly run adds only the new checkpoint.
    dmd(preset="digits-tiny", root=root, run_name="n", stages=["distill"], overrides=["distill.steps=6"])
    dmd(**{**nightly, "overrides": ["distill.steps=6"]})
    steps, n_rows_after = student_rows()
    assert steps == [2, 4, 6] and n_rows_after == n_rows + 2


def test_pipeline_on_s3(prefect_api, s3_endpoint, monkeypatch):
    """Teacher and pairs stages on a real (moto) S3 endpoint: shards stream back and verify."""
    import uuid

    from flows.pipeline import dmd

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    root = f"s3://dmd-test/{uuid.uuid4().hex}"
    dmd(preset="digits-tiny", root=root, run_name="s3", stages=["teacher", "pairs"],
        overrides=["pairs.n=40", "pairs.shard_size=16"])
    store = run_store(root, "s3")
    records = read_manifest(store, PAIRS_MANIFEST)
    assert [r.n_samples for r in records] == [16, 16, 8]
    verify_manifest(store, records)
    pairs = all_pairs(store)
    assert pairs["z"].shape == (40, 1, 8, 8) and pairs["cond"].tolist() == [i % 10 for i in range(40)]


def test_pair_noise_is_a_function_of_seed_and_index(tiny_run):
    from tasks.context import sample_noise

    root, run, _ = tiny_run
    pairs = all_pairs(run_store(root, run))
    for i in (0, 37, 95):
        assert torch.equal(pairs["z"][i], sample_noise(0, i, (1, 8, 8)))


def all_pairs(store) -> dict:
    """Every pair of a run read straight from its shards, ordered by index: {z, y, cond}."""
    import numpy as np

    from storage import iter_shards

    records = read_manifest(store, PAIRS_MANIFEST)
    samples = sorted(iter_shards([store.url(r.shard) for r in records], store.storage_options, nodesplitter=None),
                     key=lambda s: s["index"])
    return {"z": torch.from_numpy(np.stack([s["noise.npy"] for s in samples])),
            "y": torch.from_numpy(np.stack([s["image.npy"] for s in samples])),
            "cond": torch.tensor([s["json"]["class"] for s in samples])}
