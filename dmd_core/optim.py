"""The trainer's optimizer steps: parameter groups with a learning-rate scale, gradient clipping and lr warm-up,
and the non-finite check that skips an update on every process alike."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .draws import Collective


def guidance_groups(module: nn.Module, params: list, lr_scale: float) -> list[dict]:
    """Two parameter groups: the guidance projection (lr x `lr_scale`) and everything else."""
    ids = {id(p) for n, p in module.named_parameters() if "guidance" in n or "cond_proj" in n}
    return [{"params": [p for p in params if id(p) not in ids]},
            {"params": [p for p in params if id(p) in ids], "lr_scale": lr_scale}]


def clip_and_step(loss: torch.Tensor, opt: torch.optim.Optimizer, lr: float, grad_clip: float, warmup_steps: int,
                  step: int, collective: Collective) -> Optional[float]:
    """Backward, clip the optimizer's parameters' gradients to `grad_clip`, set each group's lr (linear warm-up
    over `warmup_steps`), step; returns the grad norm, or None if anything was non-finite. (The optimizer's
    parameters, not the module's: a sharded module shows its unsharded parameters between forward and backward.)

    The loss and the norm are checked together after backward: one host synchronisation per update.
    """
    if not collective.all_finite(loss):  # skipped on every process (DDP needs every rank's backward)
        return None
    loss.backward()
    params = [p for group in opt.param_groups for p in group["params"]]
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if hasattr(norm, "full_tensor"):  # sharded gradients (FSDP2): the norm over all ranks' shards
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm)
    if not bool(torch.isfinite(loss.detach()) & torch.isfinite(norm)):
        return None
    for group in opt.param_groups:
        scaled = lr * group.get("lr_scale", 1.0)
        group["lr"] = scaled * min(1.0, (step + 1) / warmup_steps) if warmup_steps else scaled
    opt.step()
    return float(norm)
