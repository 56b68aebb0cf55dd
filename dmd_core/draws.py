"""The trainer's random draws and cross-process agreements, as objects a parallel wrapper replaces from outside.

`Draws`: every per-sample draw (noise, levels, conditions, guidance scales) is made for the global batch of
`world_size x n` samples from the trainer's generator, and this process keeps its slice [rank n, (rank + 1) n); so
the numbers a sample sees do not depend on how the batch is split. One process: world_size 1, the whole draw.

`Collective`: what processes must agree on (a compile decision, whether an update is finite, the reported losses,
the per-process torch generators in a checkpoint). One process: itself. `dmd_core.distributed` gives the DDP one.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .conditions import Conditions, RawConditions


class Draws:
    """Global-batch draws from `rng`, sliced to this process (rank of world_size)."""

    def __init__(self, rng: torch.Generator, device: torch.device, rank: int = 0, world_size: int = 1) -> None:
        self.rng, self.device, self.rank, self.world_size = rng, device, rank, world_size

    def mine(self, x):
        """This process's slice of a global-batch draw (a tensor or a list)."""
        if self.world_size == 1:
            return x
        n = len(x) // self.world_size
        return x[self.rank * n:(self.rank + 1) * n]

    def randn(self, n: int, shape: Sequence[int], dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Standard normal samples of `shape`."""
        return self.mine(torch.randn((n * self.world_size, *shape), generator=self.rng, device=self.device,
                                     dtype=dtype))

    def levels(self, process, n: int, lo: float, hi: float) -> torch.Tensor:
        """Training levels in [lo, hi) of `process` (DMD Alg. 2-3)."""
        return self.mine(process.draw_levels(n * self.world_size, lo, hi, self.rng, self.device))

    def index(self, n: int) -> int:
        """One index in [0, n) shared by every process (e.g. the backward-simulation step k)."""
        return int(torch.randint(0, n, (1,), generator=self.rng, device=self.device).item()) if n > 1 else 0

    def conditions(self, source: Optional[Conditions], n: int) -> RawConditions:
        """Raw conditions (class ids or prompts) from `source`, or None."""
        return None if source is None else self.mine(source.sample(n * self.world_size, self.rng, self.device))

    def guidance(self, n: int, w_range: Sequence[float], law: str) -> torch.Tensor:
        """Guidance scales in [w_min, w_max]: uniform, or uniform in log w (both from one `torch.rand` draw)."""
        w_min, w_max = float(w_range[0]), float(w_range[1])
        u = self.mine(torch.rand((n * self.world_size,), generator=self.rng, device=self.device))
        if law == "uniform":
            return w_min + (w_max - w_min) * u
        if law == "log-uniform":
            return torch.exp(math.log(w_min) + (math.log(w_max) - math.log(w_min)) * u)
        raise ValueError(f"guidance_law must be one of ('uniform', 'log-uniform'), got {law!r}")


class Collective:
    """Agreement across the processes of a job; one process agrees with itself."""

    world_size = 1

    def agree(self, flag: bool) -> bool:
        """Rank 0's decision on every rank."""
        return flag

    def all_finite(self, loss: torch.Tensor) -> bool:
        """Whether every process's loss is finite (a skipped update must be skipped everywhere)."""
        return True

    def mean(self, values: list[float]) -> list[float]:
        """The means over processes."""
        return values

    def save_rng(self, rng: dict[str, torch.Tensor], state: dict) -> None:
        """Add every process's torch generator states to a checkpoint's `rng` tensors and `state`."""

    def load_rng(self, rng: dict[str, torch.Tensor], state: dict, seed: int, step: int) -> None:
        """Restore this process's torch generators from a checkpoint written by `save_rng`."""
