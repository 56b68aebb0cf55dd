"""Tiny random teachers of the real architectures, built offline from configs (tests, smoke runs, `make-teacher`).

`pixel-tiny`: an unconditional `UNet2DModel` + DDPM scheduler (the google/ddpm-cifar10-32 layout, shrunk).
`sd-tiny`: the Stable Diffusion folder layout (UNet2DConditionModel, CLIPTextModel, CLIPTokenizer,
AutoencoderKL, PNDM scheduler) with a byte-level CLIP tokenizer written from scratch (no download).
`sdxl-tiny`: the Stable Diffusion XL layout (text_time UNet, two CLIP text encoders and tokenizers, Euler scheduler).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    prediction_type="epsilon", set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
TINY_TEXT_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode map (Radford et al. 2021, `bytes_to_unicode`)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_byte_tokenizer(folder: str | Path, max_length: int = TINY_TEXT_LENGTH) -> None:
    """A CLIPTokenizer folder whose vocabulary is the 512 byte-level symbols (no merges) + start/end tokens."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))


def tiny_pixel_unet(size: int = 8, channels: int = 3, num_classes: int = 0, seed: int = 0):
    """A two-level UNet2DModel with one attention block, like google/ddpm-cifar10-32 but ~100x smaller."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
                       block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                       num_class_embeds=num_classes + 1 if num_classes else None)


def write_tiny_pixel_teacher(folder: str | Path, size: int = 8, channels: int = 3, seed: int = 0,
                             prediction_type: str = "epsilon") -> Path:
    """An unconditional eps-prediction pixel teacher folder (unet/ + scheduler/, DDPM linear betas)."""
    from diffusers import DDPMScheduler

    folder = Path(folder)
    tiny_pixel_unet(size, channels, seed=seed).save_pretrained(folder / "unet")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=2e-2,
                  prediction_type=prediction_type, clip_sample=False).save_pretrained(folder / "scheduler")
    return folder


def tiny_vae(latent_size: int, **options):
    """A two-level AutoencoderKL (x2 downsampling, 4 latent channels); `options`: the family's factors."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=8, sample_size=2 * latent_size, **options)


def tiny_sd_components(latent_size: int = 8, prediction_type: str = "epsilon", seed: int = 0) -> dict:
    """unet, vae, text_encoder, scheduler of a tiny Stable Diffusion (tokenizer: `write_byte_tokenizer`)."""
    from diffusers import PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    vae = tiny_vae(latent_size)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=514, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=TINY_TEXT_LENGTH, bos_token_id=512, eos_token_id=513, pad_token_id=513,
        projection_dim=32))
    scheduler = PNDMScheduler(**{**SD_SCHEDULER, "prediction_type": prediction_type})
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "scheduler": scheduler}


def write_tiny_sd_teacher(folder: str | Path, latent_size: int = 8, prediction_type: str = "epsilon",
                          seed: int = 0) -> Path:
    """A Stable Diffusion folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    folder = Path(folder)
    parts = tiny_sd_components(latent_size, prediction_type, seed)
    for name, module in parts.items():
        module.save_pretrained(folder / name)
    write_byte_tokenizer(folder / "tokenizer")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "PNDMScheduler"], "safety_checker": [None, None],
             "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


SDXL_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
                      use_karras_sigmas=False)  # stabilityai/stable-diffusion-xl-base-1.0's EulerDiscreteScheduler
SDXL_VAE_SCALING = 0.13025


def tiny_sdxl_components(latent_size: int = 8, seed: int = 0, prediction_type: str = "epsilon") -> dict:
    """unet, vae, text_encoder, text_encoder_2, scheduler of a tiny SDXL: `text_time` added conditions
    (6 time ids x 8 + the second encoder's 32-d pooled projection = 80), cross-attention over both encoders' 32 + 32
    hidden states, the SDXL VAE scaling factor (the layout of diffusers' own SDXL pipeline tests, shrunk)."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=8)
    vae = tiny_vae(latent_size, scaling_factor=SDXL_VAE_SCALING)
    config = CLIPTextConfig(vocab_size=514, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=TINY_TEXT_LENGTH, bos_token_id=512,
                            eos_token_id=513, pad_token_id=513, projection_dim=32, hidden_act="gelu")
    text_encoder, text_encoder_2 = CLIPTextModel(config), CLIPTextModelWithProjection(config)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
            "scheduler": EulerDiscreteScheduler(**{**SDXL_SCHEDULER, "prediction_type": prediction_type})}


def write_tiny_sdxl_teacher(folder: str | Path, latent_size: int = 8, seed: int = 0,
                            prediction_type: str = "epsilon") -> Path:
    """A Stable Diffusion XL folder (model_index.json, unet/, vae/, text_encoder(_2)/, tokenizer(_2)/, scheduler/)."""
    folder = Path(folder)
    for name, module in tiny_sdxl_components(latent_size, seed, prediction_type).items():
        module.save_pretrained(folder / name)
    for name in ("tokenizer", "tokenizer_2"):
        write_byte_tokenizer(folder / name)
    index = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.42.1",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "EulerDiscreteScheduler"], "image_encoder": [None, None],
             "feature_extractor": [None, None], "force_zeros_for_empty_prompt": True}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)  # stabilityai/stable-diffusion-3-medium-diffusers
SD3_VAE_SCALING, SD3_VAE_SHIFT = 1.5305, 0.0609


