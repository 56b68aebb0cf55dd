"""One student for every guidance scale: per-sample CFG, the zero-initialised guidance input, the exports that
honour `guidance_scale` in stock diffusers, and the unchanged default path."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dmd_core.config import ConfigError, DistillConfig

from tasks.config import load_config
from dmd_core.denoisers import CFGDenoiser, NetDenoiser
from dmd_core.guidance import (GuidedGenerator, guided_denoiser, sample_guidance, shown_scale, student_cond)
from dmd_core.guidance_embedding import guidance_scale_embedding
from dmd_core.processes import VPDiscrete
from dmd_core.teachers import load_teacher
from tests.helpers import make_trainer, tiny_teacher

PROJECT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd_teacher():
    return load_teacher("sd", PROJECT / "teachers" / "sd-tiny")


def _randomise(module: torch.nn.Module, name: str, seed: int = 0) -> None:
    """Give the zero-initialised guidance projection random weights, so that w changes the output."""
    weight = dict(module.named_parameters())[name]
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed)) * 0.05)


@torch.no_grad()
def test_per_sample_cfg_equals_scalar_cfg_sample_by_sample():
    # float64: a batch of 5 and a batch of 1 take different float32 conv kernels on some CPUs (1.8e-5 apart)
    D = tiny_teacher().double()
    g = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(5, 1, 8, 8, generator=g, dtype=torch.float64), torch.tensor([999, 700, 500, 100, 3]) / 999
    cond, w = torch.tensor([0, 3, 9, 4, 4]), torch.tensor([1.0, 1.5, 2.0, 3.0, 7.5])
    batched = CFGDenoiser(D, w, 10)(x_t, t, cond)
    for i in range(5):
        one = CFGDenoiser(D, float(w[i]), 10)(x_t[i:i + 1], t[i:i + 1], cond[i:i + 1])
        torch.testing.assert_close(batched[i:i + 1], one, rtol=1e-5, atol=1e-5)
    by_hand = D(x_t, t, torch.full_like(cond, 10)) + w.reshape(-1, 1, 1, 1) * (D(x_t, t, cond) - D(x_t, t, torch.full_like(cond, 10)))
    torch.testing.assert_close(batched, by_hand, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="per-sample guidance"):
        CFGDenoiser(D, w[:3], 10)(x_t, t, cond)


@torch.no_grad()
def test_per_sample_cfg_on_text_conditions(sd_teacher):
    D, null = sd_teacher.denoiser, sd_teacher.null_cond
    cond = sd_teacher.encode(["a red square", "two digits"])
    x_t = torch.randn(2, *sd_teacher.sample_shape, generator=torch.Generator().manual_seed(1))
    t, w = torch.tensor([900, 300]) / 999, torch.tensor([1.5, 4.0])
    batched = CFGDenoiser(D, w, null)(x_t, t, cond)
    for i in range(2):
        one = CFGDenoiser(D, float(w[i]), null)(x_t[i:i + 1], t[i:i + 1],
                                                {"encoder_hidden_states": cond["encoder_hidden_states"][i:i + 1]})
        torch.testing.assert_close(batched[i:i + 1], one, rtol=1e-5, atol=1e-5)


def test_guidance_embedding_is_the_stock_pipelines():
    from diffusers import StableDiffusionPipeline

    w = torch.tensor([1.0, 1.5, 2.0, 3.0, 7.5])
    for dim in (256, 33):
        expected = StableDiffusionPipeline.get_guidance_scale_embedding(None, w - 1, embedding_dim=dim)
        assert torch.equal(guidance_scale_embedding(w - 1, dim), expected)


def test_guidance_draws_are_in_range_and_seeded():
    for law in ("uniform", "log-uniform"):
        a = sample_guidance(4096, (1.0, 3.0), law, torch.Generator().manual_seed(0))
        b = sample_guidance(4096, (1.0, 3.0), law, torch.Generator().manual_seed(0))
        assert torch.equal(a, b) and a.min() >= 1.0 and a.max() <= 3.0
        median = float(a.median())
        assert abs(median - (2.0 if law == "uniform" else 3 ** 0.5)) < 0.05  # closed-form medians


@torch.no_grad()
def test_zero_initialised_guidance_input_starts_as_the_teacher(sd_teacher):
    D = NetDenoiser(tiny_teacher().net, VPDiscrete.linear(), "v_prediction")
    S = guided_denoiser(D, 32)
    x_t, t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([999, 500, 10]) / 999
    cond = torch.tensor([1, 2, 10])
    for w in (1.0, 2.5):
        assert torch.equal(S(x_t, t, student_cond(S, cond, torch.full((3,), w))), D(x_t, t, cond))
    _randomise(S, "net.guidance.cond_proj.weight")
    assert not torch.equal(S(x_t, t, student_cond(S, cond, torch.full((3,), 2.5))), D(x_t, t, cond))

    T = sd_teacher.denoiser
    S = guided_denoiser(T, 256)
    assert S.net.config.time_cond_proj_dim == 256 and not S.net.time_embedding.cond_proj.weight.any()
    cond = sd_teacher.encode(["a cat", "a mat", ""])
    x_t = torch.randn(3, *sd_teacher.sample_shape, generator=torch.Generator().manual_seed(3))
    for w in (1.0, 3.0):
        assert torch.equal(S(x_t, t, student_cond(S, cond, torch.full((3,), w))), T(x_t, t, cond))


def test_guided_trainer_resumes_exactly():
    steps = 2
    a = make_trainer(guidance_range=(1.0, 3.0), guidance_law="log-uniform")
    for _ in range(steps):
        a.train_step()
    files = a.state_files()
    b = make_trainer(guidance_range=(1.0, 3.0), guidance_law="log-uniform")
    b.load_state_files(files)
    for _ in range(steps):
        a.train_step(), b.train_step()
    for (k, p), q in zip(a.G.denoiser.state_dict().items(), b.G.denoiser.state_dict().values()):
        assert torch.equal(p, q), k
    assert any("guidance" in k for k in a.G.denoiser.state_dict())


def test_guided_fake_score_models_each_w():
    """The fake score takes w (no CFG): it starts as the teacher and learns G's distribution at each w apart."""
    trainer = make_trainer(guidance_range=(1.0, 3.0))
    fake, teacher = trainer.mu_fake, trainer.teacher_denoiser
    x_t, t = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(4)), torch.tensor([900, 600, 300, 50]) / 999
    cond = torch.tensor([0, 1, 2, 10])

    def at(w: float) -> torch.Tensor:
        with torch.no_grad():
            return fake(x_t, t, student_cond(fake, cond, torch.full((4,), w)))

    assert torch.equal(at(1.0), teacher(x_t, t, cond)) and torch.equal(at(3.0), teacher(x_t, t, cond))
    for _ in range(2):
        trainer.train_step()
    assert dict(fake.named_parameters())["net.guidance.cond_proj.weight"].abs().sum() > 0
    assert (at(1.0) - at(3.0)).abs().max() > 0


