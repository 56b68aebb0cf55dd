"""`sd`: the Stable Diffusion layout (UNet2DConditionModel, CLIPTextModel, CLIPTokenizer, AutoencoderKL, a DDPM-family
scheduler), eps- or v-prediction; exported as a stock `StableDiffusionPipeline`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..teacher_files import read_scheduler
from .base import TeacherFamily, load_decoder, resolve_prediction_type


def clip_ids(tokenizer, prompts: list[str]):
    """Token ids padded to the tokenizer's max length, truncated, as the stock pipelines' `encode_prompt`."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def load_part(cls, folder: Path):
    """A diffusers or transformers component from its folder (safetensors only)."""
    if hasattr(cls, "from_config"):  # diffusers; low_cpu_mem_usage=False: accelerate's init is not thread-safe
        return cls.from_pretrained(folder, low_cpu_mem_usage=False, use_safetensors=True)
    return cls.from_pretrained(folder, use_safetensors=True)


class StableDiffusionFamily(TeacherFamily):
    name = "sd"
    conditioning = "text"
    components = ("unet", "vae", "text_encoder")
    tokenizers = ("tokenizer",)
    pipelines = ("StableDiffusionPipeline",)
    latent = True

    def load(self, path, prediction_type: Optional[str] = None, decoder_path: Optional[str] = None, **_):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from ..teachers import LatentCodec, network_teacher, vp_process

        root = Path(path)
        self.check_folder(root)
        config = read_scheduler(root / "scheduler")
        vae = load_part(AutoencoderKL, root / "vae")
        return network_teacher(
            self.name, load_part(UNet2DConditionModel, root / "unet"), vp_process(config),
            resolve_prediction_type(config, prediction_type),
            encoders={"text_encoder": load_part(CLIPTextModel, root / "text_encoder")},
            tokenizers={"tokenizer": CLIPTokenizer.from_pretrained(root / "tokenizer")},
            codec=LatentCodec(vae, float(vae.config.scaling_factor), decoder=load_decoder(decoder_path)),
            scheduler_config=config)

    def encode(self, teacher, prompts):
        """CLIP's last hidden state, no attention mask (StableDiffusionPipeline.encode_prompt)."""
        encoder = teacher.encoders["text_encoder"]
        ids = clip_ids(teacher.tokenizers["tokenizer"], prompts)
        return {"encoder_hidden_states": encoder(ids.to(encoder.device))[0]}

    def export(self, teacher, net, generator_timesteps, guided=None):
        """A guided student's UNet has time_cond_proj_dim: the stock pipeline embeds guidance_scale itself."""
        from ..exports import stable_diffusion_export

        return stable_diffusion_export(net, teacher.codec.vae, teacher.encoders["text_encoder"],
                                       teacher.tokenizers["tokenizer"], teacher.scheduler_config,
                                       generator_timesteps, teacher.prediction_type)

    def load_export(self, pipeline, path):
        import diffusers

        return getattr(diffusers, pipeline).from_pretrained(path, low_cpu_mem_usage=False, use_safetensors=True)

    def sample_export(self, pipe, pipeline, raw, n, steps, w, generator, batch: int = 8):
        import torch

        return torch.cat([pipe(raw[i:i + batch], num_inference_steps=steps, guidance_scale=w, generator=generator,
                               output_type="pt").images.cpu() for i in range(0, n, batch)])

    def run_export(self, pipeline, path, z, raw, steps, w, seed, guided: bool = False):
        import torch

        return self.load_export(pipeline, path)(raw, num_inference_steps=steps, guidance_scale=w, latents=z,
                                                output_type="pt", generator=torch.Generator().manual_seed(seed)).images

    def pipeline_inputs(self, pipe, pipeline):
        """Latents (C, s, s) at the UNet's sample_size (the pipeline's default height and width / 8)."""
        size = pipe.unet.config.sample_size
        return 0, (pipe.unet.config.in_channels, *((size, size) if isinstance(size, int) else size))

    def call_pipeline(self, pipe, pipeline, z, raw, steps, w, generator):
        kwargs = {} if w is None else {"guidance_scale": w}
        return pipe(list(raw), num_inference_steps=steps, latents=z.to(pipe.device, pipe.unet.dtype),
                    generator=generator, output_type="pt", **kwargs).images

    def usage(self, pipeline):
        return [f'from diffusers import {pipeline}', f'pipe = {pipeline}.from_pretrained("PATH")',
                'image = pipe("a photo of a cat", num_inference_steps={n}, guidance_scale={w}).images[0]']


FAMILY = StableDiffusionFamily()
