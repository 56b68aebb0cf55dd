"""Where a task runs: inside a Dask worker of a local cluster, pick that worker's own GPU."""
from __future__ import annotations

import torch


def pin_worker_gpu() -> None:
    """In Dask worker `i` of a local cluster (names 0, 1, ...), make cuda:i mod #GPUs the current device."""
    if not torch.cuda.is_available():
        return
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):  # not inside a Dask worker
        return
    if isinstance(name, int) or str(name).isdigit():
        torch.cuda.set_device(int(name) % torch.cuda.device_count())
