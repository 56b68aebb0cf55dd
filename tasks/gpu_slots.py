"""The `gpu` global concurrency limit: every stage that may use a GPU holds slots of it while it runs.

`dmd deploy` creates the limit with one slot per GPU of the pool, so a nightly evaluation waits for a training run
on the same GPUs instead of sharing them. Without the limit (a plain `dmd run`) nothing is enforced.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from tasks.config import PipelineConfig

GPU_LIMIT = "gpu"


@contextlib.contextmanager
def gpu_slots(cfg: PipelineConfig, occupy: int = 1) -> Iterator[None]:
    """Hold `occupy` slots of the `gpu` limit; a run pinned to the CPU (device=cpu) holds none."""
    if cfg.device == "cpu":
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(GPU_LIMIT, occupy=occupy):
        yield
