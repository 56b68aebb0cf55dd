"""Evaluation at a protocol: generate images batch by batch and score them with FID (clean-fid) and CLIP.

Nothing is written to disk: each batch is decoded, brought to the protocol's resolution (DMD2's center crop on
the long edge + PIL Lanczos), quantised to uint8 as a PNG would be, and fed to the Inception features and the
CLIP score at once (Heusel et al. 2017; Radford et al. 2021; DMD §5 protocols).

At scale, the CPU work (the protocol's resize, clean-fid's resize to 299, CLIP's preprocess) runs in a pool of
threads or processes, and `ImageScores(background=True)` scores batch i in a worker thread while the caller generates batch
i + 1; every per-image result is computed as in the sequential loop, so the statistics and cosines are the same.
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import repeat
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from .clip_score import clip_score, device_cosines, text_features
from .conditions import RawConditions
from .fid import FeatureStats, check_resize_on, device_features, features, frechet_distance, parallel_map, to_uint8
from .protocols import center_crop_box, center_crop_resize
from .resample import resize_uint8


def slice_raw(raw: RawConditions, start: int, stop: int) -> RawConditions:
    """Conditions of samples [start, stop): class ids, prompts or None."""
    return None if raw is None else raw[start:stop]


def image_pool(workers: Optional[int] = None, processes: bool = False) -> Executor:
    """Workers for the per-image CPU work (PIL resizes): threads, or spawned processes; one per core this process
    may use unless `workers` says."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = workers or cores or 1
    if processes:
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="images")


def to_protocol_images(images01: torch.Tensor, resolution: int, pool: Optional[Executor] = None, *,
                       resize_on: str = "cpu", on_device: bool = False) -> np.ndarray | torch.Tensor:
    """Float images in [0, 1] (N, C, H, W), on any device -> uint8 (N, R, R, 3) on the CPU; resized as the
    protocol says when not R x R (in `pool`'s threads when given). `resize_on="device"` quantises, crops and
    resizes where the images are (`resample.resize_uint8`, PIL's bytes) and copies the R x R result once, or
    not at all with `on_device` (a uint8 (N, R, R, 3) tensor on the images' device)."""
    check_resize_on(resize_on)
    if on_device and resize_on != "device":
        raise ValueError("on_device=True needs resize_on='device'")
    if resize_on == "device":
        x = (images01.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)  # `to_uint8` before its copy
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        left, top, right, bottom = center_crop_box(x.shape[3], x.shape[2])
        x = resize_uint8(x[:, :, top:bottom, left:right], (resolution, resolution), "lanczos").permute(0, 2, 3, 1)
        return x if on_device else x.cpu().numpy()
    x = to_uint8(images01)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    arr = x.permute(0, 2, 3, 1).numpy()
    if arr.shape[1] == arr.shape[2] == resolution:
        return arr
    return np.stack(parallel_map(partial(center_crop_resize, size=resolution), list(arr), pool))


def pad_batch(z: torch.Tensor, raw: RawConditions, size: int) -> tuple[torch.Tensor, RawConditions]:
    """A short last batch padded to `size` with copies of its first sample, so a network compiled for one shape
    runs it unchanged; the padding's outputs are dropped."""
    n = z.shape[0]
    if n >= size:
        return z, raw
    z = torch.cat([z, z[:1].expand(size - n, *z.shape[1:])])
    if isinstance(raw, list):
        return z, raw + list(repeat(raw[0], size - n))
    if isinstance(raw, torch.Tensor):
        return z, torch.cat([raw, raw[:1].expand(size - n, *raw.shape[1:])])
    return z, raw


def generate_images(sample: Callable[[torch.Tensor, RawConditions], torch.Tensor], z: torch.Tensor,
                    raw: RawConditions, batch_size: int, resolution: int, *, pool: Optional[Executor] = None,
                    fixed_batch: bool = False, resize_on: str = "cpu",
                    on_device: bool = False) -> Iterator[tuple[np.ndarray | torch.Tensor, RawConditions]]:
    """(uint8 protocol images, their raw conditions) batch by batch; `sample(z, raw)` returns images in [0, 1].

    The images are quantised on their device and resized in `pool`'s threads when given, or on their device with
    `resize_on="device"` (the same bytes), and left there with `on_device` (`to_protocol_images`). `fixed_batch`
    pads a short last batch to `batch_size` (`pad_batch`) for samplers compiled for one shape.
    """
    for start in range(0, z.shape[0], batch_size):
        stop = min(start + batch_size, z.shape[0])
        cond = slice_raw(raw, start, stop)
        zb, cb = pad_batch(z[start:stop], cond, batch_size) if fixed_batch else (z[start:stop], cond)
        with torch.no_grad():
            images = sample(zb, cb)[: stop - start]
        yield to_protocol_images(images, resolution, pool, resize_on=resize_on, on_device=on_device), cond


