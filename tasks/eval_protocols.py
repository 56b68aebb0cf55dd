"""The evaluate stage's protocols: a dataset classifier (FD + accuracy) and the papers' image protocols
(clean-fid FID + CLIP score: coco30k, coco10k, cifar10-50k). Each returns new result rows and the images of
the comparison grid; the stage module owns the results table."""
from __future__ import annotations

import datetime as dt
from dataclasses import replace
from typing import Any, Callable, NamedTuple, Optional

import torch

from dmd_core import accel
from dmd_core.checkpoint import bytes_to_tensors, tensors_to_bytes
from dmd_core.config import stable_hash
from dmd_core.denoisers import with_guidance
from dmd_core.eval_parallel import gather_scores, rank_slice
from dmd_core.evaluation import (ClipScorer, ImageScores, generate_images, image_pool, reference_stats,
                                 slice_raw)
from dmd_core.inference import fast_generation, half_text_encoders
from dmd_core.fid import frechet_distance
from dmd_core.generator import Generator
from dmd_core.guidance import student_at, student_denoiser
from dmd_core.metrics import DigitsClassifier, features_and_predictions, gaussian_stats, train_classifier
from dmd_core.protocols import class_balanced_labels, sample_captions
from storage import ArtifactStore
from storage.checkpoints import checkpoint_weights
from storage.coco import iter_reference_images, list_reference_images, read_coco_annotations
from storage.layout import root_store
from storage.models import cached_file
from tasks.eval_cache import TeacherBaselines
from tasks.launch import writer_store
from tasks.stages import resume_key

FAST_FROM = 2_000  # evaluate.fast=auto: the fast path's ~1 min of compilation pays off from here (docs/benchmarks.md)
KEY_COLUMNS = ("run", "config_hash", "checkpoint_step", "model", "steps", "metric")
COLUMNS = (*KEY_COLUMNS, "value", "n_samples", "time", "precision", "cached")


def rows(run: str, config_hash: str, step: int, model: str, steps: int, scores: dict, n: int,
         precision: Optional[str] = None, cached: bool = False) -> list[dict]:
    """Result rows; `precision` is the resolved autocast of the model's generation (None for the real data);
    `cached`: the scores were read from the root's teacher baselines, no image was generated for them."""
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return [{"run": run, "config_hash": config_hash, "checkpoint_step": step, "model": model, "steps": steps,
             "metric": k, "value": v, "n_samples": n, "time": now, "precision": precision, "cached": cached}
            for k, v in scores.items()]


def teacher_rows(run_name: str, models: "Models", baselines: TeacherBaselines, n: int, needed: Callable,
                 metric: str, compute: Callable, pictures: dict) -> list[dict]:
    """Rows of the teacher at evaluate.teacher_steps and at the generator's timesteps: read from the root's
    teacher baselines when computed before, else `compute(sample) -> (scores, 8 preview images)` and stored."""
    c, hashes = models.cfg, result_hashes(models.store, models.cfg)
    new = []
    for kind, n_steps, sampler, solver, timesteps in (
            ("teacher", c.evaluate.teacher_steps, models.teacher_steps, c.pairs.solver, None),
            ("teacher-G0", models.n_gen, models.teacher_generator, "generator", list(c.distill.generator_timesteps))):
        if not needed(kind, -1, "teacher", n_steps, metric):
            continue
        label = f"teacher {n_steps}-step"
        key = baselines.key(kind, n_steps, solver, c.pairs.guidance, timesteps)
        hit = baselines.get(key, label)
        scores, preview = hit if hit is not None else compute(sampler())
        if hit is None:
            baselines.put(key, label, scores, preview)
        if preview is not None:
            pictures[label] = preview
        new += rows(run_name, hashes[kind], -1, "teacher", n_steps, scores, n, models.precision, cached=hit is not None)
    return new


