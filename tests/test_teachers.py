"""Teachers: the unet2d and sd loaders, one-line load errors, CFG on text embeddings, and the trainer's guided
real score and unguided fake score on a Stable Diffusion teacher, with LPIPS on decoded latents."""
import shutil
from pathlib import Path

import pytest
import torch

from dmd_core.config import DistillConfig
from dmd_core.conditions import Prompts
from dmd_core.denoisers import CFGDenoiser, NetDenoiser, with_guidance
from dmd_core.teachers import TeacherLoadError, load_teacher
from dmd_core.tiny import tiny_pixel_unet, write_tiny_pixel_teacher, write_tiny_sd_teacher
from dmd_core.trainer import DMDTrainer

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["a red cube", "two cats on a mat"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    return write_tiny_sd_teacher(tmp_path_factory.mktemp("teachers") / "sd")


@pytest.fixture(scope="module")
def sd_teacher(sd_folder):
    return load_teacher("sd", sd_folder)


@pytest.fixture(scope="module")
def pixel_folder(tmp_path_factory) -> Path:
    return write_tiny_pixel_teacher(tmp_path_factory.mktemp("teachers") / "pixel")


@pytest.fixture(scope="module")
def lpips_model():
    from dmd_core.perceptual import build_lpips

    return build_lpips("vgg", random_trunk=True)


def latents(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


# ---- loaders ------------------------------------------------------------------------------------------------

def test_sd_loader_encodes_with_clip_and_decodes_with_the_vae(sd_folder, sd_teacher):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    teacher = sd_teacher
    assert (teacher.kind, teacher.conditioning, teacher.sample_shape) == ("sd", "text", (4, 8, 8))
    assert teacher.prediction_type == teacher.denoiser.prediction_type == "epsilon"

    tokenizer = CLIPTokenizer.from_pretrained(sd_folder / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(sd_folder / "text_encoder", use_safetensors=True).eval()
    ids = tokenizer(["a", "b"], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = text_encoder(ids)[0]
    cond = teacher.encode(["a", "b"])
    assert list(cond) == ["encoder_hidden_states"] and cond["encoder_hidden_states"].shape == (2, 77, 32)
    assert torch.equal(cond["encoder_hidden_states"], expected)
    assert torch.equal(teacher.null_cond["encoder_hidden_states"], teacher.encode([""])["encoder_hidden_states"])
    assert not torch.allclose(teacher.null_cond["encoder_hidden_states"], expected[:1])

    vae = AutoencoderKL.from_pretrained(sd_folder / "vae", use_safetensors=True).eval()
    x = latents(2)
    with torch.no_grad():
        image = vae.decode(x / vae.config.scaling_factor).sample
    assert image.shape == (2, 3, 16, 16)
    assert torch.equal(teacher.decode(x), image)


def test_sd_prediction_type_comes_from_the_scheduler_config(tmp_path):
    teacher = load_teacher("sd", write_tiny_sd_teacher(tmp_path / "sd-v", prediction_type="v_prediction"))
    assert teacher.prediction_type == teacher.denoiser.prediction_type == "v_prediction"
    x, t = latents(2), torch.tensor([100, 800])
    cond = teacher.encode(PROMPTS)
    with torch.no_grad():
        v = teacher.net(x, t, **cond).sample
        got = teacher.denoiser(x, teacher.process.level(t), cond)
    s = teacher.process.level(t)
    alpha_t, sigma_t = teacher.process.alpha(s, x), teacher.process.sigma(s, x)
    torch.testing.assert_close(got, alpha_t * x - sigma_t * v, rtol=0, atol=1e-6)


def test_unet2d_loader_on_an_unconditional_pixel_teacher(pixel_folder):
    teacher = load_teacher("unet2d", pixel_folder)
    assert (teacher.kind, teacher.conditioning, teacher.num_classes) == ("unet2d", "none", 0)
    assert teacher.sample_shape == (3, 8, 8) and teacher.prediction_type == "epsilon"
    assert teacher.null_cond is None and teacher.encode(None) is None and teacher.conditions() is None
    x = torch.randn(2, 3, 8, 8)
    assert teacher.decode(x) is x


def test_unet2d_loader_on_the_class_conditional_digits_teacher():
    teacher = load_teacher("unet2d", REPO / "teachers" / "digits")
    assert (teacher.conditioning, teacher.num_classes, teacher.prediction_type) == ("class", 10, "v_prediction")
    assert teacher.sample_shape == (1, 8, 8)
    assert torch.equal(teacher.null_cond, torch.tensor([10]))
    assert torch.equal(teacher.encode(torch.tensor([3, 7])), torch.tensor([3, 7]))
    assert teacher.conditions().num_classes == 10


def test_unet2d_loader_reads_a_flat_folder(pixel_folder, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        shutil.copy(pixel_folder / "unet" / name, flat / name)
    shutil.copy(pixel_folder / "scheduler" / "scheduler_config.json", flat / "scheduler_config.json")
    nested, teacher = load_teacher("unet2d", pixel_folder), load_teacher("unet2d", flat)
    assert teacher.sample_shape == nested.sample_shape and teacher.prediction_type == nested.prediction_type
    assert torch.equal(teacher.process.alphas, nested.process.alphas)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 900]) / 999
    with torch.no_grad():
        assert torch.equal(teacher.denoiser(x, t), nested.denoiser(x, t))


# ---- load errors ----------------------------------------------------------------------------------------------

def assert_load_error(kind: str, path: Path, *named: str) -> None:
    with pytest.raises(TeacherLoadError) as err:
        load_teacher(kind, path)
    message = str(err.value)
    assert "\n" not in message, message
    for part in named:
        assert part in message, f"{part!r} not in {message!r}"


def test_missing_vae_config_is_named(sd_folder, tmp_path):
    folder = Path(shutil.copytree(sd_folder, tmp_path / "sd"))
    (folder / "vae" / "config.json").unlink()
    assert_load_error("sd", folder, str(folder / "vae" / "config.json"), "not found")


def test_missing_unet_weights_are_named(sd_folder, tmp_path):
    folder = Path(shutil.copytree(sd_folder, tmp_path / "sd"))
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    assert_load_error("sd", folder, str(folder / "unet"), "*.safetensors")


def test_pickled_bin_weights_are_refused(pixel_folder, tmp_path):
    folder = tmp_path / "bin-only"
    tiny_pixel_unet().save_pretrained(folder / "unet", safe_serialization=False)
    shutil.copytree(pixel_folder / "scheduler", folder / "scheduler")
    assert [p.name for p in (folder / "unet").glob("*.bin")] == ["diffusion_pytorch_model.bin"]
    assert_load_error("unet2d", folder, str(folder / "unet"), "*.safetensors", ".bin")


@pytest.mark.parametrize("name", ["vocab.json", "merges.txt"])
def test_missing_tokenizer_file_is_named(sd_folder, tmp_path, name):
    folder = Path(shutil.copytree(sd_folder, tmp_path / "sd"))
    (folder / "tokenizer" / name).unlink()
    assert_load_error("sd", folder, str(folder / "tokenizer" / name))


@pytest.mark.parametrize("kind", ["unet2d", "sd"])
def test_nonexistent_folder_is_named(kind, tmp_path):
    assert_load_error(kind, tmp_path / "nowhere", str(tmp_path / "nowhere"), "not found")


# ---- real score: CFG on text embeddings --------------------------------------------------------------------

@pytest.mark.parametrize("w", [3.0, 1.75])
def test_cfg_with_text_embeddings_is_the_formula(sd_teacher, w):
    """x0 = D(x, t, null) + w (D(x, t, c) - D(x, t, null)) (Ho & Salimans), null = the empty prompt's states."""
    D, null = sd_teacher.denoiser, sd_teacher.null_cond
    x, t = latents(2, seed=1), torch.tensor([250, 750]) / 999
    cond = sd_teacher.encode(PROMPTS)
    guided = with_guidance(D, w, null)
    assert isinstance(guided, CFGDenoiser) and guided.w == w
    with torch.no_grad():
        got = guided(x, t, cond)
        x0_null = D(x, t, {"encoder_hidden_states": null["encoder_hidden_states"].expand(2, -1, -1)})
        x0_cond = D(x, t, cond)
    # One batched call vs two separate ones differ by float32 rounding (~1e-6), which guidance scales by ~2w.
    torch.testing.assert_close(got, x0_null + w * (x0_cond - x0_null), rtol=1e-5, atol=1e-5 * w)
    assert not torch.allclose(x0_cond, x0_null, atol=1e-3)  # the prompt matters, so the check has teeth


# ---- the trainer on a Stable Diffusion teacher ---------------------------------------------------------------

def record_calls(module: torch.nn.Module, calls: list) -> torch.utils.hooks.RemovableHandle:
    """Append (batch size, encoder_hidden_states) of every call of a UNet2DConditionModel."""
    def hook(_module, args, kwargs):
        calls.append((args[0].shape[0], kwargs["encoder_hidden_states"].detach().clone()))
    return module.register_forward_pre_hook(hook, with_kwargs=True)


def test_fake_score_is_never_guided(sd_teacher):
    cfg = DistillConfig(batch_size=2, regression="none", guidance=3.0, bf16=False)
    trainer = DMDTrainer(cfg, sd_teacher, conditions=Prompts(PROMPTS))
    assert isinstance(trainer.mu_real, CFGDenoiser) and trainer.mu_real.w == 3.0
    assert trainer.mu_real.denoiser is sd_teacher.denoiser
    assert isinstance(trainer.mu_fake, NetDenoiser) and not isinstance(trainer.mu_fake, CFGDenoiser)
    assert trainer.mu_fake.net is not sd_teacher.net

    real, fake = [], []
    handles = [record_calls(sd_teacher.net, real), record_calls(trainer.mu_fake.net, fake)]
    try:
        metrics = trainer.train_step()
    finally:
        for h in handles:
            h.remove()
    assert not metrics["skipped"]

    null = sd_teacher.null_cond["encoder_hidden_states"]
    prompt_states = sd_teacher.encode(PROMPTS)["encoder_hidden_states"]
    assert [n for n, _ in fake] == [2, 2], "fake score: one DM evaluation, one denoising update, batch B each"
    for _, states in fake:
        for row in states:
            assert not torch.allclose(row, null[0], atol=1e-4), "the fake score saw the null prompt"
            assert any(torch.allclose(row, p, atol=1e-5) for p in prompt_states)
    assert torch.equal(fake[0][1], fake[1][1]), "both fake-score calls see the generator batch's conditions"
    assert [n for n, _ in real] == [4], "real score: one guided call on [null; cond]"
    assert torch.equal(real[0][1][:2], null.expand(2, -1, -1))
    assert torch.equal(real[0][1][2:], fake[0][1])



def test_text_teacher_without_prompts_is_refused_up_front(sd_teacher):
    with pytest.raises(ValueError, match="prompts"):
        DMDTrainer(DistillConfig(batch_size=2, regression="none", bf16=False), sd_teacher)


class PromptPairs:
    """Latent noise/target pairs with prompts, served in order (the trainer's `Stream` protocol)."""

    def __init__(self, batch_size: int, n: int = 4) -> None:
        g = torch.Generator().manual_seed(7)
        self.z, self.y = torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 4, 8, 8, generator=g)
        self.prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
        self.batch_size, self.position, self.served = batch_size, 0, []

    def next_batch(self, device="cpu") -> dict:
        idx = [(self.position + i) % len(self.prompts) for i in range(self.batch_size)]
        self.position = (self.position + self.batch_size) % len(self.prompts)
        self.served.append([self.prompts[i] for i in idx])
        return {"z": self.z[idx].to(device), "y": self.y[idx].to(device), "cond": self.served[-1]}

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def test_lpips_on_decoded_latents_trains_the_generator_through_the_decoder(sd_teacher, lpips_model):
    """dm_weight=0 and no weight decay: G moves only if the LPIPS gradient passes back through the VAE decoder."""
    cfg = DistillConfig(batch_size=2, regression="lpips", lambda_reg=1.0, dm_weight=0.0, weight_decay=0.0,
                        lr=1e-3, guidance=3.0, bf16=False)
    trainer = DMDTrainer(cfg, sd_teacher, conditions=Prompts(PROMPTS), pairs=PromptPairs(2),
                         lpips_model=lpips_model)
    G_before = {k: v.clone() for k, v in trainer.G.denoiser.state_dict().items()}
    vae_before = {k: v.clone() for k, v in sd_teacher.vae.state_dict().items()}
    decoded = []
    handle = sd_teacher.vae.decoder.register_forward_pre_hook(lambda m, args: decoded.append(args[0].requires_grad))
    try:
        metrics = trainer.train_step()
    finally:
        handle.remove()
    assert not metrics["skipped"]
    assert torch.isfinite(torch.tensor(metrics["loss_reg"])) and metrics["loss_reg"] > 0
    assert sorted(decoded) == [False, True], "decoded once with grad (G's output), once without (the target)"
    assert metrics["grad_norm_G"] > 0
    changed = [k for k, v in trainer.G.denoiser.state_dict().items() if not torch.equal(v, G_before[k])]
    assert "net.conv_in.weight" in changed and "net.conv_out.weight" in changed
    assert all(torch.equal(v, vae_before[k]) for k, v in sd_teacher.vae.state_dict().items())


def test_concat_regression_runs_one_generator_forward_and_trains_the_fake_score_on_both(sd_teacher, lpips_model):
    """DMD Alg. 1 line 7: x = concat(G(z), G(z_ref)); DM loss and fake score see B + B_reg samples."""
    B, B_reg = 2, 1
    cfg = DistillConfig(batch_size=B, regression="lpips", concat_regression=True, guidance=3.0, bf16=False)
    pairs = PromptPairs(B_reg)
    trainer = DMDTrainer(cfg, sd_teacher, conditions=Prompts(PROMPTS), pairs=pairs, lpips_model=lpips_model)
    G_before = trainer.G.denoiser.net.conv_in.weight.detach().clone()
    generator, fake = [], []
    handles = [record_calls(trainer.G.denoiser.net, generator), record_calls(trainer.mu_fake.net, fake)]
    try:
        metrics = trainer.train_step()
    finally:
        for h in handles:
            h.remove()
    assert not metrics["skipped"] and torch.isfinite(torch.tensor(metrics["loss_reg"]))
    assert [n for n, _ in generator] == [B + B_reg], "one generator forward for the DM and regression batches"
    assert [n for n, _ in fake] == [B + B_reg, B + B_reg], "DM evaluation and fake-score update on B + B_reg"
    target_states = sd_teacher.encode(pairs.served[0])["encoder_hidden_states"]
    torch.testing.assert_close(fake[1][1][B:], target_states, rtol=0, atol=1e-5)
    assert torch.equal(generator[0][1], fake[1][1])
    assert not torch.equal(trainer.G.denoiser.net.conv_in.weight, G_before)



def test_teacher_stage_copies_only_what_the_loader_reads(sd_folder, tmp_path):
    """A Hugging Face snapshot carries weight variants, single-file checkpoints and unused components."""
    from tasks.teacher import teacher_files

    folder = Path(shutil.copytree(sd_folder, tmp_path / "snapshot"))
    (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"x")
    (folder / "unet" / "diffusion_pytorch_model.non_ema.safetensors").write_bytes(b"x")
    (folder / "v1-5-pruned.safetensors").write_bytes(b"x")
    (folder / "safety_checker").mkdir()
    (folder / "safety_checker" / "model.safetensors").write_bytes(b"x")
    (folder / "text_encoder" / "pytorch_model.bin").write_bytes(b"x")
    files = teacher_files(folder, "sd")
    assert "model_index.json" in files and "unet/diffusion_pytorch_model.safetensors" in files
    assert not [k for k in files if "fp16" in k or "non_ema" in k or k.startswith(("v1-5", "safety_checker"))
                or k.endswith(".bin")]
    assert {k.split("/")[0] for k in files} == {"model_index.json", "unet", "vae", "text_encoder", "tokenizer",
                                                 "scheduler"}


def test_a_small_decoder_serves_the_regression_loss_only(sd_folder, tmp_path):
    """teacher.decoder_path (an AutoencoderTiny folder, e.g. TAESD) decodes for LPIPS; evaluation, grids and the
    export check keep the full VAE (DMD App. B.3)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                    num_decoder_blocks=(1, 1), latent_channels=4, upsampling_scaling_factor=2
                    ).save_pretrained(tmp_path / "taesd")
    teacher = load_teacher("sd", sd_folder, decoder_path=str(tmp_path / "taesd"))
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(teacher.decode(x), teacher.vae.decode(x / teacher.vae.config.scaling_factor).sample)
        assert torch.equal(teacher.decode_for_loss(x), teacher.codec.decoder.decode(x).sample)
        assert not torch.allclose(teacher.decode(x), teacher.decode_for_loss(x))
    with pytest.raises(TeacherLoadError, match="nowhere"):
        load_teacher("sd", sd_folder, decoder_path=str(tmp_path / "nowhere"))
