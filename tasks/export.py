"""Stage `export`: the final (EMA) generator as a folder stock diffusers loads, with a model card.

The teacher's family builds the pipeline (`TeacherFamily.export`): StableDiffusionPipeline, StableDiffusionXLPipeline,
DDIMPipeline for unconditional one-step pixel students, or the shipped `DMDPipeline` (pipeline.py) where no stock
pipeline fits; the stage saves it, checks it reloads and reproduces the generator, and writes the model card.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from prefect import task
from prefect.cache_policies import NONE

import dmd_core.guidance_embedding as guidance_module
import dmd_core.pipeline as pipeline_module
from dmd_core.exports import save_lora
from dmd_core.families import family
from dmd_core.generator import Generator
from dmd_core.guidance import shown_scale, student_at, student_denoiser
from storage.checkpoints import checkpoint_weights, list_checkpoints
from storage.layout import EXPORT, LEGACY_EXPORT_MARKER, METRICS
from storage.models import local_folder, save_folder
from tasks.context import open_run, prompts, run_teacher
from tasks.stages import DISTILL_STAGE, EXPORT_STAGE, resume_key

LORA_USAGE = [
    "", "# or as a LoRA over the teacher (e.g. your own fine-tune of it): pytorch_lora_weights.safetensors",
    "from diffusers import {scheduler}",
    'pipe = {pipeline}.from_pretrained("<teacher folder>")',
    'pipe.scheduler = {scheduler}.from_pretrained("<this folder>", subfolder="scheduler")',
    'pipe.load_lora_weights("<this folder>")',
    "pipe.fuse_lora(lora_scale=1.0)  # lora_scale < 1 blends the student with the teacher",
]
GUIDED_USAGE = ['# one student for every guidance scale in {range}: pass guidance_scale=w (one network call, no CFG)']


def model_card(cfg, step: int, final_metrics: dict, pipeline: str, embedded: bool = False,
               lora_scheduler: Optional[str] = None) -> str:
    """README.md of the export: how to load it, what it was distilled from, the config and metrics."""
    d = cfg.distill
    n, w = len(d.generator_timesteps), export_scales(d, embedded)[0]
    usage = family(cfg.teacher.kind).usage(pipeline) + (GUIDED_USAGE if d.guidance_range else [])
    if lora_scheduler:
        usage += [line.replace("{pipeline}", pipeline).replace("{scheduler}", lora_scheduler) for line in LORA_USAGE]
    lines = [
        "---", "library_name: diffusers", "tags: [dmd, distribution-matching-distillation, one-step]", "---",
        f"# {cfg.name}: {n}-step DMD generator", "",
        f"Distilled with Distribution Matching Distillation for {step} steps from a `{cfg.teacher.kind}` teacher, "
        f"conditioned at timesteps {d.generator_timesteps}. Loads in stock diffusers as `{pipeline}`:", "",
        "```python", *[line.format(n=n, w=w, range=list(d.guidance_range or [])) for line in usage], "```", "",
        "## Configuration", "", "```json",
        json.dumps(cfg.model_dump(mode="json"), indent=2, sort_keys=True), "```", "",
        "## Final training metrics", "", "| metric | value |", "|---|---|",
        *[f"| {k} | {v:.6g} |" for k, v in sorted(final_metrics.items()) if v == v], "",
        EVALUATION_HEADING, "", "Not evaluated yet: the `evaluate` stage adds its table here.", "",
    ]
    return "\n".join(lines)


EVALUATION_HEADING = "## Evaluation"


def card_with_evaluation(card: str, table: str, step: int) -> str:
    """The model card with its evaluation section replaced by `table` (the evaluate stage's results)."""
    head = card.split(EVALUATION_HEADING, 1)[0].rstrip("\n")
    return f"{head}\n\n{EVALUATION_HEADING}\n\nMeasured by the `evaluate` stage on checkpoint step {step}:\n\n" \
           f"{table.strip()}\n"


def add_evaluation(store, table: str, step: int) -> bool:
    """Put the evaluation table into export/README.md when the export holds checkpoint `step`; True if rewritten."""
    if not store.exists(EXPORT_STAGE.marker) or store.read_json(EXPORT_STAGE.marker).get("step") != step:
        return False
    key = f"{EXPORT}/README.md"
    card = store.read_bytes(key).decode()
    updated = card_with_evaluation(card, table, step)
    if updated == card:
        return False
    store.write_bytes(key, updated.encode())
    return True


def student_pipeline(teacher, net, cfg):
    """The export pipeline the teacher's family builds: stock where one fits the student exactly, else DMDPipeline."""
    guided = {"guidance_scale": shown_scale(cfg.distill)} if cfg.distill.guidance_range else None
    return teacher.family.export(teacher, net, cfg.distill.generator_timesteps, guided)


def run_export(root: str, run_name: str, force: bool = False) -> str:
    """Write export/ (model_index.json, component folders, README.md) and verify it reproduces the generator."""
    store, cfg = open_run(root, run_name)
    if not force and EXPORT_STAGE.is_done(store, cfg):
        return store.url(EXPORT)
    EXPORT_STAGE.unmark(store)
    steps = list_checkpoints(store, key := resume_key(store, cfg))
    if not steps or steps[-1] != cfg.distill.steps or not DISTILL_STAGE.is_done(store, cfg):
        raise FileNotFoundError(f"no final checkpoint (step {cfg.distill.steps}) in {store.url('distill')}: "
                                "run the distill stage first")
    teacher = run_teacher(store, cfg, torch.device("cpu"))
    weights = checkpoint_weights(store, steps[-1], key, cfg.export.use_ema)
    D = student_denoiser(teacher, weights, cfg.distill)
    pipe = student_pipeline(teacher, D.net, cfg)
    kind = type(pipe).__name__
    # A guided LoRA student also adapts a guidance projection the teacher's network lacks: merged export only.
    lora = (bool(cfg.distill.lora_rank) and cfg.distill.guidance_range is None
            and hasattr(type(pipe), "save_lora_weights"))
    scales = export_scales(cfg.distill, teacher.embedded_guidance)
    rows = store.read_table(METRICS).to_pylist() if store.exists(METRICS) else []
    final = {k: v for k, v in (rows[-1] if rows else {}).items() if k not in ("step", "seconds")}  # seconds vary
    card = model_card(cfg, steps[-1], final, kind, teacher.embedded_guidance,
                      type(pipe.scheduler).__name__ if lora else None)

    def write(tmp: str) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)
        drop_load_paths(Path(tmp))
        Path(tmp, "README.md").write_text(card)
        Path(tmp, "dmd.json").write_text(json.dumps({  # how to call the stock pipeline for this student
            "pipeline": kind, "generator_timesteps": cfg.distill.generator_timesteps,
            "num_inference_steps": len(cfg.distill.generator_timesteps), "guidance_scale": scales[0],
            "guidance_range": cfg.distill.guidance_range}, indent=2))
        if lora:
            save_lora(pipe, D.net, tmp, weights, cfg.distill.lora_rank, cfg.distill.lora_alpha)
        if kind == "DMDPipeline":
            Path(tmp, "pipeline.py").write_text(Path(pipeline_module.__file__).read_text())
            if getattr(pipe, "guidance", None) is not None:
                ship_guidance_component(tmp)

    store.delete(LEGACY_EXPORT_MARKER, missing_ok=True)  # markers now sit beside the folder
    save_folder(store, EXPORT, write)
    err = check_export(store, cfg, teacher, D, kind)
    EXPORT_STAGE.mark(store, cfg, step=steps[-1], pipeline=kind, check_max_abs_diff=err)
    return store.url(EXPORT)


