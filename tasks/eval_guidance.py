"""The evaluate stage's guidance sweep: the student (and, for classifier protocols, the teacher N-step) scored at
each w of `evaluate.guidance_sweep`, into eval/guidance.parquet and the trade-off plot eval/guidance.png.

Classifier protocols (digits): FD to the real data, class accuracy, and `fd_teacher`, the FD between the student's
samples at w and the teacher's N-step samples at the same w on the same noise and labels (the teacher's samples
are cached under the artifact root, shared by runs with the same teacher). Image protocols: FID and CLIP per w.
A fixed-guidance student has no w input: its rows repeat its one distribution at every w of the sweep.
"""
from __future__ import annotations

from typing import Callable

import torch

from dmd_core import accel
from dmd_core.checkpoint import bytes_to_tensors, tensors_to_bytes
from dmd_core.config import stable_hash
from dmd_core.evaluation import ImageScores, generate_images
from dmd_core.fid import frechet_distance
from dmd_core.generator import Generator
from dmd_core.guidance import student_at, student_denoiser
from dmd_core.metrics import features_and_predictions, gaussian_stats
from storage.checkpoints import checkpoint_weights
from storage.layout import root_store
from storage.plots import guidance_png
from tasks.launch import writer_store
from tasks.eval_protocols import ClassifierScorer, classifier, generating, protocol_inputs, result_hashes, rows
from tasks.stages import TEACHER_STAGE, resume_key

GUIDANCE_TABLE = "eval/guidance.parquet"
GUIDANCE_PLOT = "eval/guidance.png"
COLUMNS = ("run", "config_hash", "checkpoint_step", "model", "steps", "guidance", "metric", "value", "n_samples",
           "time", "precision")


def _rows(run: str, config_hash: str, step: int, model: str, steps: int, w: float, scores: dict, n: int,
          precision: str) -> list:
    """The evaluate stage's result rows (`eval_protocols.rows`) at guidance scale w."""
    return [{**r, "guidance": float(w), "value": float(r["value"])}
            for r in rows(run, config_hash, step, model, steps, scores, n, precision)]


def sweep_students(store, cfg, teacher, step: int) -> Callable[[float], torch.nn.Module]:
    """w -> the checkpoint's generator at w (the weights are loaded once)."""
    weights = checkpoint_weights(store, step, resume_key(store, cfg, step), cfg.export.use_ema)
    D = student_denoiser(teacher, weights, cfg.distill)
    G = Generator(D, teacher.process, cfg.distill.generator_timesteps)
    return lambda w: student_at(G, cfg.distill, w)


def _teacher_samples(root: str, store, cfg, teacher, z: torch.Tensor, y: torch.Tensor, w: float, device,
                     precision: str) -> torch.Tensor:
    """The teacher's N-step samples at guidance w, computed once per (teacher, noise, labels, w, precision) under
    the root (fp32 samples keep the key they had before the precision was part of it)."""
    e, marker = cfg.evaluate, store.read_json(TEACHER_STAGE.marker)
    key = stable_hash([marker.get("content", marker["hash"]), cfg.pairs.solver, e.teacher_steps, e.seed,
                       int(z.shape[0]), float(w)] + ([] if precision == "fp32" else [precision]))
    cache, path = writer_store(root_store(root)), f"_reference/guidance-teacher-{key}.safetensors"
    if cache.exists(path):
        return bytes_to_tensors(cache.read_bytes(path))["x"]
    sample = generating(teacher, lambda zb, c: teacher.sample(cfg.pairs.solver, e.teacher_steps, zb, c, w),
                        precision, device)
    x = torch.cat([sample(zb, yb.to(device)).cpu() for zb, yb in zip(z.split(e.batch_size), y.split(e.batch_size))])
    cache.write_bytes(path, tensors_to_bytes({"x": x}))
    return x


