"""`dmd eval`: score any stock diffusers pipeline folder (an export, or a published one-step model kept locally) at
an evaluation protocol, on the noise and conditions the evaluate stage uses, into `<root>/<name>/eval/results.parquet`
beside the runs' tables.

The pipeline is called as a user would call it: its own class, `steps` steps, guidance_scale `w`, with the
protocol's noise as its latents (seed evaluate.seed, drawn on the CPU for all n samples at the model's noise shape).
A folder scored again with the same key (its content, the protocol, steps, w and the scoring settings) adds no row.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch

from dmd_core import accel
from dmd_core.config import EvaluateConfig, stable_hash
from dmd_core.evaluation import ImageScores, generate_images
from dmd_core.protocols import get_protocol
from storage.layout import RESULTS, run_store
from tasks.eval_protocols import COLUMNS, protocol_inputs, rows

MODEL = "pipeline"  # the `model` of its rows (runs' rows say real, teacher or student)


@dataclass(frozen=True)
class PipelineModel:
    """What the protocol needs to know of a pipeline: its conditioning, classes and the shape of one noise sample."""

    conditioning: str
    num_classes: int
    sample_shape: tuple[int, ...]


def pipeline_class(path: Path) -> str:
    """The pipeline class a folder's model_index.json names; ValueError naming the file otherwise."""
    index = path / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{index} not found (not a diffusers pipeline folder)")
    try:
        return json.loads(index.read_text())["_class_name"]
    except (ValueError, KeyError) as err:
        raise ValueError(f"{index}: no pipeline class in it ({type(err).__name__}: {err})") from None


def folder_hash(path: Path) -> str:
    """Content hash of a folder: sha256 of every file, by relative path (hidden files skipped)."""
    digests = {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
               for p in sorted(path.rglob("*")) if p.is_file()
               and not any(part.startswith(".") for part in p.relative_to(path).parts)}
    return stable_hash(digests)


def run_eval_pipeline(path: str, root: str, name: str, protocol: str, steps: int, guidance: Optional[float],
                      evaluate: EvaluateConfig, device: torch.device) -> list[dict]:
    """Score the pipeline folder at `path`; append its rows to `<root>/<name>/eval/results.parquet` (no duplicate
    key) and return them (the existing ones when this key was scored before)."""
    from dmd_core.families import family_of_pipeline

    folder, spec = Path(path), get_protocol(protocol)
    kind = pipeline_class(folder)
    fam = family_of_pipeline(kind)
    if fam is None:
        raise ValueError(f"{folder / 'model_index.json'}: no family evaluates the pipeline class {kind!r}")
    if spec.text and fam.conditioning != "text":
        raise ValueError(f"--protocol {protocol} scores text-to-image pipelines; {kind} takes no prompts")
    precision = accel.resolve_precision(evaluate.precision, device)
    key = stable_hash([folder_hash(folder), kind, protocol, steps, guidance, precision,
                       evaluate.model_dump(mode="json", exclude={"guidance_sweep", "world_size", "teacher_steps"})])
    store = run_store(root, name)
    existing = store.read_table(RESULTS).to_pylist() if store.exists(RESULTS) else []
    mine = [r for r in existing if r["run"] == name and r["config_hash"] == key and r["model"] == MODEL]
    if mine:
        return mine
    pipe = fam.load_export(kind, str(folder)).to(device)
    pipe.set_progress_bar_config(disable=True)
    classes, shape = fam.pipeline_inputs(pipe, kind)
    model = PipelineModel(fam.conditioning if fam.conditioning == "text" else "class" if classes else "none",
                          classes, shape)
    inputs = protocol_inputs(root, SimpleNamespace(evaluate=evaluate), model, spec, device)
    renoise = torch.Generator().manual_seed(1)  # several-step pipelines re-noise from it, batch after batch

    def sample(z: torch.Tensor, raw) -> torch.Tensor:
        with torch.no_grad(), accel.autocast(precision, device):
            return fam.call_pipeline(pipe, kind, z, raw, steps, guidance, renoise).float().clamp(0, 1)

    scores = ImageScores(inputs.inception, evaluate.fid_mode, device, inputs.clip)
    for images, cond in generate_images(sample, inputs.z, inputs.raw, evaluate.batch_size, spec.resolution):
        scores.update(images, cond)
    new = rows(name, key, -1, MODEL, steps, scores.result(*inputs.ref), inputs.n, precision)
    table = existing + new
    store.write_table(RESULTS, {c: [r.get(c) for r in table] for c in COLUMNS})
    return new

