"""Data-parallel DMD training (DDP): the process group, rank-split streams and `DDPTrainer`.

Batches. `distill.batch_size` (and `reg_batch_size`) are global: each of the `world_size` ranks trains on
batch / world_size samples, DDP averages the gradients, so one optimizer step sees the gradient of the mean
loss over the global batch, as one process with the whole batch would.

Randomness. Every rank holds the trainer's generator seeded with `distill.seed`, in the same state. Each
per-sample draw (noise z, conditions, timesteps t, noise eps, re-noising of multi-step generators) is drawn
for the global batch and rank r keeps items [r b, (r + 1) b), where b is the per-rank batch; per-batch
draws (the backward-simulation step k) are shared. The numbers a sample sees therefore do not depend on
how the batch is split: a run with world_size W equals the one-process run with the same global batch up
to float summation order. torch's global generators (used only by layers such as dropout) are per rank,
seeded from (seed, rank). Pair streams are built with the global batch and sliced the same way
(`RankSlice`), so their position, like the trainer's generator, is the same on every rank.

Checkpoints. Rank 0 writes them; the weights, optimizers, the shared generator and the stream position are
the same on every rank, and the per-rank torch generator states of all ranks are gathered into
`rng.safetensors` as `rank{r}.torch_cpu` / `rank{r}.torch_cuda`. Resuming at the same world size restores
every rank's state exactly. Resuming at another world size (same global batch) is exact for everything
that defines the samples (weights, optimizer, shared generator, stream position); the per-rank torch
generators are re-derived from (seed, rank, step).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .conditions import hash_seed
from .config import DistillConfig
from .draws import Collective, Draws
from .streams import Stream
from .trainer import DMDTrainer


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job: global rank, rank on its node, number of processes."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1


def current() -> DistEnv:
    """The initialised process group's ranks, else a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistEnv()
    return DistEnv(dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size())


def init_process_group(device_type: str) -> DistEnv:
    """Join the group a launcher (torchrun) described in RANK/WORLD_SIZE/MASTER_ADDR: nccl on CUDA (this process
    on cuda:LOCAL_RANK), gloo on CPU. A no-op when already initialised."""
    if dist.is_initialized():
        return current()
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"distributed training needs a launcher's environment; {', '.join(missing)} not set "
                           "(use distill.launcher=torchrun, or start this process with torchrun)")
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return current()


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """Seed of rank `rank`'s torch generators, from (seed, rank, step)."""
    return hash_seed(seed, rank, step)


class RankSlice:
    """Rank `rank`'s part of a stream built with the global batch: items [rank b, (rank + 1) b) of each batch.

    The position is the inner stream's, the same on every rank and for any world size with equal global batch.
    """

    def __init__(self, stream: Stream, rank: int, world_size: int) -> None:
        total = int(stream.batch_size)
        if total % world_size:
            raise ValueError(f"the stream's global batch {total} is not divisible by world_size={world_size}")
        self.stream, self.rank, self.world_size = stream, rank, world_size
        self.batch_size = total // world_size

    def next_batch(self, device: torch.device | str = "cpu") -> dict[str, Any]:
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        batch = self.stream.next_batch("cpu")
        return {k: v[lo:hi].to(device) if isinstance(v, torch.Tensor) else v[lo:hi] for k, v in batch.items()}

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)


class DDPCollective(Collective):
    """Agreement over the process group: rank 0's decisions, all-or-none finite updates, mean losses, and every
    rank's torch generators gathered into checkpoints (see the module docstring)."""

    def __init__(self, env: DistEnv, device: torch.device) -> None:
        self.rank, self.world_size, self.device = env.rank, env.world_size, device

    def agree(self, flag: bool) -> bool:
        decision = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(decision, 0)
        return bool(decision.item())

    def all_finite(self, loss: torch.Tensor) -> bool:
        finite = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return finite.item() >= 1

    def mean(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world_size).tolist()

    def _rank_rng(self) -> torch.Tensor:
        parts = [torch.get_rng_state()]
        if self.device.type == "cuda":
            parts.append(torch.cuda.get_rng_state(self.device))
        return torch.cat(parts)

    def save_rng(self, rng: dict[str, torch.Tensor], state: dict) -> None:
        mine = self._rank_rng().to(self.device)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine)
        n_cpu = torch.get_rng_state().numel()
        for r, ranked in enumerate(gathered):
            ranked = ranked.cpu()
            rng[f"rank{r}.torch_cpu"] = ranked[:n_cpu]
            if self.device.type == "cuda":
                rng[f"rank{r}.torch_cuda"] = ranked[n_cpu:]
        state["world_size"] = self.world_size

    def load_rng(self, rng: dict[str, torch.Tensor], state: dict, seed: int, step: int) -> None:
        """This rank's generators from the checkpoint at the same world size, else re-derived from (seed, rank, step)."""
        if int(state.get("world_size", 1)) == self.world_size and f"rank{self.rank}.torch_cpu" in rng:
            torch.set_rng_state(rng[f"rank{self.rank}.torch_cpu"])
            if self.device.type == "cuda" and f"rank{self.rank}.torch_cuda" in rng:
                torch.cuda.set_rng_state(rng[f"rank{self.rank}.torch_cuda"], self.device)
        else:
            torch.manual_seed(rank_seed(seed, self.rank, step))


def data_parallel(trainer: DMDTrainer, env: DistEnv) -> DMDTrainer:
    """Compose DDP onto a built trainer from outside: generator and fake score wrapped in DDP (the real score stays
    frozen and unwrapped), draws made for the global batch and sliced by rank, agreement through the process group.
    With the DMD2 GAN head the fake score and the head average their gradients through per-parameter hooks instead
    of DDP: the GAN loss reaches the fake score through hooked bottleneck features, which DDP cannot follow."""
    trainer.draws = Draws(trainer.rng, trainer.device, env.rank, env.world_size)
    trainer.collective = DDPCollective(env, trainer.device)
    torch.manual_seed(rank_seed(trainer.cfg.seed, env.rank))
    ids = [torch.cuda.current_device()] if trainer.device.type == "cuda" else None
    trainer.G.denoiser = DistributedDataParallel(trainer.G.denoiser, device_ids=ids)
    if trainer.gan_head is not None:
        def average(p: torch.Tensor) -> None:
            dist.all_reduce(p.grad)
            p.grad.div_(env.world_size)

        for p in [*trainer.mu_fake.parameters(), *trainer.gan_head.parameters()]:
            dist.broadcast(p.data, 0)  # start from rank 0's head (DDP does this for the modules it wraps)
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(average)
    elif trainer.opt_fake is not None:
        trainer.mu_fake = DistributedDataParallel(trainer.mu_fake, device_ids=ids)
    return trainer


def DDPTrainer(cfg: DistillConfig, teacher, *, pairs: Optional[Stream] = None, real: Optional[Stream] = None,
               dist_env: Optional[DistEnv] = None, **kwargs) -> DMDTrainer:
    """A `DMDTrainer` for one rank of a DDP job: built with the per-rank batch (batch sizes are global) and rank
    slices of the global-batch streams, then composed with `data_parallel`."""
    env = dist_env or current()
    W = env.world_size
    local = cfg.model_copy(update={"batch_size": cfg.batch_size // W,
                                   "reg_batch_size": cfg.reg_batch_size // W if cfg.reg_batch_size else None})
    pairs = RankSlice(pairs, env.rank, W) if pairs is not None else None
    real = RankSlice(real, env.rank, W) if real is not None else None
    return data_parallel(DMDTrainer(local, teacher, pairs=pairs, real=real, **kwargs), env)