def result_hashes(store: ArtifactStore, cfg) -> dict[str, str]:
    """Config hash of each kind of row: a row is reused only while everything it depends on is unchanged."""
    teacher = cfg.section_hash("data", "teacher", "pairs", "evaluate")
    return {"real": cfg.section_hash("data", "evaluate"), "teacher": teacher,
            "teacher-G0": stable_hash([teacher, cfg.distill.generator_timesteps]),
            "student": stable_hash([resume_key(store, cfg), cfg.section_hash("evaluate"), cfg.export.use_ema])}


def student(store: ArtifactStore, cfg, teacher, step: int) -> Generator:
    """The checkpoint's generator (EMA or raw, as the export uses) on a copy of the teacher's denoiser; a guided
    student at its shown scale (a GuidedGenerator over the Generator)."""
    weights = checkpoint_weights(store, step, resume_key(store, cfg, step), cfg.export.use_ema)
    D = student_denoiser(teacher, weights, cfg.distill)
    return student_at(Generator(D, teacher.process, cfg.distill.generator_timesteps), cfg.distill)


def generating(teacher, body: Callable, precision: str, device, images: bool = False,
               guidance: float = 1.0) -> Callable:
    """sample(z, raw): body(z, cond) under the autocast of `precision` (a resolved evaluate.precision), with the
    teacher's decode to [0, 1] images when `images`; returned in float32, as the feature extractors take it. An
    embedded-guidance teacher's condition carries `guidance` (distill.guidance) as the networks' input."""

    def sample(z: torch.Tensor, raw) -> torch.Tensor:
        # the text encoder keeps its own precision
        guided = getattr(teacher, "embedded_guidance", False)  # any object with encode/decode may stand in
        cond = teacher.encode_guided(raw, guidance) if guided else teacher.encode(raw)
        with torch.no_grad(), accel.autocast(precision, device):
            x = body(z.to(device), cond)
            if images:
                x = teacher.decode(x)
        x = x.float()  # a no-op in fp32
        return (x / 2 + 0.5).clamp(0, 1) if images else x

    return sample


class Models:
    """The models a run evaluates, each as sample(z, raw) -> x0 in model space (or images in [0, 1] when
    `images`), float32, on the same noise; generated under evaluate.precision's autocast (`precision`)."""

    def __init__(self, store: ArtifactStore, cfg, teacher, device, images: bool = False, fast: bool = False) -> None:
        self.store, self.cfg, self.teacher, self.device, self.images = store, cfg, teacher, device, images
        self.n_gen = len(cfg.distill.generator_timesteps)
        self.precision = accel.resolve_precision(cfg.evaluate.precision, device)
        self.fast = fast  # students through dmd_core.inference's fast path (the teacher's decoder made fast too)
        self._half_teacher = None  # the fast path's caption encoders, copied in half precision once

    def _renoise(self) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(1)

    def _sampler(self, body: Callable, teacher=None) -> Callable:
        return generating(teacher or self.teacher, body, self.precision, self.device, self.images,
                          self.cfg.distill.guidance)

    def teacher_steps(self) -> Callable:
        T, c = self.teacher, self.cfg
        return self._sampler(lambda z, cond: T.sample(c.pairs.solver, c.evaluate.teacher_steps, z, cond,
                                                      c.pairs.guidance))

    def teacher_generator(self) -> Callable:
        """The teacher run at the generator's timesteps: the student before distillation."""
        T = self.teacher
        G0 = Generator(with_guidance(T.denoiser, self.cfg.pairs.guidance, T.null_cond), T.process,
                       self.cfg.distill.generator_timesteps)
        g = self._renoise()  # one stream per model: batches get fresh re-noising eps
        return self._sampler(lambda z, cond: G0(z, cond, generator=g))

    def student(self, step: int) -> Callable:
        G, g = student(self.store, self.cfg, self.teacher, step), self._renoise()
        if not self.fast:
            return self._sampler(lambda z, cond: G(z, cond, generator=g))
        dtype = accel.AUTOCAST_DTYPES[self.precision]
        G = fast_generation(G, self.teacher, dtype)
        if self._half_teacher is None:  # captions encoded in the generation's precision too, as a stock pipeline
            self._half_teacher = half_text_encoders(self.teacher, dtype)
        return self._sampler(lambda z, cond: G(z, cond, generator=g), self._half_teacher)


