"""Speed settings for CUDA: torch.compile modes, channels_last, fused AdamW, autocast precision. On the CPU each is a
no-op by default."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Optional

import torch
from torch import nn

COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
# The repeated blocks that regional compilation compiles one by one (diffusers' `_repeated_blocks` and the resnets).
REGIONS = ("BasicTransformerBlock", "ResnetBlock2D")
PRECISIONS = ("fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _resolved(field: str, value: str, choices: tuple, auto: str) -> str:
    """`value`, or `auto`'s resolution when it is "auto"; anything outside `choices` is refused naming `field`."""
    if value == "auto":
        return auto
    if value not in choices:
        raise ValueError(f"{field} must be auto or one of {choices}, got {value!r}")
    return value


def resolve_compile(mode: str, device: torch.device) -> str:
    """`auto` -> default (inductor kernels, no CUDA graphs) on CUDA, none elsewhere."""
    return _resolved("compile", mode, COMPILE_MODES, "default" if device.type == "cuda" else "none")


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> bf16 autocast on CUDA, fp32 elsewhere."""
    return _resolved("precision", precision, PRECISIONS, "bf16" if device.type == "cuda" else "fp32")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast region of a resolved precision; fp32 runs outside any autocast."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def resolve_channels_last(flag: Optional[bool], device: torch.device) -> bool:
    """None -> on for CUDA (cuDNN's NHWC kernels skip the layout transposes), off elsewhere."""
    return device.type == "cuda" if flag is None else bool(flag)


def resolve_compile_scope(scope: str, gradient_checkpointing: bool) -> str:
    """`auto` -> blocks under gradient checkpointing (tracing a whole UNet through its checkpoint wrappers takes
    dynamo many minutes), model otherwise."""
    return _resolved("compile_scope", scope, ("model", "blocks"), "blocks" if gradient_checkpointing else "model")


def compile_in_place(module: nn.Module, mode: str, backend: str = "inductor", scope: str = "model") -> nn.Module:
    """`module.compile(...)`: forward is compiled, the module (and its state_dict keys) stay the same object.
    scope=blocks compiles each REGIONS block inside instead (regional compilation), or the module if it has none."""
    if mode == "none":
        return module
    options = {"backend": backend, "dynamic": False}
    if backend == "inductor":
        options["mode"] = mode
    blocks = [m for m in module.modules() if type(m).__name__ in REGIONS] if scope == "blocks" else []
    if not blocks:
        module.compile(**options)
        return module
    # One block class runs at several widths and batch sizes: sizes that change become symbolic after the first
    # recompile instead of one graph per size, and the recompile limit leaves room for the block variants.
    options["dynamic"] = None
    import torch._dynamo.config as dynamo

    name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    setattr(dynamo, name, max(getattr(dynamo, name), 64))
    for block in blocks:
        block.compile(**options)
    return module


def compiled(fn: Callable, mode: str, backend: str = "inductor") -> Callable:
    """A compiled wrapper of a module or function that must not be changed in place (a shared teacher)."""
    if mode == "none":
        return fn
    if backend != "inductor":
        return torch.compile(fn, backend=backend, dynamic=False)
    return torch.compile(fn, mode=mode, dynamic=False)


def channels_last(module: nn.Module) -> nn.Module:
    """Store the module's 4-D weights as NHWC (values unchanged)."""
    return module.to(memory_format=torch.channels_last)


def adamw(params: Iterable[torch.nn.Parameter], device: torch.device, **options) -> torch.optim.AdamW:
    """AdamW; the fused CUDA kernel (one launch for all parameters) when the parameters live on CUDA."""
    params = list(params)
    if device.type == "cuda":
        options["fused"] = True
    return torch.optim.AdamW(params, **options)


def mark_step() -> None:
    """Start a new CUDA-graph generation: outputs of the previous training step may now be overwritten."""
    if hasattr(torch, "compiler") and hasattr(torch.compiler, "cudagraph_mark_step_begin"):
        torch.compiler.cudagraph_mark_step_begin()


def match_state_layout(opt: torch.optim.Optimizer) -> None:
    """After `load_state_dict`: give each moment the memory layout of its parameter (a checkpoint is NCHW)."""
    for group in opt.param_groups:
        for p in group["params"]:
            for name, v in opt.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    opt.state[p][name] = torch.empty_like(p).copy_(v)
