"""The Prefect task runner of the pairs stage (`pairs.runner`): a thread pool, Dask or Ray, one GPU a shard task.

Dask (prefect-dask): `pairs.runner_address` names a running scheduler (`tcp://host:8786`), else a local cluster
of `pairs.runner_workers` worker processes, one thread and one `GPU` resource each, is started for the stage;
on a host with several GPUs worker k uses GPU k mod (GPUs visible) (`tasks.context.worker_gpu`).
On a GPU run every shard task asks for `GPU=1`, so each worker of a remote cluster must be started with
`--resources GPU=1` (one worker per GPU, e.g. `CUDA_VISIBLE_DEVICES=i dask worker ... --resources GPU=1`).
A worker that dies loses nothing: Dask reruns its tasks on the others, and a shard is written only whole
(sha256 in the manifest), so the manifest is the same whatever the runner and whatever failed.
Ray (prefect-ray): `pairs.runner_address` or a local Ray; on a GPU run each task asks for `num_gpus=1`.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

from tasks.config import PipelineConfig


def pairs_task_runner(cfg: PipelineConfig) -> Optional[Any]:
    """The task runner `pairs.runner` names; None for the flow's own thread pool."""
    p = cfg.pairs
    if p.runner == "threads":
        return None
    if p.runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise RuntimeError("pairs.runner=dask needs prefect-dask: pip install prefect-dask") from None
        if p.runner_address:
            return DaskTaskRunner(address=p.runner_address)
        return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                              cluster_kwargs={"n_workers": p.runner_workers, "threads_per_worker": 1,
                                              "processes": True, "resources": {"GPU": 1},
                                              "dashboard_address": None})
    try:
        from prefect_ray import RayTaskRunner
    except ImportError:
        raise RuntimeError("pairs.runner=ray needs prefect-ray: pip install prefect-ray") from None
    if p.runner_address:
        return RayTaskRunner(address=p.runner_address)
    return RayTaskRunner(init_kwargs={"num_cpus": p.runner_workers})


def tasks_use_gpus(cfg: PipelineConfig) -> bool:
    """device=cuda, or auto on a host with CUDA: a CPU-only host's device=auto run asks for no GPU (a task asking
    a local Ray for one there would never be scheduled). Point device=cuda at a remote GPU cluster."""
    if cfg.device == "auto":
        import torch

        return torch.cuda.is_available()
    return cfg.device == "cuda"


@contextlib.contextmanager
def one_gpu_per_task(cfg: PipelineConfig) -> Iterator[None]:
    """Tasks submitted inside ask their engine for one GPU (on a run that uses GPUs)."""
    if cfg.pairs.runner == "threads" or not tasks_use_gpus(cfg):
        yield
    elif cfg.pairs.runner == "dask":
        import dask

        with dask.annotate(resources={"GPU": 1}):
            yield
    else:
        from prefect_ray.context import remote_options

        with remote_options(num_gpus=1):
            yield
