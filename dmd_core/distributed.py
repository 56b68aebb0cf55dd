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

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import bytes_to_tensors, tensors_to_bytes
from .conditions import hash_seed
from .config import DistillConfig
from .guidance import sample_guidance
from .denoisers import Cond
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


def _inner(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


class DDPTrainer(DMDTrainer):
    """`DMDTrainer` on one rank of a DDP job: generator and fake score wrapped in DDP, the real score frozen and
    unwrapped, global-batch draws sliced by rank (see the module docstring). With the DMD2 GAN head the fake
    score and the head average their gradients through per-parameter hooks instead of DDP."""

    def __init__(self, cfg: DistillConfig, teacher, *, pairs: Optional[Stream] = None, real: Optional[Stream] = None,
                 dist_env: Optional[DistEnv] = None, **kwargs) -> None:
        env = dist_env or current()
        self.rank, self.world_size = env.rank, env.world_size
        W = self.world_size
        local = cfg.model_copy(update={"batch_size": cfg.batch_size // W,
                                       "reg_batch_size": cfg.reg_batch_size // W if cfg.reg_batch_size else None})
        pairs = RankSlice(pairs, self.rank, W) if pairs is not None else None
        real = RankSlice(real, self.rank, W) if real is not None else None
        super().__init__(local, teacher, pairs=pairs, real=real, **kwargs)
        torch.manual_seed(rank_seed(cfg.seed, self.rank))
        ids = [torch.cuda.current_device()] if self.device.type == "cuda" else None
        self.G.denoiser = DistributedDataParallel(self.G.denoiser, device_ids=ids)
        if self.gan_head is not None:
            # The GAN loss reaches the fake score through hooked bottleneck features, not its output, which DDP
            # cannot follow: average the fake score's and the head's gradients as they accumulate instead.
            for p in [*self.mu_fake.parameters(), *self.gan_head.parameters()]:
                dist.broadcast(p.data, 0)  # start from rank 0's head (DDP does this for the modules it wraps)
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(self._average_grad)
        elif self.opt_fake is not None:
            self.mu_fake = DistributedDataParallel(self.mu_fake, device_ids=ids)

    def _average_grad(self, p: torch.Tensor) -> None:
        dist.all_reduce(p.grad)
        p.grad.div_(self.world_size)

    # ---- global-batch draws, this rank's slice ----------------------------------------------
    def _mine(self, x):
        n = len(x) // self.world_size
        return x[self.rank * n:(self.rank + 1) * n]

    def _randn(self, n: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        shape = (n * self.world_size, *self.sample_shape)
        return self._mine(torch.randn(shape, generator=self.rng, device=self.device, dtype=dtype))

    def _randint(self, lo: int, hi: int, n: int) -> torch.Tensor:
        return self._mine(torch.randint(lo, hi, (n * self.world_size,), generator=self.rng, device=self.device))

    def _cond(self, n: int) -> Cond:
        if self.conditions is None:
            return None
        return self.encode(self._mine(self.conditions.sample(n * self.world_size, self.rng, self.device)))

    def _guidance(self, n: int) -> Optional[torch.Tensor]:
        if self.cfg.guidance_range is None:
            return None
        return self._mine(sample_guidance(n * self.world_size, self.cfg.guidance_range, self.cfg.guidance_law,
                                          self.rng, self.device))

    # ---- steps agree across ranks ------------------------------------------------------------
    def agree(self, flag: bool) -> bool:
        """Rank 0's decision on every rank (e.g. compile=auto's, timed per rank)."""
        decision = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(decision, 0)
        return bool(decision.item())

    def _clip_and_step(self, loss: torch.Tensor, params, opt: torch.optim.Optimizer, lr: float) -> Optional[float]:
        """Skip the update on every rank when any rank's loss is non-finite (DDP needs every rank's backward)."""
        finite = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() < 1:
            return None
        return super()._clip_and_step(loss, params, opt, lr)

    def train_step(self) -> dict:
        """One iteration on every rank; the losses reported are the means over the global batch."""
        metrics = super().train_step()
        keys = sorted(k for k, v in metrics.items() if k.startswith("loss_") and isinstance(v, float))
        if keys:
            values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self.device)
            dist.all_reduce(values)
            metrics.update(zip(keys, (values / self.world_size).tolist()))
        return metrics

    # ---- checkpoints ----------------------------------------------------------------------------
    @contextmanager
    def _unwrapped(self):
        G, fake = self.G.denoiser, self.mu_fake
        self.G.denoiser, self.mu_fake = _inner(G), _inner(fake)
        try:
            yield
        finally:
            self.G.denoiser, self.mu_fake = G, fake

    def _rank_rng(self) -> torch.Tensor:
        parts = [torch.get_rng_state()]
        if self.device.type == "cuda":
            parts.append(torch.cuda.get_rng_state(self.device))
        return torch.cat(parts)

    def state_files(self) -> dict[str, bytes]:
        """The single-process files plus every rank's torch generator states (a collective: call on all ranks)."""
        with self._unwrapped():
            files = super().state_files()
        mine = self._rank_rng().to(self.device)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine)
        rng = bytes_to_tensors(files["rng.safetensors"])
        n_cpu = torch.get_rng_state().numel()
        for r, state in enumerate(gathered):
            state = state.cpu()
            rng[f"rank{r}.torch_cpu"] = state[:n_cpu]
            if self.device.type == "cuda":
                rng[f"rank{r}.torch_cuda"] = state[n_cpu:]
        files["rng.safetensors"] = tensors_to_bytes(rng)
        state = json.loads(files["trainer_state.json"])
        state["world_size"] = self.world_size
        files["trainer_state.json"] = json.dumps(state, sort_keys=True, indent=2).encode()
        return files

    def load_state_files(self, files: dict[str, bytes]) -> None:
        """Restore; this rank's torch generators come from the checkpoint at the same world size, else are
        re-derived from (seed, rank, step)."""
        with self._unwrapped():
            super().load_state_files(files)
        rng = bytes_to_tensors(files["rng.safetensors"])
        saved_world = int(json.loads(files["trainer_state.json"]).get("world_size", 1))
        if saved_world == self.world_size and f"rank{self.rank}.torch_cpu" in rng:
            torch.set_rng_state(rng[f"rank{self.rank}.torch_cpu"])
            if self.device.type == "cuda" and f"rank{self.rank}.torch_cuda" in rng:
                torch.cuda.set_rng_state(rng[f"rank{self.rank}.torch_cuda"], self.device)
        else:
            torch.manual_seed(rank_seed(self.cfg.seed, self.rank, self.step))
