"""Stage `evaluate`: Fréchet distance and class accuracy of student, teacher baselines and the real floor."""
from __future__ import annotations

import datetime as dt
from typing import Callable

import torch
from prefect import task
from prefect.cache_policies import NONE

from dmd_core.checkpoint import bytes_to_tensors, tensors_to_bytes
from dmd_core.config import stable_hash
from dmd_core.datasets import real_dataset
from dmd_core.denoisers import UNetDenoiser, with_guidance
from dmd_core.generator import Generator
from dmd_core.metrics import (DigitsClassifier, features_and_predictions, frechet_distance, gaussian_stats,
                              train_classifier)
from storage import ArtifactStore
from storage.checkpoints import checkpoint_weights, list_checkpoints
from storage.images import grid_png
from storage.layout import EVAL_GRID, RESULTS, SUMMARY
from tasks.context import device_for, open_run, run_teacher
from tasks.stages import resume_key

KEY_COLUMNS = ("run", "config_hash", "checkpoint_step", "model", "steps", "metric")
COLUMNS = (*KEY_COLUMNS, "value", "n_samples", "time")


def classifier(store: ArtifactStore, cfg, images: torch.Tensor, labels: torch.Tensor) -> DigitsClassifier:
    """The digits feature classifier, trained once on all real digits and cached in the run."""
    key = f"eval/classifier-e{cfg.evaluate.classifier_epochs}-s{cfg.evaluate.seed}.safetensors"
    model = DigitsClassifier(int(labels.max()) + 1)
    if store.exists(key):
        model.load_state_dict(bytes_to_tensors(store.read_bytes(key)))
        return model.eval().requires_grad_(False)
    model = train_classifier(images, labels, cfg.evaluate.classifier_epochs, cfg.evaluate.seed)
    store.write_bytes(key, tensors_to_bytes(model.state_dict()))
    return model


class Scorer:
    """FD against all real digits and accuracy against the requested labels, in the classifier's features."""

    def __init__(self, model: DigitsClassifier, real: torch.Tensor) -> None:
        self.model = model
        self.mu, self.sigma = gaussian_stats(features_and_predictions(model, real)[0])

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        feats, preds = features_and_predictions(self.model, images.cpu())
        mu, sigma = gaussian_stats(feats)
        return {"fd": frechet_distance(mu, sigma, self.mu, self.sigma),
                "accuracy": float((preds == labels.cpu()).float().mean())}


def _batched(fn: Callable, z: torch.Tensor, labels: torch.Tensor, batch: int, device) -> torch.Tensor:
    return torch.cat([fn(zb.to(device), lb.to(device)).float().cpu()
                      for zb, lb in zip(z.split(batch), labels.split(batch))])


def _rows(run: str, config_hash: str, step: int, model: str, steps: int, scores: dict, n: int) -> list[dict]:
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return [{"run": run, "config_hash": config_hash, "checkpoint_step": step, "model": model, "steps": steps,
             "metric": k, "value": v, "n_samples": n, "time": now} for k, v in scores.items()]


def result_hashes(cfg) -> dict[str, str]:
    """Config hash of each kind of row: a row is reused only while everything it depends on is unchanged."""
    teacher = cfg.section_hash("data", "teacher", "pairs", "evaluate")
    return {"real": cfg.section_hash("data", "evaluate"), "teacher": teacher,
            "teacher-G0": stable_hash([teacher, cfg.distill.generator_timesteps]),
            "student": stable_hash([resume_key(cfg), cfg.section_hash("evaluate"), cfg.export.use_ema])}


def _student(store, cfg, teacher, step: int) -> Generator:
    D = UNetDenoiser(teacher.student_unet().eval(), teacher.schedule, teacher.prediction_type)
    D.load_state_dict(checkpoint_weights(store, step, cfg.export.use_ema))
    return Generator(D, teacher.schedule, cfg.distill.generator_timesteps)


