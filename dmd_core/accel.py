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
# The blocks each scope compiles: the first of its choices that the network has (attention: the transformer blocks
# alone, fewer variants to compile than a resnet at every width; a network without any: its resnets).
SCOPE_REGIONS = {"blocks": (REGIONS,), "attention": (("BasicTransformerBlock",), REGIONS)}
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
    """`auto` -> default (inductor kernels, no CUDA graphs) on CUDA, none elsewhere. The trainer applies auto's
    `default` only once `CompileWhenItPays` says the run is long enough."""
    return _resolved("compile", mode, COMPILE_MODES, "default" if device.type == "cuda" else "none")


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> bf16 autocast on CUDA, fp32 elsewhere."""
    return _resolved("precision", precision, PRECISIONS, "bf16" if device.type == "cuda" else "fp32")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast region of a resolved precision; fp32 runs outside any autocast."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def resolve_channels_last(flag: Optional[bool], device: torch.device, lora: bool = False) -> bool:
    """None -> on for CUDA (cuDNN's NHWC kernels skip the layout transposes), off elsewhere; off for LoRA students,
    whose low-rank convolutions ran slower in NHWC (SDXL DMD2 LoRA step on an H100: 1.08x faster without it)."""
    return device.type == "cuda" and not lora if flag is None else bool(flag)


def resolve_compile_scope(scope: str, gradient_checkpointing: bool, lora: bool = False) -> str:
    """`auto` -> blocks under gradient checkpointing (tracing a whole UNet through its checkpoint wrappers takes
    dynamo many minutes), attention there for LoRA students (each adapter state is a variant of every block
    compiled: the resnets at each width made an SDXL compile run past 6 minutes), model otherwise."""
    auto = ("attention" if lora else "blocks") if gradient_checkpointing else "model"
    return _resolved("compile_scope", scope, ("model", "blocks", "attention"), auto)


def compile_in_place(module: nn.Module, mode: str, backend: str = "inductor", scope: str = "model") -> nn.Module:
    """`module.compile(...)`: forward is compiled, the module (and its state_dict keys) stay the same object.
    scope=blocks compiles each REGIONS block inside instead (regional compilation), scope=attention each transformer
    block only (the REGIONS blocks if it has none); either compiles the module as a whole if it has no such block."""
    if mode == "none":
        return module
    options = {"backend": backend, "dynamic": False}
    if backend == "inductor":
        options["mode"] = mode
    blocks = []
    for regions in SCOPE_REGIONS.get(scope, ()):
        blocks = blocks or [m for m in module.modules() if type(m).__name__ in regions]
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


def unwrap_ddp(module: nn.Module) -> nn.Module:
    """The module a DistributedDataParallel wraps (compiled in place, as before wrapping), else `module`."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def full_state(obj):
    """A state dict (nested dicts and lists) with every DTensor gathered to its full tensor (a collective: every
    rank calls it); plain tensors and other values as they are. An unsharded state is returned unchanged."""
    from torch.distributed.tensor import DTensor

    if isinstance(obj, DTensor):
        return obj.full_tensor()
    if isinstance(obj, dict):
        return {k: full_state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [full_state(v) for v in obj]
    return obj


def shard_like(value, ref):
    """`value` (a full tensor) laid out as `ref` is: this rank's shard when `ref` is a DTensor (no communication:
    every rank holds the full value), else `value` itself."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(ref, DTensor) or isinstance(value, DTensor):
        return value
    return distribute_tensor(value.to(ref.device, ref.dtype), ref.device_mesh, ref.placements, src_data_rank=None)


def load_module_state(module: nn.Module, state: dict) -> None:
    """`module.load_state_dict(state)` from full tensors, sharded on the way in when the module is (FSDP2)."""
    own = module.state_dict()
    module.load_state_dict({k: shard_like(v, own[k]) if k in own else v for k, v in state.items()})


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict) -> None:
    """`opt.load_state_dict(state)` from full tensors: each moment sharded as its parameter is."""
    params = [p for group in opt.param_groups for p in group["params"]]
    moments = {i: {k: shard_like(v, params[int(i)]) if isinstance(v, torch.Tensor) and v.dim() else v
                   for k, v in per.items()} for i, per in state["state"].items()}
    opt.load_state_dict({**state, "state": moments})


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


# distill.compile=auto on CUDA: the trainer starts eager, times PROBE_STEPS steps (after a first warm-up step) and
# compiles once when the steps left repay the compile time. Constants measured on an H200 (docs/benchmarks.md,
# "When compiling pays"): a cold compile of the trainer's networks takes minutes whatever their size, compiled
# steps save 25-45 % of an eager step, and torch's cache artifacts saved with the run cut a later compile to a
# fraction of the cold time.
PROBE_STEPS = 3
COLD_COMPILE_S = 225.0
CACHED_COMPILE_FRACTION = 0.25
COMPILED_STEP_SAVING = 0.25


def expected_compile_s(cached: bool) -> float:
    """COLD_COMPILE_S, or CACHED_COMPILE_FRACTION of it with the run's compile cache loaded."""
    return COLD_COMPILE_S * (CACHED_COMPILE_FRACTION if cached else 1.0)


def compile_pays(steps_left: int, eager_step_s: float, cached: bool) -> bool:
    """Compile when steps_left x the saving per step (COMPILED_STEP_SAVING of an eager step) exceeds the compile
    time expected (`expected_compile_s`)."""
    return steps_left * COMPILED_STEP_SAVING * eager_step_s > expected_compile_s(cached)


class CompileWhenItPays:
    """The `auto` decision of one run: `observe(seconds)` after each eager step; True once, when to compile now."""

    def __init__(self, steps_left: int, cached: bool) -> None:
        self.steps_left, self.cached = steps_left, cached
        self.times: list[float] = []
        self.decided: Optional[bool] = None if steps_left > PROBE_STEPS + 1 else False
        self.eager_step_s: Optional[float] = None

    def observe(self, step_seconds: float) -> bool:
        if self.decided is not None:
            return False
        self.steps_left -= 1
        self.times.append(step_seconds)
        if len(self.times) <= PROBE_STEPS:  # the first step warms up (allocator, cuDNN): not counted
            return False
        self.eager_step_s = sorted(self.times[1:])[PROBE_STEPS // 2]
        self.decided = compile_pays(self.steps_left, self.eager_step_s, self.cached)
        return self.decided

    def explain(self) -> str:
        """One line for the log: what was decided and on which numbers."""
        if self.eager_step_s is None:
            return "distill.compile=auto: eager (too few steps to time and repay a compile)"
        compile_s = expected_compile_s(self.cached)
        saved = self.steps_left * COMPILED_STEP_SAVING * self.eager_step_s
        verdict = "compiling" if self.decided else "staying eager"
        return (f"distill.compile=auto: {verdict}: {self.steps_left} steps left x {self.eager_step_s * 1e3:.0f} ms "
                f"eager x {COMPILED_STEP_SAVING} saved = {saved:.0f} s against ~{compile_s:.0f} s to compile"
                f"{' (cache loaded)' if self.cached else ''}")


def compile_cache_bytes() -> Optional[bytes]:
    """torch's compile cache artifacts of this process (inductor, AOTAutograd, autotuning), or None if empty."""
    saved = torch.compiler.save_cache_artifacts()
    return saved[0] if saved else None


def load_compile_cache(blob: bytes) -> None:
    """Hand saved artifacts to torch's caches before the first compiled call (torch's own format, read by torch)."""
    torch.compiler.load_cache_artifacts(blob)
