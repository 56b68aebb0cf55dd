"""Speed settings (dmd_core.accel, dmd_core.inference): same numbers as the plain path, same checkpoints."""
import copy

import pytest
import torch

from dmd_core import accel
from dmd_core.inference import OneStep, fast_modules
from tests.helpers import make_trainer, tiny_teacher


def test_auto_settings_are_off_on_the_cpu_and_on_for_cuda():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert accel.resolve_compile("auto", cpu) == "none" and accel.resolve_compile("auto", cuda) == "default"
    assert accel.resolve_compile("default", cpu) == "default"
    assert accel.resolve_channels_last(None, cpu) is False and accel.resolve_channels_last(None, cuda) is True
    assert accel.resolve_channels_last(None, cuda, lora=True) is False and accel.resolve_channels_last(True, cuda, lora=True)
    with pytest.raises(ValueError, match="compile"):
        accel.resolve_compile("fastest", cpu)


def test_compiled_in_place_module_keeps_its_state_dict_and_outputs():
    denoiser = tiny_teacher()
    keys = list(denoiser.state_dict())
    x, t, c = torch.randn(4, 1, 8, 8), torch.tensor([10, 200, 500, 900]) / 999, torch.tensor([0, 1, 2, 10])
    expected = denoiser(x, t, c)
    accel.compile_in_place(denoiser, "default", backend="aot_eager")
    assert list(denoiser.state_dict()) == keys  # checkpoints written from a compiled run load into a plain one
    assert torch.allclose(denoiser(x, t, c), expected, atol=1e-5)


def test_channels_last_training_matches_nchw_and_resumes_exactly():
    """NHWC weights change memory layout only: the same losses, and a checkpoint round trip continues exactly."""
    base = dict(generator_timesteps=[999], fake_updates_per_generator=1, gan={"enabled": False})
    plain, nhwc = make_trainer(**base), make_trainer(**base, channels_last=True)
    conv = nhwc.G.denoiser.net.down_blocks[0].resnets[0].conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    for _ in range(3):
        a, b = plain.train_step(), nhwc.train_step()
        for key in ("loss_dm", "loss_reg", "loss_fake"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key

    resumed = make_trainer(**base, channels_last=True)
    resumed.load_state_files(nhwc.state_files())
    moment = resumed.opt_G.state[resumed.G.denoiser.net.down_blocks[0].resnets[0].conv1.weight]["exp_avg"]
    assert moment.stride() == conv.stride()  # the checkpoint is NCHW; the moments follow the parameter
    for _ in range(2):
        a, b = nhwc.train_step(), resumed.train_step()
        assert a == b


def test_one_step_generator_runs_dm_and_regression_batches_in_one_forward():
    """The DM batch and the regression batch share one generator call (no duplicated launches)."""
    trainer = make_trainer(generator_timesteps=[999], fake_updates_per_generator=1, gan={"enabled": False})
    batches = []
    step = trainer.G.step
    trainer.G.step = lambda x, i, cond=None: batches.append(x.shape[0]) or step(x, i, cond)
    metrics = trainer.train_step()
    assert batches == [trainer.cfg.batch_size + trainer.pairs.batch_size]
    assert metrics["loss_reg"] > 0 and "loss_dm" in metrics  # loss_dm is 0 at init: fake score = real score


def test_fast_modules_match_the_plain_one_step_path():
    from diffusers import DDIMScheduler

    from dmd_core.tiny import tiny_sd_components

    parts = tiny_sd_components(latent_size=8)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    unet, vae = parts["unet"], parts["vae"]
    plain = OneStep(unet, vae, sched, dtype=torch.float32)
    fast = OneStep(*fast_modules(copy.deepcopy(unet), copy.deepcopy(vae), "none", torch.float32), sched,
                   dtype=torch.float32)
    z, ehs = torch.randn(2, 4, 8, 8), torch.randn(2, 77, unet.config.cross_attention_dim)
    # Independent computation of x0 = (z - sqrt(1 - abar) eps) / sqrt(abar) with the stock scheduler's abar.
    abar = sched.alphas_cumprod[999]
    eps = unet(z, torch.full((2,), 999), encoder_hidden_states=ehs).sample
    x0 = (z - (1 - abar).sqrt() * eps) / abar.sqrt()
    expected = vae.decode(x0 / vae.config.scaling_factor).sample
    assert torch.allclose(plain(z, ehs), expected, atol=1e-5)
    assert torch.allclose(fast(z, ehs), expected, atol=1e-4)  # fused QKV, NHWC: float32 rounding only


def test_fast_pipeline_leaves_a_cpu_pipeline_alone():
    from diffusers import DDIMPipeline, DDIMScheduler

    from tests.helpers import tiny_unet

    pipe = DDIMPipeline(unet=tiny_unet(0), scheduler=DDIMScheduler())
    from dmd_core.inference import fast_pipeline

    assert fast_pipeline(pipe) is pipe and pipe.unet.dtype == torch.float32
    assert not pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last) or \
        pipe.unet.conv_in.weight.shape[1] == 1


