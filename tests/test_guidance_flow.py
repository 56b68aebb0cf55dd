"""The guided student through the flow: distill over a guidance range, export with a guidance component,
evaluate sweeping w (eval/guidance.parquet, eval/guidance.png)."""
import torch

from storage.layout import EXPORT, run_store
from tasks.stages import EXPORT_STAGE


def test_guided_digits_through_the_flow(prefect_api, tmp_path):
    from diffusers import DiffusionPipeline

    from flows.pipeline import dmd
    from storage.models import local_folder

    root = str(tmp_path)
    dmd(preset="digits-tiny", root=root, run_name="guided",
        overrides=["distill.guidance_range=[1,3]", "distill.guidance_law=log-uniform", "distill.lr=1e-2",
                   "distill.guidance_embedding_dim=16", "evaluate.guidance_sweep=[1,2.5]"])
    store = run_store(root, "guided")
    rows = store.read_table("eval/guidance.parquet").to_pylist()
    got = {(r["model"], r["guidance"], r["metric"]) for r in rows}
    for w in (1.0, 2.5):
        assert {("teacher", w, "fd"), ("teacher", w, "accuracy"), ("student", w, "fd"), ("student", w, "accuracy"),
                ("student", w, "fd_teacher")} <= got
    assert all(r["value"] == r["value"] for r in rows)  # no NaN
    assert store.read_bytes("eval/guidance.png")[:8] == b"\x89PNG\r\n\x1a\n"
    marker = store.read_json(EXPORT_STAGE.marker)
    assert marker["pipeline"] == "DMDPipeline" and marker["check_max_abs_diff"] <= 1e-5
    with local_folder(store, EXPORT) as path:
        pipe = DiffusionPipeline.from_pretrained(path, custom_pipeline=path, trust_remote_code=True)
        z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        low, high = (pipe(latents=z, class_labels=[0, 1, 2, 3], guidance_scale=w, output_type="pt").images
                     for w in (1.0, 3.0))
    assert (low - high).abs().max() > 1e-4  # the trained guidance input is used
    assert "guidance_scale=w" in store.read_bytes(f"{EXPORT}/README.md").decode()


def test_guided_text_student_sweeps_fid_and_clip(prefect_api, tmp_path):
    """sd-tiny over a guidance range, scored on the coco30k protocol fixture at two scales: FID and CLIP per w,
    the FID-against-CLIP plot, and a stock StableDiffusionPipeline export (checked at 3 scales by the stage)."""
    from flows.pipeline import dmd
    from tests.test_eval_coco import write_fixture

    captions, images = write_fixture(tmp_path / "coco")
    root = str(tmp_path / "artifacts")
    dmd(preset="sd-tiny", root=root, run_name="sdg",
        overrides=["distill.guidance_range=[1,4]", "distill.lr=1e-2", "distill.guidance_embedding_dim=32",
                   "evaluate.guidance_sweep=[1,4]", "evaluate.protocol=coco30k", "evaluate.n_samples=4",
                   "evaluate.batch_size=2", f"evaluate.captions={captions}", f"evaluate.reference_images={images}",
                   "evaluate.random_extractors=true"])
    store = run_store(root, "sdg")
    rows = store.read_table("eval/guidance.parquet").to_pylist()
    assert {(r["guidance"], r["metric"]) for r in rows} == {(1.0, "fid"), (1.0, "clip"), (4.0, "fid"), (4.0, "clip")}
    fid = {r["guidance"]: r["value"] for r in rows if r["metric"] == "fid"}
    assert fid[1.0] != fid[4.0]  # the student's samples depend on w
    assert store.read_bytes("eval/guidance.png")[:8] == b"\x89PNG\r\n\x1a\n"
    marker = store.read_json(EXPORT_STAGE.marker)
    assert marker["pipeline"] == "StableDiffusionPipeline" and marker["check_max_abs_diff"] <= 1e-5
