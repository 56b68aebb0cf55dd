"""Data streams with exact, serialisable positions: the `Stream` protocol and in-memory pairs (DMD §3.3)."""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Stream(Protocol):
    """An endless source of mini-batches whose position is a small JSON-serialisable state.

    The trainer checkpoints a stream through `state_dict()`/`load_state_dict()` alone (torchtitan's
    `Stateful`), so an in-memory `TensorStream` and a sharded `storage.ShardStream` are interchangeable.
    After `load_state_dict(s.state_dict())` on a fresh stream, `next_batch` returns exactly the batches
    the original would have returned next.
    """

    def next_batch(self, device: torch.device | str = "cpu") -> dict[str, Any]:
        """The next batch: {"z", "y", ...} tensors on `device` (plus an optional "cond")."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The stream position as a JSON-serialisable dict."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position produced by `state_dict()`."""
        ...


def check_streams(cfg, pairs, real, lpips_model) -> None:
    """The streams a distill config needs: pairs for a regression, real images for the GAN; refused in one line
    naming the field."""
    if cfg.regression != "none" and pairs is None:
        raise ValueError("distill.regression needs a pair stream; set distill.regression=none for DMD2 without it")
    if cfg.regression == "lpips" and lpips_model is None:
        raise ValueError("distill.regression=lpips needs an LPIPS model")
    if cfg.gan_used and real is None:
        raise ValueError("distill.gan.enabled needs a stream of real images")
    reg_batch = getattr(pairs, "batch_size", None)
    if cfg.regression != "none" and cfg.reg_batch_size and reg_batch and reg_batch != cfg.reg_batch_size:
        raise ValueError(f"distill.reg_batch_size={cfg.reg_batch_size} but the pair stream yields batches of "
                         f"{reg_batch}")
    if cfg.concat_regression and len(cfg.generator_timesteps) > 1:
        raise ValueError("distill.concat_regression needs a one-step generator (one generator timestep)")


class TensorStream:
    """Endless shuffled mini-batches over equal-length tensors (or lists, e.g. prompts); epoch e uses permutation
    seed + e."""

    def __init__(self, tensors: dict[str, torch.Tensor | list], batch_size: int, seed: int = 0) -> None:
        lengths = {k: len(v) for k, v in tensors.items()}
        if not tensors or len(set(lengths.values())) != 1:
            raise ValueError(f"stream tensors must be non-empty and equally long, got {lengths}")
        self.tensors = tensors
        self.n = next(iter(lengths.values()))
        if batch_size > self.n:
            raise ValueError(f"batch_size {batch_size} exceeds the {self.n} samples in the stream")
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._perm = self._permutation()

    def _permutation(self) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))

    def next_batch(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The next batch (drop-last within an epoch), moved to `device`."""
        if self.position + self.batch_size > self.n:
            self.epoch, self.position = self.epoch + 1, 0
            self._perm = self._permutation()
        idx = self._perm[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return {k: v[idx].to(device) if isinstance(v, torch.Tensor) else [v[i] for i in idx.tolist()]
                for k, v in self.tensors.items()}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        self._perm = self._permutation()