def tiny_sd3_components(latent_size: int = 8, seed: int = 0) -> dict:
    """transformer, vae, text_encoder, text_encoder_2, scheduler of a tiny SD3 (no T5, as the stock pipeline allows):
    two CLIPs with projection (hidden 32 + 32 = the joint attention width 64, pooled 32 + 32 = 64), patch 2, the SD3
    VAE's scaling and shift factors, a rectified flow with shift 3 (the layout of diffusers' SD3 pipeline tests)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=latent_size, patch_size=2, in_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                                        caption_projection_dim=32, pooled_projection_dim=64, out_channels=4,
                                        pos_embed_max_size=latent_size)
    vae = tiny_vae(latent_size, scaling_factor=SD3_VAE_SCALING, shift_factor=SD3_VAE_SHIFT, use_quant_conv=False,
                   use_post_quant_conv=False)
    config = CLIPTextConfig(vocab_size=514, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=TINY_TEXT_LENGTH, bos_token_id=512,
                            eos_token_id=513, pad_token_id=513, projection_dim=32, hidden_act="gelu")
    return {"transformer": transformer, "vae": vae, "text_encoder": CLIPTextModelWithProjection(config),
            "text_encoder_2": CLIPTextModelWithProjection(config),
            "scheduler": FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER)}


def write_tiny_sd3_teacher(folder: str | Path, latent_size: int = 8, seed: int = 0, prediction_type: str = "") -> Path:
    """A Stable Diffusion 3 folder (model_index.json, transformer/, vae/, text_encoder(_2)/, tokenizer(_2)/,
    scheduler/), without the optional T5 encoder. SD3 predicts the flow velocity whatever `prediction_type` says."""
    folder = Path(folder)
    for name, module in tiny_sd3_components(latent_size, seed).items():
        module.save_pretrained(folder / name)
    for name in ("tokenizer", "tokenizer_2"):
        write_byte_tokenizer(folder / name)
    index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.42.1",
             "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "text_encoder_3": [None, None],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "tokenizer_3": [None, None], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "image_encoder": [None, None], "feature_extractor": [None, None]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)  # black-forest-labs/FLUX.1-dev
FLUX_VAE_SCALING, FLUX_VAE_SHIFT = 0.3611, 0.1159


def write_character_t5_tokenizer(folder: str | Path) -> None:
    """A T5TokenizerFast over printable ASCII characters (a Unigram model built here, nothing downloaded):
    <pad> 0, </s> 1, <unk> 2, as T5's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)] + [(chr(c), -2.0) for c in range(33, 127)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                    extra_ids=0).save_pretrained(str(folder))


def tiny_flux_components(latent_size: int = 8, seed: int = 0) -> dict:
    """transformer, vae, text_encoder (CLIP, pooled 32), text_encoder_2 (T5, width 32), scheduler of a tiny guidance-
    distilled FLUX.1-dev layout: 2 x 2 packed latents (4 channels -> 16), RoPE axes (4, 4, 8), the Flux VAE's factors,
    dynamic shifting (the layout of diffusers' Flux pipeline tests, with guidance embeddings)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8))
    vae = tiny_vae(latent_size, scaling_factor=FLUX_VAE_SCALING, shift_factor=FLUX_VAE_SHIFT, use_quant_conv=False,
                   use_post_quant_conv=False)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=514, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=TINY_TEXT_LENGTH,
                                        bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_act="gelu"))
    t5 = T5EncoderModel(T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8))
    return {"transformer": transformer, "vae": vae, "text_encoder": clip, "text_encoder_2": t5,
            "scheduler": FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)}


def write_tiny_flux_teacher(folder: str | Path, latent_size: int = 8, seed: int = 0, prediction_type: str = "") -> Path:
    """A FLUX.1 folder (model_index.json, transformer/, vae/, text_encoder/ (CLIP), text_encoder_2/ (T5),
    tokenizer/, tokenizer_2/, scheduler/); the transformer config records the latent size (`sample_size`)."""
    folder = Path(folder)
    for name, module in tiny_flux_components(latent_size, seed).items():
        module.save_pretrained(folder / name)
    config = json.loads((folder / "transformer" / "config.json").read_text())
    (folder / "transformer" / "config.json").write_text(json.dumps({**config, "sample_size": latent_size}, indent=2))
    write_byte_tokenizer(folder / "tokenizer")
    write_character_t5_tokenizer(folder / "tokenizer_2")
    index = {"_class_name": "FluxPipeline", "_diffusers_version": "0.42.1",
             "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "image_encoder": [None, None],
             "feature_extractor": [None, None]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


TINY_TEACHERS = {  # `dmd make-teacher --tiny NAME`: the writer of each tiny teacher folder
    "pixel": write_tiny_pixel_teacher,
    "sd": write_tiny_sd_teacher,
    "sdxl": write_tiny_sdxl_teacher,
    "sd3": write_tiny_sd3_teacher,
    "flux": write_tiny_flux_teacher,
}


TINY_CLIP = "dmd-tiny-clip"
TINY_CLIP_CONFIG = {  # ViT: width 64, 2 layers, patch 8, 32 px; text: width 64, 2 layers, context 77; embed 32
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def register_tiny_clip() -> str:
    """Register a tiny OpenCLIP config (open_clip's `add_model_config`) and return its model name."""
    import tempfile

    import open_clip

    if TINY_CLIP not in open_clip.list_models():
        path = Path(tempfile.mkdtemp(prefix="dmd-clipcfg-")) / f"{TINY_CLIP}.json"
        path.write_text(json.dumps(TINY_CLIP_CONFIG))
        open_clip.add_model_config(path)
    return TINY_CLIP


class TinyInception(torch.nn.Module):
    """A random feature extractor with clean-fid's custom-extractor contract: (B, 3, 299, 299) in [0, 255] -> (B, 64)."""

    def __init__(self, dim: int = 64, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.AvgPool2d(13), torch.nn.Conv2d(3, 16, 3, stride=2), torch.nn.ReLU(),
                                       torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(256, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x / 255.0)
