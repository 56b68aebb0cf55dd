"""Student adapters: what G and the fake score train (DMD Alg. 1 line 2: both start as the teacher).

`Full` copies the teacher twice (today's students). `LoRA` (Hu et al. 2021, through peft) adds low-rank adapters
W + (alpha / r) B A to one frozen base: the generator, the fake score and the generator's EMA are three adapters of
it, and the base with adapters off is the real score, so the network is held once (in bf16 on CUDA).

One adapter is active at a time. An `AdapterSwitch` sets it only around a role's call and returns the base to
adapters-off afterwards, so the base called directly is always the teacher; activation checkpointing recomputes
each block under the adapter it ran with (a `context_fn`), not whichever is active at backward time.
"""
from __future__ import annotations

import contextlib
import copy
import re
import warnings
from typing import Callable, Iterator, Optional

import torch
import torch.utils.checkpoint
from torch import nn

GENERATOR, FAKE, EMA = "generator", "fake_score", "ema"


def lora_layers(module: nn.Module) -> list[nn.Module]:
    """The peft LoRA layers inside `module`."""
    from peft.tuners.lora import LoraLayer

    return [m for m in module.modules() if isinstance(m, LoraLayer)]


def default_targets(module: nn.Module) -> list[str]:
    """LoRA target patterns: the backbone's (attention, feed-forward, convolutions, time embedding), or every
    Linear and Conv2d of a network no backbone adapts (an MLP)."""
    backbone = getattr(module, "backbone", None)
    if backbone is not None:
        return list(backbone.lora_targets)
    return [name for name, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def student_lora_targets(d, base: nn.Module) -> list[str]:
    """The target patterns of a run's LoRA students: `distill.lora_targets` or the base's defaults, plus the guidance
    projection (`cond_proj`, zero in the base) of a guided student (distill.guidance_range)."""
    targets = list(d.lora_targets or default_targets(base))
    return targets + ["cond_proj"] if d.guidance_range is not None else targets


def target_names(module: nn.Module, patterns: list[str]) -> list[str]:
    """Names of the Linear / Conv2d modules of `module` that a pattern matches (a pattern matches a whole name
    component path suffix, e.g. `to_q` or `ff.net.2`; or a regular expression over the full name)."""
    out = []
    for name, m in module.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or not name:
            continue
        if any(name == p or name.endswith("." + p) or re.fullmatch(p, name) for p in patterns):
            out.append(name)
    return out


def _autocast_on() -> bool:
    return torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu")


class AdapterSwitch:
    """Which adapter the layers of one base run: None (adapters off: the base alone) or one adapter name.

    Under autocast the layers pass their (bf16) input to the fp32 adapter as it is, and autocast casts the matmul;
    peft would first copy it to fp32 in every adapted layer. Outside autocast the input is cast to the adapter's
    dtype, as peft does."""

    def __init__(self, base: nn.Module) -> None:
        self.layers = lora_layers(base)
        self.state: tuple = ("?", None)
        self._in_block: dict[int, list[nn.Module]] = {}
        self.activate(None)

    @staticmethod
    def _set(layers: list[nn.Module], state: tuple) -> None:
        name, autocast = state
        for layer in layers:  # peft's own set_adapter also flips requires_grad: set the attributes only
            layer._disable_adapters = name is None
            if name is not None:
                layer._active_adapter = name
            layer.cast_input_dtype_enabled = not autocast

    def activate(self, name: Optional[str], autocast: Optional[bool] = None) -> None:
        state = (name, _autocast_on() if autocast is None else autocast)
        if state != self.state:
            self._set(self.layers, state)
            self.state = state

    @contextlib.contextmanager
    def using(self, name: Optional[str]) -> Iterator[None]:
        before = self.state
        self.activate(name)
        try:
            yield
        finally:
            self.activate(*before)

    def layers_in(self, block: Optional[nn.Module]) -> list[nn.Module]:
        """The adapted layers inside `block` (all of them for None)."""
        if block is None:
            return self.layers
        if id(block) not in self._in_block:
            mine = {id(layer) for layer in self.layers}
            self._in_block[id(block)] = [m for m in block.modules() if id(m) in mine]
        return self._in_block[id(block)]

    def checkpoint_context(self, block: Optional[nn.Module] = None) -> tuple:
        """`context_fn` of torch.utils.checkpoint for `block`: its recomputation in backward runs under the adapter its
        forward ran with; only the block's own layers are switched (and switched back), not the whole base."""
        forward_state, layers = self.state, self.layers_in(block)

        @contextlib.contextmanager
        def recompute() -> Iterator[None]:
            current = self.state
            if current == forward_state:
                yield
                return
            self._set(layers, forward_state)
            try:
                yield
            finally:
                self._set(layers, current)

        return contextlib.nullcontext(), recompute()


def _key(name: str, adapter: str) -> str:
    """A parameter name without its adapter (`...to_q.lora_A.generator.weight` -> `...to_q:lora_A:weight`)."""
    return name.replace(f".{adapter}.", ".").replace(".", ":")


def peft_key(key: str) -> str:
    """A role's state-dict key (`adapter.net:...:to_q:lora_A:weight`) as peft names it (`...to_q.lora_A.weight`)."""
    name = key.removeprefix("adapter.").replace(":", ".")
    return name.removeprefix("net.")


class AdapterDenoiser(nn.Module):
    """One adapter of a shared base, called as the base is (a denoiser D(x_s, s, cond)). Its parameters and state
    dict are the adapter's alone; the base is shared, not a submodule."""

    def __init__(self, base: nn.Module, switch: AdapterSwitch, name: str) -> None:
        super().__init__()
        self.__dict__["base"] = base
        self.switch, self.name = switch, name
        self.adapter = nn.ParameterDict({_key(n, name): p for n, p in base.named_parameters()
                                         if f".{name}." in n and ".lora_" in n})
        for attr in ("backbone", "net", "process", "prediction_type", "parametrisation"):
            if hasattr(base, attr):
                self.__dict__[attr] = getattr(base, attr)

    def forward(self, *args, **kwargs):
        with self.switch.using(self.name):
            return self.base(*args, **kwargs)


class RealScore(nn.Module):
    """The shared base with its adapters off: the frozen teacher (the real score)."""

    def __init__(self, base: nn.Module, switch: AdapterSwitch) -> None:
        super().__init__()
        self.__dict__["base"] = base
        self.switch = switch
        self.prediction_type = getattr(base, "prediction_type", None)

    def forward(self, *args, **kwargs):
        with self.switch.using(None):
            return self.base(*args, **kwargs)


def inject(base: nn.Module, names: list[str], rank: int, alpha: float, targets: list[str], seed: int) -> None:
    """Add one LoRA adapter per name to the target layers of `base` (B = 0, so each starts as the base; A drawn
    from `seed`); adapter weights in fp32 whatever the base's dtype."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True,
                        target_modules="|".join(re.escape(t) for t in targets))
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # several adapters: intended
        torch.manual_seed(seed)
        for name in names:
            inject_adapter_in_model(config, base, adapter_name=name)
    base.requires_grad_(False)
    for n, p in base.named_parameters():
        if ".lora_" in n:
            p.data = p.data.float()
            p.requires_grad_(True)


class Students:
    """G, the fake score, G's EMA and the real score as the trainer calls them; `nets` are the networks compile and
    activation checkpointing act on (each once), `context_fn(net)` the checkpoint context (per block) a shared base
    needs."""

    def __init__(self, generator: nn.Module, fake: nn.Module, real: Callable, nets: list[nn.Module],
                 ema: Optional[Callable[[nn.Module], nn.Module]] = None,
                 switches: Optional[dict[int, AdapterSwitch]] = None) -> None:
        self.generator, self.fake, self.real, self.nets = generator, fake, real, nets
        self._ema, self.switches = ema, switches or {}

    def ema(self, G: nn.Module) -> nn.Module:
        """G's EMA, starting at G's weights (a full copy, or an adapter of G's base)."""
        if self._ema is None:
            return copy.deepcopy(G).requires_grad_(False).eval()
        return self._ema(G)

    def context_fn(self, net: nn.Module) -> Optional[Callable]:
        switch = self.switches.get(id(net))
        return switch.checkpoint_context if switch is not None and switch.layers else None

    @property
    def shares_teacher(self) -> bool:
        """True when the real score is a base the students adapt (compiled with them, not on its own)."""
        return isinstance(self.real, RealScore)


def lora_students(teacher: Callable, generator_init: Optional[nn.Module], fake_init: Optional[nn.Module], rank: int,
                  alpha: Optional[float], targets: Optional[list[str]], seed: int,
                  dtype: Optional[torch.dtype] = None) -> Students:
    """LoRA students: G (with its EMA) and the fake score are adapters of one frozen base, the teacher's network,
    whose adapters-off forward is the real score; a given `generator_init` / `fake_init` is a base of its own."""
    alpha = float(alpha if alpha is not None else rank)
    plan: dict[int, tuple[nn.Module, list[str]]] = {}
    for module, names in ((generator_init, [GENERATOR, EMA]), (fake_init, [FAKE])):
        base = module if module is not None else teacher
        if not isinstance(base, nn.Module):
            raise TypeError("LoRA students need an nn.Module base: pass `generator_init` and `fake_init` modules "
                            "with a plain-callable teacher")
        plan.setdefault(id(base), (base, []))[1].extend(names)
    switches: dict[int, AdapterSwitch] = {}
    for base, _ in plan.values():
        if lora_layers(base):
            raise ValueError("LoRA students: the base network already holds LoRA adapters (a LoRA trainer adapts "
                             "its teacher's network in place); give each trainer a teacher of its own")
    for i, (key, (base, names)) in enumerate(plan.items()):
        if dtype is not None and base is teacher:
            base.to(dtype)
        chosen = target_names(base, targets or default_targets(base))
        if chosen:
            inject(base, names, rank, alpha, chosen, seed + i)
        switches[key] = AdapterSwitch(base)

    def role(module: Optional[nn.Module], name: str) -> nn.Module:
        base = module if module is not None else teacher
        switch = switches[id(base)]
        if not switch.layers:  # nothing to adapt (a parameter-free fake score): the module itself
            return base
        return AdapterDenoiser(base, switch, name)

    def ema(G: nn.Module) -> nn.Module:
        out = role(generator_init, EMA)
        with torch.no_grad():
            for e, g in zip(out.parameters(), G.parameters()):
                e.copy_(g)
        return out.requires_grad_(False)

    real = RealScore(teacher, switches[id(teacher)]) if id(teacher) in switches else teacher
    return Students(role(generator_init, GENERATOR), role(fake_init, FAKE), real,
                    [base for base, _ in plan.values()], ema, switches)


@torch.no_grad()
def merged_state_dict(denoiser: nn.Module, weights: dict[str, torch.Tensor], rank: int, alpha: Optional[float],
                      targets: Optional[list[str]]) -> dict[str, torch.Tensor]:
    """`denoiser`'s own state dict with an adapter's weights (a role's state dict) merged: W + (alpha / r) B A."""
    net = copy.deepcopy(denoiser)
    chosen = target_names(net, targets or default_targets(net))
    inject(net, ["merge"], rank, float(alpha if alpha is not None else rank), chosen, 0)
    role = AdapterDenoiser(net, AdapterSwitch(net), "merge")
    role.load_state_dict(weights)
    for layer in lora_layers(net):
        layer.merge(adapter_names=["merge"])
    return {k.replace(".base_layer.", "."): v for k, v in net.state_dict().items() if ".lora_" not in k}


def lora_file_state(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A role's adapter weights in peft's key format (`down_blocks.0...to_q.lora_A.weight`), as diffusers saves."""
    return {peft_key(k): v.detach().float().contiguous() for k, v in weights.items()}


def lora_metadata(state: dict[str, torch.Tensor], rank: int, alpha: Optional[float]) -> dict:
    """The LoraConfig a stock `load_lora_weights` rebuilds the adapter with."""
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    return {"r": rank, "lora_alpha": float(alpha if alpha is not None else rank), "target_modules": modules}
