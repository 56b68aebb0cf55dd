"""Data-parallel DMD training (DDP, or FSDP2 for full weights): the process group, rank-split streams, `DDPTrainer`
and `FSDPTrainer`.

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

FSDP2 (`distill.parallel=fsdp2`). The same batches, draws and agreement as DDP; G, the fake score, G's EMA and the
frozen teacher are each sharded over the ranks with `fully_shard`, per transformer / resnet block and then as a
whole, so every rank holds 1/world_size of each network and of the optimizer moments. Parameters are held in
bf16 with fp32 gradient reduction on CUDA with distill.bf16 (`MixedPrecisionPolicy`), as they are on the CPU.
Checkpoints gather the shards into the files one process writes (every rank takes part; rank 0 writes), and a
resume shards them again, so a run resumes exactly at the same world size and its checkpoints export as any.

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
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import accel
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


def join_ranks(trainer: DMDTrainer, env: DistEnv) -> None:
    """What every parallel wrapper gives a rank's trainer: draws for the global batch sliced by rank, agreement
    through the process group, and this rank's torch generators seeded from (seed, rank)."""
    trainer.draws = Draws(trainer.rng, trainer.device, env.rank, env.world_size)
    trainer.collective = DDPCollective(env, trainer.device)
    torch.manual_seed(rank_seed(trainer.cfg.seed, env.rank))


def data_parallel(trainer: DMDTrainer, env: DistEnv) -> DMDTrainer:
    """Compose DDP onto a built trainer from outside: generator and fake score wrapped in DDP (the real score stays
    frozen and unwrapped), draws made for the global batch and sliced by rank, agreement through the process group.
    With the DMD2 GAN head the fake score and the head average their gradients through per-parameter hooks instead
    of DDP: the GAN loss reaches the fake score through hooked bottleneck features, which DDP cannot follow."""
    join_ranks(trainer, env)
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


def rank_trainer(cfg: DistillConfig, teacher, pairs: Optional[Stream], real: Optional[Stream], env: DistEnv,
                 **kwargs) -> DMDTrainer:
    """One rank's `DMDTrainer`: built with the per-rank batch (batch sizes are global) and rank slices of the
    global-batch streams; a parallel wrapper composes onto it."""
    W = env.world_size
    local = cfg.model_copy(update={"batch_size": cfg.batch_size // W,
                                   "reg_batch_size": cfg.reg_batch_size // W if cfg.reg_batch_size else None})
    pairs = RankSlice(pairs, env.rank, W) if pairs is not None else None
    real = RankSlice(real, env.rank, W) if real is not None else None
    return DMDTrainer(local, teacher, pairs=pairs, real=real, **kwargs)


def DDPTrainer(cfg: DistillConfig, teacher, *, pairs: Optional[Stream] = None, real: Optional[Stream] = None,
               dist_env: Optional[DistEnv] = None, **kwargs) -> DMDTrainer:
    """A `DMDTrainer` for one rank of a DDP job (`rank_trainer`), composed with `data_parallel`."""
    env = dist_env or current()
    return data_parallel(rank_trainer(cfg, teacher, pairs, real, env, **kwargs), env)


# Blocks each sharded on their own (one all-gather per block in forward and backward): the regional-compile
# blocks of the UNets and the transformer blocks of SD3 and FLUX.
SHARD_BLOCKS = (*accel.REGIONS, "JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock")


def shard_module(module: nn.Module, policy) -> None:
    """`fully_shard` each block of `module` (innermost first), then the module itself (what is left)."""
    from torch.distributed.fsdp import fully_shard

    for block in reversed([m for m in module.modules() if type(m).__name__ in SHARD_BLOCKS and m is not module]):
        fully_shard(block, mp_policy=policy)
    fully_shard(module, mp_policy=policy)


def _rebind(opt: torch.optim.Optimizer, before: dict[int, str], after: dict[str, nn.Parameter]) -> None:
    """Point an optimizer (no steps taken yet) at the sharded parameters that replaced the ones it was built with."""
    for group in opt.param_groups:
        group["params"] = [after[before[id(p)]] for p in group["params"]]


def fully_sharded(trainer: DMDTrainer, env: DistEnv) -> DMDTrainer:
    """Compose FSDP2 onto a built full-weight trainer from outside (see the module docstring); its optimizers are
    pointed at the sharded parameters."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if trainer.gan_head is not None or trainer.students.shares_teacher:
        raise ValueError("FSDP2 shards full-weight students without a GAN head: use parallel=ddp")
    join_ranks(trainer, env)
    bf16 = trainer.device.type == "cuda" and trainer.cfg.bf16
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
              else MixedPrecisionPolicy())
    names = {id(p): n for n, p in trainer.G.named_parameters()}
    fake_names = {id(p): n for n, p in trainer.mu_fake.named_parameters()}
    for module in (trainer.G.denoiser, trainer.mu_fake, trainer.ema, trainer.teacher_denoiser):
        if isinstance(module, nn.Module) and any(True for _ in module.parameters()):
            shard_module(module, policy)
    _rebind(trainer.opt_G, names, dict(trainer.G.named_parameters()))
    if trainer.opt_fake is not None:
        _rebind(trainer.opt_fake, fake_names, dict(trainer.mu_fake.named_parameters()))
    return trainer


def FSDPTrainer(cfg: DistillConfig, teacher, *, pairs: Optional[Stream] = None, real: Optional[Stream] = None,
                dist_env: Optional[DistEnv] = None, **kwargs) -> DMDTrainer:
    """A `DMDTrainer` for one rank of an FSDP2 job (`rank_trainer`), composed with `fully_sharded`."""
    env = dist_env or current()
    return fully_sharded(rank_trainer(cfg, teacher, pairs, real, env, **kwargs), env)
