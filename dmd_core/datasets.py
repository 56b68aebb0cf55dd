"""Real datasets known by name (`data.name`): images in [-1, 1] and labels, embedded and offline."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .digits import load_digits

DATASETS: dict[str, Callable[[], tuple[torch.Tensor, torch.Tensor]]] = {"digits": load_digits}
# The evaluation protocol a run of each dataset gets when `evaluate.protocol` is unset.
DEFAULT_PROTOCOLS: dict[str, str] = {"digits": "digits"}


def real_dataset(name: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) of a named dataset, or None when `name` has none (e.g. 'none')."""
    loader = DATASETS.get(name)
    return loader() if loader is not None else None
