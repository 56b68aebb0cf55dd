"""Condition sources: what a sample is conditioned on, before the teacher encodes it (class ids or prompts).

Pair generation picks the condition of sample i as a pure function of (seed, i), so any shard regenerates
identically; training draws conditions from the trainer's own generator, so resumption is exact.
"""
from __future__ import annotations

import hashlib
import json
from typing import Protocol, Sequence, Union

import torch

RawConditions = Union[None, torch.Tensor, list[str]]


def hash_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers with SHA-256 (independent of Python's hash salt)."""
    return int.from_bytes(hashlib.sha256(json.dumps(list(parts)).encode()).digest()[:8], "little") >> 1


class Conditions(Protocol):
    """Draws raw conditions for a batch of n samples from `generator`."""

    def sample(self, n: int, generator: torch.Generator, device: torch.device | str) -> RawConditions: ...

    def for_index(self, seed: int, index: int) -> Union[int, str]: ...


class ClassLabels:
    """Class ids uniform in [0, num_classes); sample i of a pair set has class i mod num_classes."""

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)

    def sample(self, n: int, generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
        return torch.randint(0, self.num_classes, (n,), generator=generator, device=device)

    def for_index(self, seed: int, index: int) -> int:
        return int(index) % self.num_classes


class Prompts:
    """Prompts drawn uniformly from a caption list; pair i gets prompts[hash(seed, i) mod len]."""

    def __init__(self, prompts: Sequence[str]) -> None:
        if not prompts:
            raise ValueError("the prompt list is empty")
        self.prompts = list(prompts)

    def sample(self, n: int, generator: torch.Generator, device: torch.device | str) -> list[str]:
        idx = torch.randint(0, len(self.prompts), (n,), generator=generator, device=device)
        return [self.prompts[i] for i in idx.tolist()]

    def for_index(self, seed: int, index: int) -> str:
        return self.prompts[hash_seed(seed, index, 1) % len(self.prompts)]  # salt 1: independent of the noise seed


def batch_conditions(source: Conditions | None, seed: int, indices: Sequence[int]) -> RawConditions:
    """The raw conditions of pair samples `indices` (class ids as a LongTensor, prompts as a list)."""
    if source is None:
        return None
    values = [source.for_index(seed, i) for i in indices]
    return torch.tensor(values, dtype=torch.long) if isinstance(source, ClassLabels) else values
