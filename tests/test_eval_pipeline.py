"""`dmd eval FOLDER`: a stock pipeline folder scored at a protocol by path gives the rows the evaluate stage gives
for the same model on the same noise (the sd-tiny and pixel-tiny exports), and bad input fails in one line."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from storage.layout import RESULTS, run_store
from tests.test_cli import dmd as dmd_cli
from tests.test_eval_coco import write_fixture


def local(root: str, run: str, key: str) -> Path:
    return Path(run_store(root, run).url(key).removeprefix("file://"))


def eval_args(root: str, run: str, args: list[str]) -> list[str]:
    """`dmd eval` of the run's export at its steps and guidance, into the run name `published`."""
    export = local(root, run, "export")
    info = json.loads((export / "dmd.json").read_text())
    guidance = ["--guidance", str(info["guidance_scale"])] if "guidance_scale" in info else []
    return ["eval", str(export), "--root", root, "--name", "published", "--device", "cpu",
            "--steps", str(info.get("num_inference_steps", 1)), *guidance, *args]


def student_and_pipeline_rows(root: str, run: str, args: list[str]) -> tuple[dict, list[dict]]:
    """The run's student rows and the rows `dmd eval` writes for its export (run as a user runs it)."""
    student = {r["metric"]: r["value"] for r in run_store(root, run).read_table(RESULTS).to_pylist()
               if r["model"] == "student"}
    out = dmd_cli(*eval_args(root, run, args))
    assert out.returncode == 0, out.stderr
    rows = run_store(root, "published").read_table(RESULTS).to_pylist()
    assert "published | pipeline 1-step | fid = " in out.stdout
    return student, rows


@pytest.mark.slow
def test_sd_tiny_export_scored_by_path_equals_the_evaluate_stage(prefect_api, tmp_path):
    from flows.pipeline import dmd

    captions, images = write_fixture(tmp_path / "coco")
    root = str(tmp_path / "artifacts")
    settings = ["n_samples=4", "batch_size=2", f"captions={captions}", f"reference_images={images}",
                "random_extractors=true", "clip_prefix=A photo depicts "]
    dmd(preset="sd-tiny", root=root, run_name="sd", overrides=["evaluate.protocol=coco30k"] +
        [f"evaluate.{s}" for s in settings])
    args = ["--protocol", "coco30k"] + [a for s in settings for a in ("--set", f"evaluate.{s}")]
    student, rows = student_and_pipeline_rows(root, "sd", args)
    got = {r["metric"]: r["value"] for r in rows}
    assert got.keys() == {"fid", "clip"} and all(r["model"] == "pipeline" and r["n_samples"] == 4 for r in rows)
    assert abs(got["fid"] - student["fid"]) <= 1e-3 * max(1.0, student["fid"]), (got, student)
    assert abs(got["clip"] - student["clip"]) <= 1e-4, (got, student)

    # the same folder and settings again: no new row
    again = dmd_cli(*eval_args(root, "sd", args))
    assert again.returncode == 0, again.stderr
    assert len(run_store(root, "published").read_table(RESULTS).to_pylist()) == 2

    # bad input: one line naming what is wrong, exit 2, nothing written
    before = run_store(root, "published").sha256(RESULTS)
    for bad, says in (([str(tmp_path), "--protocol", "coco30k"], "model_index.json"),
                      ([str(local(root, "sd", "export")), "--protocol", "coco5"], "--protocol"),
                      ([str(local(root, "sd", "export")), "--protocol", "coco30k", "--set", "evaluate.batch_size=0"],
                       "evaluate.batch_size"),
                      ([str(local(root, "sd", "export")), "--protocol", "coco30k", "--set", "evaluate.nope=1"],
                       "evaluate.nope")):
        out = dmd_cli("eval", *bad, "--root", root, "--name", "published", "--device", "cpu")
        assert out.returncode == 2 and says in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert run_store(root, "published").sha256(RESULTS) == before


@pytest.mark.slow
def test_pixel_tiny_export_scored_by_path_equals_the_evaluate_stage(prefect_api, tmp_path):
    from flows.pipeline import dmd

    folder = tmp_path / "train"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    root = str(tmp_path / "artifacts")
    settings = ["n_samples=16", "batch_size=16", f"reference_images={folder}", "random_extractors=true"]
    dmd(preset="pixel-tiny", root=root, run_name="px", overrides=["evaluate.protocol=cifar10-50k"] +
        [f"evaluate.{s}" for s in settings])
    assert json.loads((local(root, "px", "export") / "model_index.json").read_text())["_class_name"] == "DDIMPipeline"
    student, rows = student_and_pipeline_rows(
        root, "px", ["--protocol", "cifar10-50k"] + [a for s in settings for a in ("--set", f"evaluate.{s}")])
    got = {r["metric"]: r["value"] for r in rows}
    assert got.keys() == {"fid"} == student.keys()
    assert abs(got["fid"] - student["fid"]) <= 1e-3 * max(1.0, student["fid"]), (got, student)
