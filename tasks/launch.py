"""Data-parallel stages: start `world_size` ranks under torchrun (distill: each rank runs `tasks.ddp`; evaluate:
`tasks.eval_ranks`).

`launch_distill` runs `python -m torch.distributed.run ... -m tasks.ddp ROOT RUN` in a child process (one node:
`--standalone --nproc_per_node N`; several: c10d rendezvous at `distill.rdzv_endpoint`, the same command run
on every node). Each rank opens the same run (the artifact root is passed on; credentials stay in the
environment the ranks inherit) and runs `tasks.distill.run_distill`, which trains a `DDPTrainer`; rank 0
alone writes. A rank that fails makes torchrun stop the others; the parent then raises one error naming the
exit status, with the last lines the ranks printed.
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections import deque
from typing import Any, Callable

from dmd_core.config import PROJECT_DIR, DistillConfig
from dmd_core.distributed import current

_TAIL_LINES = 40
ERROR_TAG = "dmd-rank-error:"


class DistributedRunError(RuntimeError):
    """The ranks of a distributed stage failed; the message names the exit status and their last lines."""


def is_rank() -> bool:
    """True in a process torchrun started (or one already in a process group)."""
    return current().world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ


def wants_launch(d: DistillConfig) -> bool:
    """True when this process must start the distill ranks (it is not one of them already)."""
    return not is_rank() and (d.launcher == "torchrun" or (d.launcher == "auto" and d.world_size > 1))


def torchrun_command(root: str, run_name: str, force: bool, d: DistillConfig) -> list[str]:
    """The torchrun command line of this node (the same on every node of a multi-node run)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={d.world_size // d.nnodes}"]
    if d.nnodes == 1:
        cmd.append("--standalone")
    else:
        cmd += [f"--nnodes={d.nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={d.rdzv_endpoint}",
                f"--rdzv_id={d.rdzv_id}"]
    return cmd + ["-m", "tasks.ddp", root, run_name] + (["--force"] if force else [])


def launch_distill(root: str, run_name: str, force: bool, d: DistillConfig,
                   log: Callable[[str], Any] = print) -> None:
    """Run the distill stage as torchrun ranks and wait; DistributedRunError if they fail."""
    launch_ranks("distill", torchrun_command(root, run_name, force, d), d.world_size, d.nnodes, log)


def launch_evaluate(root: str, run_name: str, all_checkpoints: bool, world_size: int,
                    log: Callable[[str], Any] = print) -> None:
    """Run the evaluate stage as `world_size` torchrun ranks on this host and wait; DistributedRunError if they fail."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world_size}", "--standalone",
           "-m", "tasks.eval_ranks", root, run_name] + (["--all-checkpoints"] if all_checkpoints else [])
    launch_ranks("evaluate", cmd, world_size, 1, log)


def launch_ranks(stage: str, cmd: list[str], world_size: int, nnodes: int, log: Callable[[str], Any]) -> None:
    """Run a torchrun command line with the project on PYTHONPATH, relay its lines, raise on a failed rank."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_DIR), env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    log(f"{stage}: starting {world_size} ranks on {nnodes} node(s): {' '.join(cmd[1:])}")
    tail: deque[str] = deque(maxlen=_TAIL_LINES)
    errors: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            if line.startswith(ERROR_TAG):
                errors.append(line[len(ERROR_TAG):].strip())
            log(line)
        rc = proc.wait()
    if rc != 0:
        first = errors[0] if errors else "no rank reported an error (killed?)"
        raise DistributedRunError(f"{stage}: {first} (torchrun exit status {rc}, {world_size} ranks); "
                                  "last lines:\n" + "\n".join(tail))


def as_rank(work: Callable[[], Any], rank: int) -> None:
    """Run a rank's stage: a failure prints one tagged line the launching process turns into its error message,
    then propagates; the process group is left in any case."""
    import torch.distributed as dist

    try:
        work()
    except Exception as e:
        print(f"{ERROR_TAG} rank {rank} failed: {type(e).__name__}: {e}".replace("\n", " "), flush=True)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class RankStore:
    """The run's store as ranks other than 0 use it: reads pass through, writes and deletes are dropped."""

    _WRITES = frozenset({"write_bytes", "write_json", "write_table", "delete"})

    def __init__(self, store) -> None:
        self._store = store

    def __getattr__(self, name: str):
        if name in self._WRITES:
            return lambda *args, **kwargs: None
        if name == "open":
            return self._open
        return getattr(self._store, name)

    def _open(self, key: str, mode: str = "rb"):
        if "r" not in mode:
            raise PermissionError(f"rank {current().rank} may not write {key!r}: rank 0 writes the run")
        return self._store.open(key, mode)


def writer_store(store):
    """`store` on rank 0 (or a single process), a `RankStore` on the other ranks."""
    return store if current().rank == 0 else RankStore(store)