# ---- classifier protocols: FD and accuracy in a small classifier's features ------------------------------------------------
def classifier(store: ArtifactStore, cfg, images: torch.Tensor, labels: torch.Tensor) -> DigitsClassifier:
    """The feature classifier, trained once on all real images and cached in the run."""
    key = f"eval/classifier-e{cfg.evaluate.classifier_epochs}-s{cfg.evaluate.seed}.safetensors"
    model = DigitsClassifier(int(labels.max()) + 1)
    if store.exists(key):
        model.load_state_dict(bytes_to_tensors(store.read_bytes(key)))
        return model.eval().requires_grad_(False)
    model = train_classifier(images, labels, cfg.evaluate.classifier_epochs, cfg.evaluate.seed)
    store.write_bytes(key, tensors_to_bytes(model.state_dict()))
    return model


class ClassifierScorer:
    """FD against all real images and accuracy against the requested labels, in the classifier's features."""

    def __init__(self, model: DigitsClassifier, real: torch.Tensor) -> None:
        self.model = model
        self.mu, self.sigma = gaussian_stats(features_and_predictions(model, real)[0])

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        feats, preds = features_and_predictions(self.model, images.cpu())
        return {"fd": frechet_distance(*gaussian_stats(feats), self.mu, self.sigma),
                "accuracy": float((preds == labels.cpu()).float().mean())}