# The trainer before the core redesign (integer DDPM timesteps, `UNetDenoiser`), run from its own tree.
BEFORE_CORE = "d570d9a"
TRAIN_FOUR_STEPS = """
import sys, torch
from safetensors.torch import save_file
from tests.helpers import make_trainer
trainer = make_trainer(guidance=1.5)
metrics = [trainer.train_step() for _ in range(4)]
state = {f"G.{k}": v for k, v in trainer.G.denoiser.state_dict().items()}
state.update({f"fake.{k}": v for k, v in trainer.mu_fake.state_dict().items()})
save_file({k: v.contiguous() for k, v in state.items()}, sys.argv[1], metadata={"metrics": repr(metrics)})
"""


def _train_at(commit: str | None, tmp_path: Path) -> tuple[dict, str]:
    """Four trainer steps of `make_trainer(guidance=1.5)` with the code of `commit` (None: this tree), each in a
    fresh interpreter with the same settings."""
    from safetensors import safe_open

    tree = PROJECT
    if commit is not None:
        tree = tmp_path / commit
        tree.mkdir()
        archive = subprocess.run(["git", "archive", commit, "dmd_core", "tests/helpers.py", "tests/__init__.py"],
                                 cwd=PROJECT, capture_output=True)
        if archive.returncode != 0:
            pytest.skip(f"git history without {commit}")
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    out = tmp_path / f"{commit or 'now'}.safetensors"
    subprocess.run([sys.executable, "-c", TRAIN_FOUR_STEPS, str(out)], cwd=tree, check=True,
                   env={**__import__("os").environ, "PYTHONPATH": str(tree)})
    with safe_open(str(out), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()["metrics"]


@pytest.mark.slow
def test_training_is_bit_identical_to_the_trainer_before_the_core_redesign(tmp_path):
    """The trainer of integer DDPM timesteps (before NoiseProcess, Backbone and families) and the current one, on
    the default path (guidance 1.5, TTUR, GAN, two-step G): identical losses and weights after four steps; the
    network's weights were named `unet.` then and `net.` now."""
    before, metrics_before = _train_at(BEFORE_CORE, tmp_path)
    state, metrics_now = _train_at(None, tmp_path)
    assert metrics_now == metrics_before and "loss_gan_G" in metrics_now
    renamed = {k.replace(".unet.", ".net.", 1): v for k, v in before.items()}
    assert renamed.keys() == state.keys() and all(torch.equal(renamed[k], state[k]) for k in state)


def test_unset_guidance_fields_leave_the_config_hash_alone():
    cfg = load_config("digits")
    assert "guidance_range" not in cfg.model_dump()["distill"] and "guidance_sweep" not in cfg.model_dump()["evaluate"]
    guided = load_config("digits", overrides=["distill.guidance_range=[1,3]", "evaluate.guidance_sweep=[1,2]"])
    assert guided.section_hash("distill") != cfg.section_hash("distill")
    assert shown_scale(guided.distill) == 1.25
    with pytest.raises(ConfigError, match="distill.guidance_range"):
        load_config("digits", overrides=["distill.guidance_range=[3,1]"])
    with pytest.raises(ConfigError, match="evaluate.guidance_sweep"):
        load_config("digits", overrides=["evaluate.guidance_sweep=[0,1]"])
    with pytest.raises(ValueError):
        DistillConfig(guidance_range=(0.0, 2.0))


@torch.no_grad()
def test_pixel_export_honours_guidance_scale_in_stock_diffusers(tmp_path):
    from diffusers import DDPMScheduler, DiffusionPipeline

    from dmd_core.generator import Generator
    from dmd_core.pipeline import DMDPipeline
    from tasks.export import ship_guidance_component

    teacher = NetDenoiser(tiny_teacher().net, VPDiscrete.linear(), "v_prediction")
    S = guided_denoiser(teacher, 16).eval()
    _randomise(S, "net.guidance.cond_proj.weight", seed=4)
    pipe = DMDPipeline(S.net.unet, DDPMScheduler(), [999], "v_prediction", guidance=S.net.guidance,
                       guidance_scale=2.0)
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    (tmp_path / "pipeline.py").write_text((PROJECT / "dmd_core" / "pipeline.py").read_text())
    ship_guidance_component(str(tmp_path))
    loaded = DiffusionPipeline.from_pretrained(tmp_path, custom_pipeline=str(tmp_path), trust_remote_code=True)
    assert type(loaded.guidance).__module__ != "dmd_core.guidance_embedding"  # the shipped file, not ours
    z, labels = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5)), torch.tensor([0, 1, 2, 3])
    G = Generator(S, teacher.process, (999,))
    out = {}
    for w in (1.0, 3.0):
        out[w] = loaded(latents=z, class_labels=labels, guidance_scale=w, output_type="pt").images
        expected = (GuidedGenerator(G, w)(z, labels) / 2 + 0.5).clamp(0, 1)
        torch.testing.assert_close(out[w], expected, rtol=0, atol=1e-5)
    assert (out[1.0] - out[3.0]).abs().max() > 1e-3
    default = loaded(latents=z, class_labels=labels, output_type="pt").images  # the export's own scale, 2.0
    torch.testing.assert_close(default, (GuidedGenerator(G, 2.0)(z, labels) / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-5)


@torch.no_grad()
def test_stable_diffusion_export_honours_guidance_scale_in_the_stock_pipeline(sd_teacher, tmp_path):
    """A guided SD student trained a step, exported, reloaded offline with plain StableDiffusionPipeline: at two
    guidance scales the outputs differ, and each equals the trainer's G at that w on the same noise and prompt."""
    from diffusers import StableDiffusionPipeline

    from dmd_core.exports import stable_diffusion_export
    from dmd_core.trainer import DMDTrainer

    cfg = DistillConfig(batch_size=2, lr=5e-2, regression="none", guidance_range=(1.0, 4.0), guidance_embedding_dim=64,
                        bf16=False)
    trainer = DMDTrainer(cfg, sd_teacher, conditions=sd_teacher.conditions(["a red square", "two digits"]))
    with torch.enable_grad():
        trainer.train_step()
    unet = trainer.G.denoiser.net
    assert unet.time_embedding.cond_proj.weight.any()  # the step moved the guidance projection off zero
    stable_diffusion_export(unet, sd_teacher.vae, sd_teacher.text_encoder, sd_teacher.tokenizer,
                            sd_teacher.scheduler_config, [999], sd_teacher.prediction_type).save_pretrained(tmp_path)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path)
    assert pipe.unet.config.time_cond_proj_dim == 64
    prompts = ["a red square", "two digits"]
    z = torch.randn((2, *sd_teacher.sample_shape), generator=torch.Generator().manual_seed(6))
    out = {}
    for w in (1.5, 4.0):
        x0 = trainer.G(z, trainer.generator_cond(sd_teacher.encode(prompts), torch.full((2,), w)))
        atol = 1e-5 * max(1.0, float(x0.abs().max()))
        out[w] = pipe(prompts, num_inference_steps=1, guidance_scale=w, latents=z, output_type="latent").images
        assert pipe.do_classifier_free_guidance is False  # one UNet call per step: w goes in through timestep_cond
        torch.testing.assert_close(out[w], x0, rtol=0, atol=atol)
        images = pipe(prompts, num_inference_steps=1, guidance_scale=w, latents=z, output_type="pt").images
        torch.testing.assert_close(images, (sd_teacher.decode(x0) / 2 + 0.5).clamp(0, 1), rtol=0, atol=atol)
    assert (out[1.5] - out[4.0]).abs().max() > 10 * atol