def run_evaluate(root: str, run_name: str, all_checkpoints: bool = False) -> dict:
    """Append new rows to eval/results.parquet (never duplicating a key) and write eval/summary.json."""
    store, cfg = open_run(root, run_name)
    dataset = real_dataset(cfg.data.name)
    if dataset is None:  # no metric protocol for this data: say so rather than fail the pipeline
        summary = {"run": run_name, "checkpoint_step": None, "grid": None, "rows": [],
                   "note": f"no evaluation protocol for data.name={cfg.data.name!r}: no metrics computed"}
        store.write_json(SUMMARY, summary)
        return summary
    device, e, hashes = device_for(cfg), cfg.evaluate, result_hashes(cfg)
    images, labels = dataset
    n = min(e.n_samples, images.shape[0])
    model = classifier(store, cfg, images, labels)
    score = Scorer(model, images)
    rows = store.read_table(RESULTS).to_pylist() if store.exists(RESULTS) else []
    have = {tuple(r.get(c) for c in KEY_COLUMNS) for r in rows}
    g = torch.Generator().manual_seed(e.seed)
    z = torch.randn((n, cfg.data.channels, cfg.data.image_size, cfg.data.image_size), generator=g)
    y = labels[torch.randperm(images.shape[0], generator=g)[:n]]
    renoise = lambda: torch.Generator(device).manual_seed(1)  # noqa: E731
    n_gen = len(cfg.distill.generator_timesteps)

    def needed(kind: str, step: int, model_name: str, steps: int) -> bool:
        return (run_name, hashes[kind], step, model_name, steps, "fd") not in have

    new: list[dict] = []
    if needed("real", -1, "real", 0):
        half = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(e.seed))
        a, b = half[: images.shape[0] // 2], half[images.shape[0] // 2:]
        fa, fb = (features_and_predictions(model, images[idx])[0] for idx in (a, b))
        fd = frechet_distance(*gaussian_stats(fa), *gaussian_stats(fb))
        new += _rows(run_name, hashes["real"], -1, "real", 0,
                     {"fd": fd, "accuracy": score(images, labels)["accuracy"]}, len(a))
    T = run_teacher(store, cfg, device)
    if needed("teacher", -1, "teacher", e.teacher_steps):
        x = _batched(lambda zb, lb: T.sample(cfg.pairs.solver, e.teacher_steps, zb, lb, cfg.pairs.guidance),
                     z, y, e.batch_size, device)
        new += _rows(run_name, hashes["teacher"], -1, "teacher", e.teacher_steps, score(x, y), n)
    if needed("teacher-G0", -1, "teacher", n_gen):
        G0 = Generator(with_guidance(T.denoiser, cfg.pairs.guidance, T.null_cond), T.schedule,
                       cfg.distill.generator_timesteps)
        x = _batched(lambda zb, lb: G0(zb, lb, generator=renoise()), z, y, e.batch_size, device)
        new += _rows(run_name, hashes["teacher-G0"], -1, "teacher", n_gen, score(x, y), n)
    steps = list_checkpoints(store, resume_key(cfg))
    for step in [s for s in (steps if all_checkpoints else steps[-1:]) if needed("student", s, "student", n_gen)]:
        G = _student(store, cfg, T, step)
        with torch.no_grad():
            x = _batched(lambda zb, lb: G(zb, lb, generator=renoise()), z, y, e.batch_size, device)
        new += _rows(run_name, hashes["student"], step, "student", n_gen, score(x, y), n)
        if step == steps[-1]:
            store.write_bytes(EVAL_GRID, grid_png(x[:64]))
    if not new:
        return summarize(store, rows, run_name, hashes)
    rows = rows + new
    store.write_table(RESULTS, {c: [r.get(c) for r in rows] for c in COLUMNS})
    summary = summarize(store, rows, run_name, hashes)
    store.write_json(SUMMARY, summary)
    return summary


def summarize(store: ArtifactStore, rows: list[dict], run_name: str, hashes: dict[str, str]) -> dict:
    """The current config's rows: baselines and the latest evaluated student checkpoint."""
    current = [r for r in rows if r["run"] == run_name and r.get("config_hash") in hashes.values()]
    student_steps = [r["checkpoint_step"] for r in current if r["model"] == "student"]
    last = max(student_steps) if student_steps else None
    keep = [r for r in current if r["model"] != "student" or r["checkpoint_step"] == last]
    return {"run": run_name, "checkpoint_step": last, "grid": store.url(EVAL_GRID) if last is not None else None,
            "rows": [{k: r[k] for k in ("model", "steps", "metric", "value", "n_samples", "checkpoint_step")}
                     for r in keep]}


@task(name="evaluate", cache_policy=NONE, persist_result=False)
def evaluate_task(root: str, run_name: str, all_checkpoints: bool = False) -> dict:
    """Prefect wrapper of run_evaluate; publishes the results as a table and a markdown artifact."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    summary = run_evaluate(root, run_name, all_checkpoints)
    key = "dmd-eval-" + "".join(c if c.isalnum() else "-" for c in run_name.lower())
    create_table_artifact(summary["rows"], key=key, description=f"DMD evaluation of run {run_name}")
    create_markdown_artifact(summary_markdown(summary), key=key + "-summary")
    return summary


def summary_markdown(summary: dict) -> str:
    """The demo's table: real floor, teacher N-step, teacher 1-step, DMD student."""
    by = {(r["model"], r["steps"], r["metric"]): r["value"] for r in summary["rows"]}
    lines = ["| model | steps | FD | class accuracy |", "|---|---|---|---|"]
    order = sorted({(m, s) for m, s, _ in by}, key=lambda k: (["real", "teacher", "student"].index(k[0]), -k[1]))
    for m, s in order:
        name = {"real": "real floor (two halves)", "teacher": f"teacher {s}-step", "student": f"DMD {s}-step"}[m]
        lines.append(f"| {name} | {s} | {by.get((m, s, 'fd'), float('nan')):.2f} | {by.get((m, s, 'accuracy'), float('nan')):.1%} |")
    if summary.get("note"):
        lines.append(f"\n{summary['note']}")
    return "\n".join(lines) + (f"\n\nsample grid: {summary['grid']}\n" if summary.get("grid") else "\n")
