"""Evaluation at a protocol: generate images batch by batch and score them with FID (clean-fid) and CLIP.

Nothing is written to disk: each batch is decoded, brought to the protocol's resolution (DMD2's center crop on
the long edge + PIL Lanczos), quantised to uint8 as a PNG would be, and fed to the Inception features and the
CLIP score at once (Heusel et al. 2017; Radford et al. 2021; DMD §5 protocols).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from .clip_score import clip_score
from .conditions import RawConditions
from .fid import FeatureStats, features, frechet_distance, to_uint8
from .protocols import center_crop_resize


def slice_raw(raw: RawConditions, start: int, stop: int) -> RawConditions:
    """Conditions of samples [start, stop): class ids, prompts or None."""
    return None if raw is None else raw[start:stop]


def to_protocol_images(images01: torch.Tensor, resolution: int) -> np.ndarray:
    """Float images in [0, 1] (N, C, H, W) -> uint8 (N, R, R, 3); resized as the protocol says when not R x R."""
    x = to_uint8(images01)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    arr = x.permute(0, 2, 3, 1).numpy()
    if arr.shape[1] == arr.shape[2] == resolution:
        return arr
    return np.stack([center_crop_resize(a, resolution) for a in arr])


def generate_images(sample: Callable[[torch.Tensor, RawConditions], torch.Tensor], z: torch.Tensor,
                    raw: RawConditions, batch_size: int, resolution: int) -> Iterator[tuple[np.ndarray, RawConditions]]:
    """(uint8 protocol images, their raw conditions) batch by batch; `sample(z, raw)` returns images in [0, 1]."""
    for start in range(0, z.shape[0], batch_size):
        stop = min(start + batch_size, z.shape[0])
        cond = slice_raw(raw, start, stop)
        with torch.no_grad():
            images = sample(z[start:stop], cond).float().cpu()
        yield to_protocol_images(images, resolution), cond


@dataclass
class ClipScorer:
    """An OpenCLIP model with its preprocess and tokenizer, and the protocol's prompt prefix and resize."""

    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    prefix: str = ""
    resize: Optional[int] = None

    def __call__(self, images: np.ndarray, captions: list[str]) -> torch.Tensor:
        return clip_score(torch.from_numpy(images).permute(0, 3, 1, 2), captions, self.model, self.preprocess,
                          self.tokenizer, prefix=self.prefix, resize=self.resize)[1]


class ImageScores:
    """FID statistics and per-sample CLIP cosines of one model's images, accumulated batch by batch."""

    def __init__(self, extractor: torch.nn.Module, mode: str, device: torch.device | str,
                 clip: Optional[ClipScorer] = None) -> None:
        self.extractor, self.mode, self.device, self.clip = extractor, mode, device, clip
        self.stats = FeatureStats()
        self.cosines: list[torch.Tensor] = []

    def update(self, images: np.ndarray, captions: RawConditions = None) -> None:
        self.stats.update(features(list(images), self.extractor, self.mode, device=self.device))
        if self.clip is not None and isinstance(captions, list):
            self.cosines.append(self.clip(images, captions))

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