def test_pairs_at_several_scales_record_their_w_and_feed_it_to_the_student(tmp_path):
    """pairs.guidance_scales: pair i is the teacher's solve at scales[i % k]; its json records w, both pair streams
    yield it, and a guided trainer regresses onto each pair at its own w. Unset, the pairs section hashes as before."""
    from flows.pipeline import save_config
    from tasks.context import open_run, pair_stream, run_teacher as load_run_teacher, sample_noise
    from tasks.pairs import plan_pairs, record_shards, run_pairs_shard
    from tasks.teacher import run_teacher as make_teacher

    plain = load_config("digits-tiny")
    assert "guidance_scales" not in plain.model_dump()["pairs"]
    assert plain.pairs.scale_of(5) == plain.pairs.guidance
    with pytest.raises(ConfigError, match="distill.guidance_range"):
        load_config("digits-tiny", overrides=["pairs.guidance_scales=[1,3]"])
    with pytest.raises(ConfigError, match="distill.regression_guidance=pairs"):
        load_config("digits-tiny", overrides=["pairs.guidance_scales=[1,3]", "distill.guidance_range=[1,3]"])
    cfg = load_config("digits-tiny", overrides=["pairs.guidance_scales=[1,3]", "distill.guidance_range=[1,3]",
                                                "distill.regression_guidance=pairs", "pairs.n=8", "pairs.shard_size=4"])
    assert cfg.section_hash("pairs") != load_config("digits-tiny", overrides=["pairs.n=8", "pairs.shard_size=4"]
                                                    ).section_hash("pairs")
    root = str(tmp_path)
    save_config(root, "multi", cfg)
    make_teacher(root, "multi")
    todo, records = plan_pairs(root, "multi")
    record_shards(root, "multi", records + [run_pairs_shard(root, "multi", i) for i in todo], complete=True)
    store, cfg = open_run(root, "multi")
    teacher = load_run_teacher(store, cfg, torch.device("cpu"))
    streams = [pair_stream(store, cfg, 8, 0)]
    cfg.distill.pairs_in_memory_mb = 0
    streams.append(pair_stream(store, cfg, 8, 0))
    for stream in streams:
        batch = stream.next_batch()
        order = batch["index"] if "index" in batch else None
        w = batch["guidance"]
        assert sorted(w.tolist()) == [1.0] * 4 + [3.0] * 4
        for j in range(8):
            i = int(order[j]) if order is not None else int(torch.where((streams[0].tensors["z"] == batch["z"][j])
                                                                          .flatten(1).all(1))[0])
            assert float(w[j]) == (1.0 if i % 2 == 0 else 3.0)
            z = sample_noise(cfg.pairs.seed, i, teacher.sample_shape)
            assert torch.equal(batch["z"][j], z)
            y = teacher.sample(cfg.pairs.solver, cfg.pairs.steps, z[None], teacher.encode(batch["cond"][j:j + 1]),
                               float(w[j]))
            torch.testing.assert_close(batch["y"][j], y[0], atol=1e-3, rtol=1e-4)  # batch-size rounding
    trainer = make_trainer(guidance_range=(1.0, 3.0), regression_guidance="pairs")
    assert torch.equal(trainer._pairs_w(batch), batch["guidance"])
    del batch["guidance"]
    assert torch.equal(trainer._pairs_w(batch), torch.ones(8))