@dataclass
class ClipScorer:
    """An OpenCLIP model with its preprocess and tokenizer, and the protocol's prompt prefix and resize.

    `text`, when set (`with_text`), maps captions to their normalised text embeddings, computed once per protocol:
    a batch whose captions are all there skips the text tower, with the same cosines when they were computed in
    the same batches."""

    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    prefix: str = ""
    resize: Optional[int] = None
    precision: str = "fp32"  # fid.EXTRACTOR_PRECISIONS; fp32 is the metric's definition
    resize_on: str = "cpu"  # fid.RESIZE_ON; "device": crop and resizes on the model's device, the same tensors
    text: Optional[dict] = field(default=None, repr=False)  # caption -> (D,) text embedding on the model's device

    def text_features(self, captions: list[str], batch_size: int) -> torch.Tensor:
        """The captions' normalised text embeddings (N, D) on the model's device (`clip_score.text_features`)."""
        return text_features(captions, self.model, self.tokenizer, self.prefix, batch_size, self.precision)

    def with_text(self, captions: list[str], features: torch.Tensor) -> "ClipScorer":
        """This scorer with `features` (N, D, from `text_features`) kept for `captions`."""
        if len(captions) != len(features):
            raise ValueError(f"{len(captions)} captions but {len(features)} text features")
        device = next(self.model.parameters()).device
        return replace(self, text=dict(zip(captions, features.to(device).unbind(0))))

    def _known(self, captions: list[str]) -> Optional[torch.Tensor]:
        if self.text is None or not all(c in self.text for c in captions):
            return None
        return torch.stack([self.text[c] for c in captions])

    def __call__(self, images: np.ndarray, captions: list[str], pool: Optional[Executor] = None) -> torch.Tensor:
        return clip_score(torch.from_numpy(images).permute(0, 3, 1, 2), captions, self.model, self.preprocess,
                          self.tokenizer, prefix=self.prefix, resize=self.resize, pool=pool,
                          precision=self.precision, resize_on=self.resize_on, text=self._known(captions))[1]

    def on_device(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Per-sample cosines of uint8 (N, R, R, 3) images on the model's device, left there (`device_cosines`:
        the values of `resize_on="device"`)."""
        return device_cosines(images, captions, self.model, self.preprocess, self.tokenizer, prefix=self.prefix,
                              resize=self.resize, precision=self.precision, text=self._known(captions))


class ImageScores:
    """FID statistics and per-sample CLIP cosines of one model's images, accumulated batch by batch.

    `pool` resizes in threads, `resize_on="device"` on `device` (clean-fid's resize to 299, the same values);
    `precision` is Inception's (`fid.extractor_precision`). With `background`, `update`
    hands the batch to one worker thread and returns, so the caller generates the next batch meanwhile; batches
    are scored one at a time in their order, after the first `warmup_batches`, which are scored in the caller's
    thread (a compiled generator records its CUDA graphs on its first two calls, with nothing beside it).
    `stats` and `cosines` wait for the batch in flight; its error is raised there or at the next `update`.
    On an H100 with 16 cores the overlap did not pay (docs/benchmarks.md): the threads share one GIL.

    Images given as a uint8 (B, R, R, 3) tensor (`generate_images(on_device=True)`) are scored on their device.
    On a GPU nothing waits for it: features and cosines are copied to pinned host memory behind the queued work,
    and batch i is added to the statistics once batch i + 1 has been queued, in the caller's thread and in batch
    order, so the statistics are those of the sequential loop (mode "clean", `resize_on="device"`).
    """

    def __init__(self, extractor: torch.nn.Module, mode: str, device: torch.device | str,
                 clip: Optional[ClipScorer] = None, *, pool: Optional[Executor] = None, precision: str = "fp32",
                 background: bool = False, warmup_batches: int = 2, resize_on: str = "cpu") -> None:
        check_resize_on(resize_on)
        self.extractor, self.mode, self.device, self.clip, self.resize_on = extractor, mode, device, clip, resize_on
        self.pool, self.precision, self.warmup_batches = pool, precision, warmup_batches
        self._stats = FeatureStats()
        self._cosines: list[torch.Tensor] = []
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scores") if background else None
        self._pending: Optional[Future] = None
        self._batches = 0
        self._queued: list[tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.cuda.Event]]] = []

    @property
    def stats(self) -> FeatureStats:
        self.wait()
        return self._stats

    @stats.setter
    def stats(self, value: FeatureStats) -> None:
        self.wait()
        self._stats = value

    @property
    def cosines(self) -> list[torch.Tensor]:
        self.wait()
        return self._cosines

    @cosines.setter
    def cosines(self, value: list[torch.Tensor]) -> None:
        self.wait()
        self._cosines = value

    def update(self, images: np.ndarray | torch.Tensor, captions: RawConditions = None) -> None:
        """Score a batch of uint8 (B, R, R, 3) images, a numpy array or a tensor on the device (and their
        captions, for CLIP); the caller keeps `images` unchanged while it is in flight."""
        self._wait_worker()
        self._batches += 1
        if isinstance(images, torch.Tensor):
            self._queue(images, captions)
            while len(self._queued) > 1:  # the batch before this one is done on the GPU by the time it is read
                self._take()
        elif self._worker is None or self._batches <= self.warmup_batches:
            self._score(images, captions)
        else:
            self._pending = self._worker.submit(self._score, images, captions)

    def wait(self) -> None:
        """Until every batch handed over is scored; re-raises a worker's error."""
        self._wait_worker()
        while self._queued:
            self._take()

    def _wait_worker(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _queue(self, images: torch.Tensor, captions: RawConditions) -> None:
        """Queue one device-resident batch's features and cosines and their copies to pinned host memory."""
        if self.mode != "clean" or self.resize_on != "device":
            raise ValueError("image tensors are scored with mode 'clean' and resize_on='device'; pass numpy "
                             "images otherwise")
        feats = device_features(images, self.extractor, self.mode, self.precision)
        cos = self.clip.on_device(images, captions) if self.clip is not None and isinstance(captions, list) else None
        if images.device.type != "cuda":
            self._queued.append((feats.cpu(), cos.cpu() if cos is not None else None, None))
            return
        host_feats = torch.empty(feats.shape, dtype=feats.dtype, pin_memory=True).copy_(feats, non_blocking=True)
        host_cos = None
        if cos is not None:
            host_cos = torch.empty(cos.shape, dtype=cos.dtype, pin_memory=True).copy_(cos, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._queued.append((host_feats, host_cos, done))

    def _take(self) -> None:
        """Add the oldest queued batch to the statistics and cosines once its copies have landed."""
        host_feats, host_cos, done = self._queued.pop(0)
        if done is not None:
            done.synchronize()
        self._stats.update(host_feats.numpy())
        if host_cos is not None:
            self._cosines.append(host_cos)

    def _score(self, images: np.ndarray, captions: RawConditions) -> None:
        self._stats.update(features(list(images), self.extractor, self.mode, device=self.device, pool=self.pool,
                                    precision=self.precision, resize_on=self.resize_on))
        if self.clip is not None and isinstance(captions, list):
            self._cosines.append(self.clip(images, captions, self.pool))

    def result(self, ref_mu: np.ndarray, ref_sigma: np.ndarray) -> dict[str, float]:
        """{"fid": FID against the reference statistics, "clip": mean raw cosine (text models)}."""
        mu, sigma = self.stats.compute()
        out = {"fid": frechet_distance(mu, sigma, ref_mu, ref_sigma)}
        if self.cosines:
            out["clip"] = float(torch.cat(self.cosines).double().mean())
        return out


def reference_stats(batches: Iterator[np.ndarray], extractor: torch.nn.Module, mode: str,
                    device: torch.device | str) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of reference images given as uint8 (N, R, R, 3) batches."""
    stats = FeatureStats()
    for batch in batches:
        stats.update(features(list(batch), extractor, mode, device=device))
    return stats.compute()
