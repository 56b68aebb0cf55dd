"""Data-parallel evaluation: every rank scores a contiguous share of the protocol's samples, then the shares' FID
statistics and CLIP cosines are gathered in rank order, so every rank holds what one process would have computed.

The noise and the conditions are drawn for all n samples on every rank (from evaluate.seed, on the CPU), and rank r
keeps samples [n r / W, n (r + 1) / W): a sample sees the same numbers at any world size. The statistics combine
with Chan et al.'s pairwise update (`FeatureStats.merge`); the result equals one process's up to float summation
order. Under torchrun the group is gloo on CPU and nccl on CUDA (collectives then run on cuda:LOCAL_RANK).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .distributed import DistEnv, current
from .fid import FeatureStats


def rank_slice(n: int, env: DistEnv | None = None) -> slice:
    """This rank's contiguous share of n samples; ValueError when a rank would get none."""
    env = env or current()
    if n < env.world_size:
        raise ValueError(f"evaluate: {n} samples cannot be shared by {env.world_size} ranks (raise evaluate.n_samples)")
    return slice(n * env.rank // env.world_size, n * (env.rank + 1) // env.world_size)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """All ranks' (n_r, ...) tensors concatenated in rank order, on every rank (a single process: x itself)."""
    env = current()
    if env.world_size == 1:
        return x
    device = _device()
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(env.world_size)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=device))
    sizes = [int(s) for s in sizes]
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=device)
    padded[: x.shape[0]] = x.to(device)
    parts = [torch.empty_like(padded) for _ in range(env.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:k] for p, k in zip(parts, sizes)]).to(x.device)


def gather_stats(stats: FeatureStats) -> FeatureStats:
    """The statistics of all ranks' features, merged in rank order, on every rank."""
    if current().world_size == 1:
        return stats
    parts = gather_rows(torch.from_numpy(stats.packed())[None])
    merged = FeatureStats()
    for v in parts.numpy():
        merged.merge(FeatureStats.unpacked(v))
    return merged


def gather_scores(scores) -> None:
    """Replace an `ImageScores`' statistics and CLIP cosines by those of every rank's share, in rank order."""
    if current().world_size == 1:
        return
    scores.stats = gather_stats(scores.stats)
    if scores.cosines:
        scores.cosines = [gather_rows(torch.cat(scores.cosines).double().cpu())]