def test_guidance_lr_scale_puts_the_guidance_projections_in_their_own_group():
    trainer = make_trainer(guidance_range=(1.0, 3.0), guidance_lr_scale=10.0, warmup_steps=0)
    for opt, module in ((trainer.opt_G, trainer.G.denoiser), (trainer.opt_fake, trainer.mu_fake)):
        rest, emb = opt.param_groups[:2]
        names = {id(p): n for n, p in module.named_parameters()}
        assert [names[id(p)] for p in emb["params"]] == ["net.guidance.cond_proj.weight"]
        assert all("guidance" not in names.get(id(p), "") for p in rest["params"])
    trainer.train_step()
    assert trainer.opt_G.param_groups[1]["lr"] == 10 * trainer.opt_G.param_groups[0]["lr"]
    assert "guidance_lr_scale" not in DistillConfig().model_dump()
    assert "guidance_lr_scale" not in DistillConfig(guidance_range=(1.0, 3.0)).model_dump()  # runs made before it
    assert len(make_trainer(guidance_range=(1.0, 3.0)).opt_G.param_groups) == 1


def test_drawn_regression_guidance_draws_w_in_the_range():
    """The default for guided students: the regression pairs are met at w drawn from the range."""
    trainer = make_trainer(guidance_range=(1.5, 3.0))
    w = trainer._pairs_w({"z": torch.zeros(64, 1, 8, 8), "guidance": torch.ones(64)})
    assert w.shape == (64,) and w.min() >= 1.5 and w.max() <= 3.0 and w.std() > 0
    trainer.train_step()
    assert "regression_guidance" not in DistillConfig().model_dump()
    assert DistillConfig(guidance_range=(1.0, 3.0)).model_dump()["regression_guidance"] == "drawn"
    pinned = make_trainer(guidance_range=(1.5, 3.0), regression_guidance="pairs")
    assert torch.equal(pinned._pairs_w({"z": torch.zeros(4, 1, 8, 8)}), torch.ones(4))
