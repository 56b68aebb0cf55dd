"""Stage `export`: the final (EMA) generator as a folder plain diffusers loads, with a model card."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from prefect import task
from prefect.cache_policies import NONE

import dmd_core.pipeline as pipeline_module
from dmd_core.denoisers import UNetDenoiser
from dmd_core.generator import Generator
from dmd_core.pipeline import DMDPipeline
from dmd_core.schedules import VPSchedule
from storage.layout import EXPORT, METRICS
from storage.models import local_folder, save_folder
from tasks.context import is_done, load_teacher, mark_done, open_run, unmark_done
from tasks.distill import checkpoint_weights, config_checkpoints, distill_key


def model_card(cfg, step: int, final_metrics: dict) -> str:
    """README.md of the export: how to load it, what it was distilled from, the config and metrics."""
    d = cfg.distill
    lines = [
        "---", "library_name: diffusers", "tags: [dmd, distribution-matching-distillation, one-step]", "---",
        f"# {cfg.name}: {len(d.generator_timesteps)}-step DMD generator", "",
        f"Distilled with Distribution Matching Distillation for {step} steps from the teacher in `teacher/` of "
        f"the run, conditioned at timesteps {d.generator_timesteps}.", "",
        "```python", "from diffusers import DiffusionPipeline",
        'pipe = DiffusionPipeline.from_pretrained("PATH", custom_pipeline="PATH", trust_remote_code=True)',
        "images = pipe(batch_size=16, class_labels=list(range(10)) + [0] * 6).images", "```", "",
        "## Configuration", "", "```json",
        json.dumps(cfg.model_dump(mode="json"), indent=2, sort_keys=True), "```", "",
        "## Final training metrics", "", "| metric | value |", "|---|---|",
        *[f"| {k} | {v:.6g} |" for k, v in sorted(final_metrics.items()) if v == v], "",
        "Evaluation results are in `eval/summary.json` of the run.", "",
    ]
    return "\n".join(lines)


def _unet_from_checkpoint(store, cfg, step: int):
    _, unet, scheduler = load_teacher(store, cfg, torch.device("cpu"))
    unet.load_state_dict({k.removeprefix("unet."): v for k, v in checkpoint_weights(store, cfg, step).items()})
    return unet, scheduler


def run_export(root: str, run_name: str, force: bool = False) -> str:
    """Write export/ (model_index.json, unet/, scheduler/, pipeline.py, README.md) and verify it reloads."""
    store, cfg = open_run(root, run_name)
    key = cfg.section_hash("data", "teacher", "pairs", "distill", "export")
    if not force and is_done(store, "export", key):
        return store.url(EXPORT)
    unmark_done(store, "export")
    steps = config_checkpoints(store, cfg)
    if not steps or steps[-1] != cfg.distill.steps or not is_done(store, "distill", distill_key(cfg)):
        raise FileNotFoundError(f"no final checkpoint (step {cfg.distill.steps}) in {store.url('distill')}: "
                                "run the distill stage first")
    unet, scheduler = _unet_from_checkpoint(store, cfg, steps[-1])
    pipe = DMDPipeline(unet, scheduler, cfg.distill.generator_timesteps, cfg.teacher.prediction_type)
    rows = store.read_table(METRICS).to_pylist() if store.exists(METRICS) else []
    card = model_card(cfg, steps[-1], {k: v for k, v in (rows[-1] if rows else {}).items() if k != "step"})

    def write(tmp: str) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)
        Path(tmp, "README.md").write_text(card)
        Path(tmp, "pipeline.py").write_text(Path(pipeline_module.__file__).read_text())

    save_folder(store, EXPORT, write)
    check_export(store, cfg, unet, scheduler)
    mark_done(store, "export", key, step=steps[-1])
    return store.url(EXPORT)


@torch.no_grad()
def check_export(store, cfg, unet, scheduler, n: int = 16) -> float:
    """The reloaded export must reproduce the trainer's generator on fixed noise (max abs diff <= atol)."""
    z = torch.randn((n, cfg.data.channels, cfg.data.image_size, cfg.data.image_size),
                    generator=torch.Generator().manual_seed(0))
    cond = torch.arange(n) % cfg.data.num_classes if cfg.data.num_classes else None
    schedule = VPSchedule.from_scheduler(scheduler)
    G = Generator(UNetDenoiser(unet.eval(), schedule, cfg.teacher.prediction_type), schedule,
                  cfg.distill.generator_timesteps)
    expected = G(z, cond, generator=torch.Generator().manual_seed(1))
    with local_folder(store, EXPORT) as path:
        loaded = DMDPipeline.from_pretrained(path, low_cpu_mem_usage=False)
        got = loaded(latents=z, class_labels=cond, generator=torch.Generator().manual_seed(1),
                     output_type="latent").images
    err = float((got - expected).abs().max())
    if not err <= cfg.export.check_atol:
        raise RuntimeError(f"export check failed: reloaded pipeline differs from the generator by {err:.3g} "
                           f"(> export.check_atol={cfg.export.check_atol})")
    return err


@task(name="export", cache_policy=NONE, persist_result=False)
def export_task(root: str, run_name: str, force: bool = False) -> str:
    """Prefect wrapper of run_export."""
    return run_export(root, run_name, force)