def export_scales(d, embedded: bool = False) -> list[float]:
    """The guidance scales the export is checked at: the shown one and both ends of a guided student's range; a
    student of an embedded-guidance teacher (FLUX.1-dev) takes its w as an input: distill.guidance."""
    if d.guidance_range is None:
        return [d.guidance if embedded else 1.0]
    return [shown_scale(d), *d.guidance_range]


def ship_guidance_component(folder: str) -> None:
    """guidance/ as a custom component stock diffusers loads (trust_remote_code): its module file beside its weights."""
    Path(folder, "guidance", "guidance_embedding.py").write_text(Path(guidance_module.__file__).read_text())
    index = Path(folder, "model_index.json")
    config = json.loads(index.read_text())
    config["guidance"] = ["guidance_embedding", "GuidanceEmbedding"]
    index.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def drop_load_paths(folder: Path) -> None:
    """Remove `_name_or_path` (where a component was loaded from, a temporary path) from every config.json,
    so identical checkpoints give byte-identical exports."""
    for path in sorted(folder.rglob("config.json")):
        config = json.loads(path.read_text())
        if isinstance(config, dict) and config.pop("_name_or_path", None) is not None:
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@torch.no_grad()
def check_export(store, cfg, teacher, student, kind: str, n: int = 4) -> float:
    """The reloaded export must reproduce the trainer's generator (+ decode) on fixed noise within check_atol,
    at every scale of `export_scales`."""
    return max(check_export_at(store, cfg, teacher, student, kind, w, n)
               for w in export_scales(cfg.distill, teacher.embedded_guidance))


@torch.no_grad()
def check_export_at(store, cfg, teacher, student, kind: str, w: float, n: int = 4) -> float:
    """check_export at one guidance scale w (passed as guidance_scale; 1.0 for a fixed-guidance student)."""
    G = student_at(Generator(student, teacher.process, cfg.distill.generator_timesteps), cfg.distill, w)
    z = torch.randn((n, *teacher.sample_shape), generator=torch.Generator().manual_seed(0))
    raw = None
    if teacher.conditioning == "text":
        texts = prompts(cfg)
        raw = [texts[i % len(texts)] for i in range(n)]
    elif teacher.num_classes:
        raw = torch.arange(n) % teacher.num_classes
    cond = teacher.encode_guided(raw, w) if teacher.embedded_guidance else teacher.encode(raw)
    x0 = G(z, cond, generator=torch.Generator().manual_seed(1))
    expected = (teacher.decode(x0) / 2 + 0.5).clamp(0, 1)
    steps = len(cfg.distill.generator_timesteps)
    with local_folder(store, EXPORT) as path:
        got = teacher.family.run_export(kind, path, z, raw, steps, w, seed=1,
                                        guided=cfg.distill.guidance_range is not None)
    err = float((got.float() - expected.float()).abs().max())
    if not err <= cfg.export.check_atol:
        raise RuntimeError(f"export check failed: reloaded {kind} at guidance_scale={w:g} differs from the "
                           f"generator by {err:.3g} "
                           f"(> export.check_atol={cfg.export.check_atol})")
    return err


@task(name="export", cache_policy=NONE, persist_result=False)
def export_task(root: str, run_name: str, force: bool = False) -> str:
    """Prefect wrapper of run_export."""
    return run_export(root, run_name, force)