@pytest.mark.parametrize("scope", ["blocks", "attention"])
def test_regional_compile_under_gradient_checkpointing_gives_the_plain_gradients(scope):
    """scope=blocks compiles each transformer and resnet block, scope=attention the transformer blocks only;
    checkpointed forward and backward are unchanged."""
    from dmd_core.tiny import tiny_sd_components

    plain = tiny_sd_components()["unet"]
    plain.enable_gradient_checkpointing()
    regional = copy.deepcopy(plain)
    keys = list(regional.state_dict())
    accel.compile_in_place(regional, "default", backend="aot_eager", scope=scope)
    compiled = {type(m).__name__ for m in regional.modules() if m._compiled_call_impl is not None}
    assert compiled == ({"BasicTransformerBlock", "ResnetBlock2D"} if scope == "blocks" else {"BasicTransformerBlock"})
    assert regional._compiled_call_impl is None  # the UNet itself is not one graph
    assert list(regional.state_dict()) == keys
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    ehs = torch.randn(2, 7, plain.config.cross_attention_dim)
    outs = []
    for unet in (plain, regional):
        out = unet(x, t, encoder_hidden_states=ehs).sample
        out.square().mean().backward()
        outs.append((out.detach(), [p.grad.clone() for p in unet.parameters()]))
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(outs[0][1], outs[1][1]))


def test_attention_scope_without_transformer_blocks_compiles_the_resnets():
    from tests.helpers import tiny_unet

    unet = tiny_unet()
    accel.compile_in_place(unet, "default", backend="aot_eager", scope="attention")
    assert {type(m).__name__ for m in unet.modules() if m._compiled_call_impl is not None} == {"ResnetBlock2D"}


