"""`sdxl`: the Stable Diffusion XL layout: UNet2DConditionModel with `text_time` added conditions, two CLIP text
encoders (hidden states concatenated, pooled embeds from the second), `add_time_ids`, the VAE's scaling factor
(0.13025 for SDXL; an fp16-fix VAE folder in vae/ loads the same way). Exported as a stock
`StableDiffusionXLPipeline`.

Conditions follow `StableDiffusionXLPipeline.encode_prompt` (diffusers 0.42): each encoder's penultimate hidden
state (`hidden_states[-2]`, clip_skip None), concatenated on the feature axis; `text_embeds` = the second encoder's
projected pooled output; `time_ids` = (original size, crop top-left, target size) = (H, W, 0, 0, H, W) at the
default resolution. The null condition is the pipeline's: zeros when `force_zeros_for_empty_prompt` (the SDXL
base default, read from model_index.json), else the empty prompt's encoding.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..teacher_files import read_scheduler
from .base import load_decoder, resolve_prediction_type
from .sd import StableDiffusionFamily, clip_ids, load_part


def zeros_for_empty_prompt(root: Path) -> bool:
    """model_index.json's `force_zeros_for_empty_prompt` (the pipeline's default, True, when absent)."""
    index = root / "model_index.json"
    return bool(json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True)) if index.is_file() else True


class StableDiffusionXLFamily(StableDiffusionFamily):
    name = "sdxl"
    components = ("unet", "vae", "text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    pipelines = ("StableDiffusionXLPipeline",)

    def load(self, path, prediction_type: Optional[str] = None, decoder_path: Optional[str] = None, **_):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        from ..teachers import LatentCodec, network_teacher, vp_process

        root = Path(path)
        self.check_folder(root)
        config = read_scheduler(root / "scheduler")
        unet = load_part(UNet2DConditionModel, root / "unet")
        if unet.config.addition_embed_type != "text_time":
            raise ValueError(f"teacher.path: {root / 'unet'} is not an SDXL UNet (addition_embed_type "
                             f"{unet.config.addition_embed_type!r}, expected 'text_time')")
        vae = load_part(AutoencoderKL, root / "vae")
        teacher = network_teacher(
            self.name, unet, vp_process(config), resolve_prediction_type(config, prediction_type),
            encoders={"text_encoder": load_part(CLIPTextModel, root / "text_encoder"),
                      "text_encoder_2": load_part(CLIPTextModelWithProjection, root / "text_encoder_2")},
            tokenizers={"tokenizer": CLIPTokenizer.from_pretrained(root / "tokenizer"),
                        "tokenizer_2": CLIPTokenizer.from_pretrained(root / "tokenizer_2")},
            codec=LatentCodec(vae, float(vae.config.scaling_factor), decoder=load_decoder(decoder_path)),
            scheduler_config=config,
            pipeline_config={"force_zeros_for_empty_prompt": zeros_for_empty_prompt(root)})
        return teacher

    @staticmethod
    def time_ids(teacher):
        """(original size, crop top-left, target size) at the default resolution: the latent size x the VAE's
        downsampling (StableDiffusionXLPipeline's `default_sample_size * vae_scale_factor`)."""
        factor = 2 ** (len(teacher.codec.vae.config.block_out_channels) - 1)
        h, w = teacher.sample_shape[1] * factor, teacher.sample_shape[2] * factor
        return [h, w, 0, 0, h, w]

    def encode(self, teacher, prompts):
        import torch

        hidden, pooled = [], None
        for tok, enc in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
            encoder = teacher.encoders[enc]
            out = encoder(clip_ids(teacher.tokenizers[tok], prompts).to(encoder.device), output_hidden_states=True)
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: the projected pooled output
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        embeds = torch.cat(hidden, dim=-1)
        time_ids = torch.tensor([self.time_ids(teacher)], dtype=embeds.dtype, device=embeds.device)
        return {"encoder_hidden_states": embeds,
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.expand(len(prompts), -1)}}

    def null_cond(self, teacher):
        """The pipeline's negative condition without a negative prompt: zeros (embeds and pooled) when
        force_zeros_for_empty_prompt, else the empty prompt's encoding; the time ids stay."""
        import torch

        null = teacher.encode([""])
        if not teacher.pipeline_config.get("force_zeros_for_empty_prompt", True):
            return null
        added = null["added_cond_kwargs"]
        return {"encoder_hidden_states": torch.zeros_like(null["encoder_hidden_states"]),
                "added_cond_kwargs": {"text_embeds": torch.zeros_like(added["text_embeds"]),
                                      "time_ids": added["time_ids"]}}

    def export(self, teacher, net, generator_timesteps, guided=None):
        from diffusers import StableDiffusionXLPipeline

        from ..exports import student_scheduler

        scheduler = student_scheduler(teacher.scheduler_config, generator_timesteps, teacher.prediction_type)
        return StableDiffusionXLPipeline(
            vae=teacher.codec.vae, text_encoder=teacher.encoders["text_encoder"],
            text_encoder_2=teacher.encoders["text_encoder_2"], tokenizer=teacher.tokenizers["tokenizer"],
            tokenizer_2=teacher.tokenizers["tokenizer_2"], unet=net, scheduler=scheduler,
            force_zeros_for_empty_prompt=bool(teacher.pipeline_config.get("force_zeros_for_empty_prompt", True)),
            add_watermarker=False)

    def load_export(self, pipeline, path):
        """No invisible watermark (the stock pipeline adds one when the package is installed): the export check
        compares pixels."""
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline.from_pretrained(path, low_cpu_mem_usage=False, use_safetensors=True,
                                                         add_watermarker=False)

    def usage(self, pipeline):
        return ['from diffusers import StableDiffusionXLPipeline',
                'pipe = StableDiffusionXLPipeline.from_pretrained("PATH")',
                'image = pipe("a photo of a cat", num_inference_steps={n}, guidance_scale={w}).images[0]']


FAMILY = StableDiffusionXLFamily()