def classifier_sweep(root, store, cfg, run_name, teacher, dataset, protocol, step, device) -> list[dict]:
    """Teacher N-step and student rows (fd, accuracy; the student also fd_teacher) at each w of the sweep."""
    e, hashes = cfg.evaluate, result_hashes(store, cfg)
    images, labels = dataset
    n = min(e.n_samples or protocol.n, images.shape[0])
    model = classifier(store, cfg, images, labels)
    score = ClassifierScorer(model, images)
    g = torch.Generator().manual_seed(e.seed)  # the noise and labels of the classifier protocol's rows
    z = torch.randn((n, *teacher.sample_shape), generator=g)
    y = labels[torch.randperm(images.shape[0], generator=g)[:n]]
    at, precision = sweep_students(store, cfg, teacher, step), accel.resolve_precision(e.precision, device)
    out = []
    for w in e.guidance_sweep:
        x_ref = _teacher_samples(root, store, cfg, teacher, z, y, w, device, precision)
        out += _rows(run_name, hashes["teacher"], -1, "teacher", e.teacher_steps, w, score(x_ref, y), n, precision)
        G, renoise = at(w), torch.Generator(device).manual_seed(1)
        sample = generating(teacher, lambda zb, c: G(zb, c, generator=renoise), precision, device)
        x = torch.cat([sample(zb, yb.to(device)).cpu() for zb, yb in zip(z.split(e.batch_size), y.split(e.batch_size))])
        scores = score(x, y)
        feats, feats_ref = (features_and_predictions(model, v)[0] for v in (x, x_ref))
        scores["fd_teacher"] = frechet_distance(*gaussian_stats(feats), *gaussian_stats(feats_ref))
        out += _rows(run_name, hashes["student"], step, "student", len(cfg.distill.generator_timesteps), w, scores, n,
                     precision)
    return out


def image_sweep(root, store, cfg, run_name, teacher, protocol, step, device) -> list[dict]:
    """Student FID (and CLIP score for text models) at each w of the sweep, on the protocol's noise and prompts."""
    e, hashes = cfg.evaluate, result_hashes(store, cfg)
    n, raw, z, ref, inception, clip = protocol_inputs(root, cfg, teacher, protocol, device)[:6]
    at, out = sweep_students(store, cfg, teacher, step), []
    precision = accel.resolve_precision(e.precision, device)
    for w in e.guidance_sweep:
        G, renoise = at(w), torch.Generator(device).manual_seed(1)
        sample = generating(teacher, lambda zb, c: G(zb, c, generator=renoise), precision, device, images=True)
        scores = ImageScores(inception, e.fid_mode, device, clip)
        for batch, cond in generate_images(sample, z, raw, e.batch_size, protocol.resolution):
            scores.update(batch, cond)
        out += _rows(run_name, hashes["student"], step, "student", len(cfg.distill.generator_timesteps), w,
                     scores.result(*ref), n, precision)
    return out


def run_guidance_sweep(root, store, cfg, run_name, teacher, protocol, dataset, step, device) -> list[dict]:
    """Score checkpoint `step` at every w of evaluate.guidance_sweep (once per config and step); write the table
    and the plot. Returns the current rows."""
    hashes = result_hashes(store, cfg)
    if store.exists(GUIDANCE_TABLE):
        have = [r for r in store.read_table(GUIDANCE_TABLE).to_pylist()
                if r["checkpoint_step"] in (step, -1) and r["config_hash"] in (hashes["student"], hashes["teacher"])]
        if {r["guidance"] for r in have if r["model"] == "student"} >= set(map(float, cfg.evaluate.guidance_sweep)):
            return have
    if protocol.classifier:
        rows = classifier_sweep(root, store, cfg, run_name, teacher, dataset, protocol, step, device)
    else:
        rows = image_sweep(root, store, cfg, run_name, teacher, protocol, step, device)
    store.write_table(GUIDANCE_TABLE, {c: [r[c] for r in rows] for c in COLUMNS})
    labelled = [{**r, "label": f"teacher {r['steps']}-step" if r["model"] == "teacher" else f"student (step {step})"}
                for r in rows]
    store.write_bytes(GUIDANCE_PLOT, guidance_png(labelled, f"run {run_name}: guidance sweep"))
    return rows