def test_compiled_transformer_blocks_follow_the_active_lora_adapter():
    """Regional compilation of a LoRA base (scope=attention): each adapter state (two adapters, adapters off) gives
    the eager outputs and adapter gradients of that state, in any order of calls."""
    from dmd_core.adapters import AdapterDenoiser, AdapterSwitch, RealScore, inject, target_names
    from dmd_core.backbones import UNET_LORA_TARGETS, backbone_for
    from dmd_core.tiny import tiny_sd_components

    eager = tiny_sd_components()["unet"]
    inject(eager, ["g", "f"], 4, 4.0, target_names(eager, list(UNET_LORA_TARGETS)), seed=0)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in eager.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.1)  # B = 0 at injection: every adapter would equal the base
    regional = copy.deepcopy(eager)
    accel.compile_in_place(regional, "default", backend="aot_eager", scope="attention")
    assert {type(m).__name__ for m in regional.modules() if m._compiled_call_impl is not None} == {
        "BasicTransformerBlock"}
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    ehs = torch.randn(2, 7, eager.config.cross_attention_dim)
    results = []
    for unet in (eager, regional):
        switch = AdapterSwitch(unet)
        backbone_for(unet).checkpointing(unet, switch.checkpoint_context)  # as the trainer checkpoints a LoRA base
        roles = {"g": AdapterDenoiser(unet, switch, "g"), "f": AdapterDenoiser(unet, switch, "f"),
                 None: RealScore(unet, switch)}
        out = {}
        for name in ("g", None, "f", "g"):
            role = roles[name]
            role.zero_grad(set_to_none=True)
            y = role(x, t, encoder_hidden_states=ehs).sample
            if name is not None:
                y.square().mean().backward()
            out[name] = (y.detach(), [p.grad.clone() for p in role.parameters()] if name else [])
        results.append(out)
    assert not torch.allclose(results[0]["g"][0], results[0]["f"][0], atol=1e-3)  # the states differ
    for name in ("g", "f", None):
        torch.testing.assert_close(results[1][name][0], results[0][name][0], atol=1e-5, rtol=1e-4)
        for a, b in zip(results[1][name][1], results[0][name][1]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_compile_scope_auto_follows_gradient_checkpointing():
    assert accel.resolve_compile_scope("auto", True) == "blocks"
    assert accel.resolve_compile_scope("auto", False) == "model"
    assert accel.resolve_compile_scope("model", True) == "model"
    assert accel.resolve_compile_scope("attention", True) == "attention"
    assert accel.resolve_compile_scope("auto", True, lora=True) == "attention"
    assert accel.resolve_compile_scope("auto", False, lora=True) == "model"
    assert accel.resolve_compile_scope("blocks", True, lora=True) == "blocks"
    with pytest.raises(ValueError, match="compile_scope"):
        accel.resolve_compile_scope("layers", False)


def test_compile_pays_when_the_steps_left_repay_the_compile_time():
    """steps_left x COMPILED_STEP_SAVING x eager step > COLD_COMPILE_S (x CACHED_COMPILE_FRACTION with a cache)."""
    from dmd_core.accel import CACHED_COMPILE_FRACTION, COLD_COMPILE_S, COMPILED_STEP_SAVING, compile_pays

    step = 0.2
    breakeven = COLD_COMPILE_S / (COMPILED_STEP_SAVING * step)
    assert not compile_pays(int(breakeven * 0.99), step, cached=False)
    assert compile_pays(int(breakeven * 1.01), step, cached=False)
    assert compile_pays(int(breakeven * CACHED_COMPILE_FRACTION * 1.01), step, cached=True)
    assert not compile_pays(4, 0.05, cached=True)  # a tiny preset's smoke run


def test_compile_when_it_pays_times_eager_steps_after_the_first():
    from dmd_core.accel import PROBE_STEPS, CompileWhenItPays

    long_run = CompileWhenItPays(steps_left=100_000, cached=False)
    # the first (warm-up) step is slow and ignored; the decision comes after PROBE_STEPS timed steps
    answers = [long_run.observe(s) for s in [30.0, 0.2, 0.19, 0.21]]
    assert answers == [False] * PROBE_STEPS + [True] and long_run.decided and long_run.eager_step_s == 0.2
    assert not long_run.observe(0.2)  # once
    assert "compiling" in long_run.explain() and f"{100_000 - PROBE_STEPS - 1} steps left" in long_run.explain()

    short_run = CompileWhenItPays(steps_left=50, cached=False)
    assert [short_run.observe(s) for s in [30.0, 0.2, 0.2, 0.2]] == [False] * 4
    assert short_run.decided is False and "staying eager" in short_run.explain()

    smoke = CompileWhenItPays(steps_left=PROBE_STEPS + 1, cached=True)  # too short to time: eager at once
    assert smoke.decided is False and not smoke.observe(1.0) and "too few steps" in smoke.explain()


def test_auto_compile_on_the_cpu_stays_eager_and_an_explicit_mode_compiles_at_once():
    trainer = make_trainer()  # compile=auto on the CPU: nothing to decide
    assert trainer.auto_compile_mode is None and trainer.compile_mode == "none"
    assert trainer.G.denoiser._compiled_call_impl is None
    explicit = make_trainer(compile="default")  # module.compile is lazy: nothing compiles until a call
    assert explicit.auto_compile_mode is None and explicit.compile_mode == "default"
    assert explicit.G.denoiser._compiled_call_impl is not None and explicit.mu_fake._compiled_call_impl is not None