def classifier_protocol(root, store, cfg, run_name, teacher, dataset, protocol, steps, needed,
                        device) -> tuple[list[dict], dict]:
    """Rows for the real floor, teacher N-step and 1-step, and the student checkpoints `steps`."""
    e, hashes = cfg.evaluate, result_hashes(store, cfg)
    images, labels = dataset
    n = min(e.n_samples or protocol.n, images.shape[0])
    model = classifier(store, cfg, images, labels)
    score = ClassifierScorer(model, images)
    g = torch.Generator().manual_seed(e.seed)
    z = torch.randn((n, *teacher.sample_shape), generator=g)
    y = labels[torch.randperm(images.shape[0], generator=g)[:n]]
    models = Models(store, cfg, teacher, device)

    def run(fn: Callable) -> torch.Tensor:
        return torch.cat([fn(zb, lb.to(device)).float().cpu() for zb, lb in zip(z.split(e.batch_size),
                                                                                 y.split(e.batch_size))])

    new, pictures = [], {}
    if needed("real", -1, "real", 0, protocol.metrics[0]):
        half = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(e.seed))
        a, b = half[: images.shape[0] // 2], half[images.shape[0] // 2:]
        fa, fb = (features_and_predictions(model, images[idx])[0] for idx in (a, b))
        fd = frechet_distance(*gaussian_stats(fa), *gaussian_stats(fb))
        new += rows(run_name, hashes["real"], -1, "real", 0, {"fd": fd, "accuracy": score(images, labels)["accuracy"]},
                    len(a))

    def baseline(fn: Callable) -> tuple[dict, torch.Tensor]:
        x = run(fn)
        return score(x, y), x[:8]

    baselines = TeacherBaselines(root, store, cfg, protocol, n, models.precision,
                                 f"classifier-e{e.classifier_epochs}-s{e.seed}")
    new += teacher_rows(run_name, models, baselines, n, needed, protocol.metrics[0], baseline, pictures)
    grid = None
    for step in steps:
        if needed("student", step, "student", models.n_gen, protocol.metrics[0]):
            x = run(models.student(step))
            new += rows(run_name, hashes["student"], step, "student", models.n_gen, score(x, y), n, models.precision)
            pictures[f"student step {step}"], grid = x[:8], x[:64]
    return new, {"pictures": pictures, "labels": [f"class {int(c)}" for c in y[:8]], "grid": grid}


# ---- image protocols: clean-fid FID (+ CLIP score for text) -------------------------------------------------
def _extractors(cfg, teacher, device):
    """(Inception features, CLIP scorer or None, a name identifying the extractor for the statistics cache)."""
    from dmd_core.clip_score import load_clip
    from dmd_core.fid import inception_extractor

    e = cfg.evaluate
    if e.random_extractors:
        from dmd_core.tiny import TinyInception, register_tiny_clip

        inception, name = TinyInception().to(device).eval(), "tiny-random"
        clip = None
        if teacher.conditioning == "text":
            with torch.random.fork_rng(devices=[]):  # the same random CLIP in every process (and rank)
                torch.manual_seed(0)
                clip = load_clip(register_tiny_clip(), random_init=True, device=device)
    else:
        path = cached_file(e.inception_weights) if e.inception_weights else None
        inception, name = inception_extractor(path, device, e.fid_mode), "inception-2015-12-05"
        clip = None
        if teacher.conditioning == "text":
            weights = cached_file(e.clip_weights) if e.clip_weights else None
            clip = load_clip(e.clip_model, weights, device)
    scorer = ClipScorer(*clip, prefix=e.clip_prefix, resize=e.clip_resize, precision=e.clip_precision) if clip else None
    return inception, scorer, name


def _cached(root: str, path: str, compute: Callable[[], dict]) -> dict[str, torch.Tensor]:
    """The tensors kept at `path` under the root, or `compute()`'s, written there first."""
    cache = writer_store(root_store(root))
    if cache.exists(path):
        return bytes_to_tensors(cache.read_bytes(path))
    tensors = compute()
    cache.write_bytes(path, tensors_to_bytes(tensors))
    return tensors


def _reference(root: str, cfg, protocol, files: list[str], extractor, name: str, device):
    """Reference (mu, sigma) and its path, computed once per (protocol, resolution, mode, extractor, images) under
    the root."""
    e = cfg.evaluate
    key = stable_hash([protocol.name, protocol.resolution, e.fid_mode, name, e.reference_images, files])
    path = f"_reference/{protocol.name}-{key}.safetensors"

    def compute() -> dict[str, torch.Tensor]:
        batches = iter_reference_images(e.reference_images, files, protocol.resolution, e.batch_size)
        mu, sigma = reference_stats(batches, extractor, e.fid_mode, device)
        return {"mu": torch.from_numpy(mu), "sigma": torch.from_numpy(sigma)}

    stats = _cached(root, path, compute)
    return (stats["mu"].numpy(), stats["sigma"].numpy()), path


def _caption_features(root: str, cfg, captions: list[str], clip: ClipScorer, name: str) -> ClipScorer:
    """`clip` with the captions' CLIP text embeddings, computed once per (captions, CLIP model, prefix, precision,
    batch size) under the root: every model scored on the protocol, in every run, reuses them."""
    e = cfg.evaluate
    key = stable_hash([name, e.clip_model, e.clip_weights, e.clip_prefix, e.clip_precision, e.batch_size, captions])
    path = f"_reference/clip-text-{key}.safetensors"
    features = _cached(root, path, lambda: {"features": clip.text_features(captions, e.batch_size).cpu()})
    return clip.with_text(captions, features["features"])


class ProtocolInputs(NamedTuple):
    """What every generator is scored on under an image protocol."""

    n: int
    raw: Any  # the conditions: prompts, class ids or None
    z: torch.Tensor  # the noise, drawn on the CPU from evaluate.seed
    ref: tuple  # reference (mu, sigma)
    inception: torch.nn.Module
    clip: Optional[ClipScorer]
    name: str  # the extractor's name
    reference: str  # the reference statistics' path under the root


def protocol_inputs(root, cfg, teacher, protocol, device) -> ProtocolInputs:
    """What every generator is scored on under an image protocol (ProtocolInputs)."""
    e = cfg.evaluate
    if not e.reference_images:
        raise ValueError(f"evaluate.protocol={protocol.name} needs evaluate.reference_images (a folder URL)")
    n, raw, files = e.n_samples or protocol.n, None, None
    if protocol.text:
        if not e.captions:
            raise ValueError(f"evaluate.protocol={protocol.name} needs evaluate.captions (captions_val2014.json)")
        drawn = sample_captions(read_coco_annotations(e.captions), n, protocol.caption_seed)
        raw = [caption for _, _, caption in drawn]
        if protocol.reference_is_caption_images:
            files = [file_name for _, file_name, _ in drawn]
    elif teacher.num_classes:
        raw = class_balanced_labels(n, teacher.num_classes)
    files = files if files is not None else list_reference_images(e.reference_images)
    inception, clip, name = _extractors(cfg, teacher, device)
    ref, reference = _reference(root, cfg, protocol, files, inception, name, device)
    if clip is not None and protocol.text:
        clip = _caption_features(root, cfg, raw, clip, name)
    z = torch.randn((n, *teacher.sample_shape), generator=torch.Generator().manual_seed(e.seed))
    return ProtocolInputs(n, raw, z, ref, inception, clip, name, reference)


def fast_path(cfg, device, n: int) -> bool:
    """Whether students take the fast path: evaluate.fast true, or unset (auto) from FAST_FROM samples; CUDA and
    half precision only."""
    e = cfg.evaluate
    wanted = e.fast if e.fast is not None else n >= FAST_FROM
    return wanted and device.type == "cuda" and accel.resolve_precision(e.precision, device) in accel.AUTOCAST_DTYPES


def image_protocol(root, store, cfg, run_name, teacher, protocol, steps, needed, device) -> tuple[list[dict], dict]:
    """FID (and CLIP for text models) of teacher N-step, teacher 1-step and the student checkpoints `steps`."""
    with image_pool(cfg.evaluate.workers or None) as pool:
        return _image_protocol(root, store, cfg, run_name, teacher, protocol, steps, needed, device, pool)


def _image_protocol(root, store, cfg, run_name, teacher, protocol, steps, needed, device, pool):
    e, hashes = cfg.evaluate, result_hashes(store, cfg)
    inputs = protocol_inputs(root, cfg, teacher, protocol, device)
    n, raw, z, ref, inception, clip = inputs.n, inputs.raw, inputs.z, inputs.ref, inputs.inception, inputs.clip
    fast = fast_path(cfg, device, n)
    resize_on = "device" if fast else "cpu"  # the fast path also crops and resizes on the GPU (PIL's bytes)
    clip = replace(clip, resize_on=resize_on) if clip is not None else None
    models = Models(store, cfg, teacher, device, images=True, fast=fast)
    share = rank_slice(n)  # data-parallel ranks: this one's samples; one process: all of them
    z, raw = z[share], slice_raw(raw, share.start, share.stop)

    on_device = fast and e.fid_mode == "clean"  # and the images stay on the GPU until scored

    def score(fn: Callable, keep: Optional[dict], label: str) -> dict:
        scores = ImageScores(inception, e.fid_mode, device, clip, pool=pool, resize_on=resize_on)
        for images, cond in generate_images(fn, z, raw, e.batch_size, protocol.resolution, pool=pool,
                                            fixed_batch=fast, resize_on=resize_on, on_device=on_device):
            scores.update(images, cond)
            if keep is not None and label not in keep:
                keep[label] = torch.as_tensor(images[:8]).cpu().permute(0, 3, 1, 2).float() / 127.5 - 1
        gather_scores(scores)
        return scores.result(*ref)

    def baseline(fn: Callable) -> tuple[dict, torch.Tensor]:
        keep: dict = {}
        return score(fn, keep, "preview"), keep["preview"]

    pictures: dict = {}
    baselines = TeacherBaselines(root, store, cfg, protocol, inputs.n, models.precision, inputs.reference)
    new = teacher_rows(run_name, models, baselines, inputs.n, needed, protocol.metrics[0], baseline, pictures)
    for step in steps:
        if needed("student", step, "student", models.n_gen, protocol.metrics[0]):
            label = f"student step {step}"
            new += rows(run_name, hashes["student"], step, "student", models.n_gen,
                        score(models.student(step), pictures, label), n, models.precision)
    labels = ([str(c) for c in raw[:8]] if isinstance(raw, list)
              else [f"class {int(c)}" for c in raw[:8]] if raw is not None else None)
    last = pictures.get(f"student step {steps[-1]}") if steps else None
    return new, {"pictures": pictures, "labels": labels, "grid": last}
