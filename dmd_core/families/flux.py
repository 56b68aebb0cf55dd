"""`flux`: the FLUX.1 layout: FluxTransformer2DModel over packed 2 x 2 latent tokens with image/text position ids, a
rectified flow with resolution-dependent shift (FlowMatchEulerDiscreteScheduler, `use_dynamic_shifting`; mu from
the packed token count) on FluxPipeline's sigmas linspace(1, 1/N, N), CLIP pooled + T5 conditions, and the VAE's
shift and scaling factors. Exported as a stock `FluxPipeline`.

Conditions follow `FluxPipeline.encode_prompt` (diffusers 0.42): CLIP's pooled output (77 tokens) and T5's last
hidden state (`max_sequence_length` 512). A guidance-distilled teacher (FLUX.1-dev, `guidance_embeds`) takes the
guidance scale as an input: its real score is that embedding at w, not CFG, and the student and the fake score get
the same input, so the export honours `guidance_scale`. The time input is sigma.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..teacher_files import read_scheduler
from .base import TeacherFamily, load_decoder
from .sd import clip_ids, load_part

MAX_SEQUENCE_LENGTH = 512  # FluxPipeline.__call__'s default T5 length


class FluxFamily(TeacherFamily):
    name = "flux"
    conditioning = "text"
    components = ("transformer", "vae", "text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer",)
    pipelines = ("FluxPipeline",)
    latent = True
    flow = True

    def check_folder(self, root: Path) -> None:
        from ..teacher_files import require

        super().check_folder(root)
        require(root / "tokenizer_2" / "tokenizer_config.json")

    def select_files(self, src, files):
        keep = super().select_files(src, files)
        keep.update({k: p for k, p in files.items() if k.startswith("tokenizer_2/")})
        return keep

    def load(self, path, prediction_type: Optional[str] = None, decoder_path: Optional[str] = None, **_):
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        from ..denoisers import NetDenoiser
        from ..processes import RectifiedFlow
        from ..teachers import LatentCodec, Teacher

        root = Path(path)
        self.check_folder(root)
        if prediction_type not in (None, "flow_prediction"):
            raise ValueError(f"teacher.prediction_type: a Flux transformer predicts the flow velocity "
                             f"(flow_prediction), got {prediction_type!r}")
        config = read_scheduler(root / "scheduler")
        net = load_part(FluxTransformer2DModel, root / "transformer")
        vae = load_part(AutoencoderKL, root / "vae")
        side = latent_size(root / "transformer")
        process = RectifiedFlow.from_scheduler_config(config, image_seq_len=(side // 2) ** 2, time_scale=1.0,
                                                      flux_grid=True)
        return Teacher(
            self.name, NetDenoiser(net, process, "flow_prediction"), process,
            (int(net.config.in_channels) // 4, side, side), "flow_prediction",
            encoders={"text_encoder": load_part(CLIPTextModel, root / "text_encoder"),
                      "text_encoder_2": load_part(T5EncoderModel, root / "text_encoder_2")},
            tokenizers={"tokenizer": CLIPTokenizer.from_pretrained(root / "tokenizer"),
                        "tokenizer_2": T5TokenizerFast.from_pretrained(root / "tokenizer_2")},
            codec=LatentCodec(vae, float(vae.config.scaling_factor), float(vae.config.shift_factor or 0.0),
                              decoder=load_decoder(decoder_path)),
            scheduler_config=config).frozen()

    def encode(self, teacher, prompts):
        clip, t5 = teacher.encoders["text_encoder"], teacher.encoders["text_encoder_2"]
        pooled = clip(clip_ids(teacher.tokenizers["tokenizer"], prompts).to(clip.device),
                      output_hidden_states=False).pooler_output
        ids = teacher.tokenizers["tokenizer_2"](prompts, padding="max_length", max_length=MAX_SEQUENCE_LENGTH,
                                                truncation=True, return_length=False, return_overflowing_tokens=False,
                                                return_tensors="pt").input_ids
        return {"encoder_hidden_states": t5(ids.to(t5.device), output_hidden_states=False)[0],
                "pooled_projections": pooled}

    def embedded_guidance(self, teacher) -> bool:
        """FLUX.1-dev: the transformer embeds the guidance scale."""
        return bool(teacher.net.config.guidance_embeds)

    def export(self, teacher, net, generator_timesteps, guided=None):
        from diffusers import FluxPipeline

        from ..exports import flow_student_scheduler

        return FluxPipeline(scheduler=flow_student_scheduler(teacher.process, generator_timesteps),
                            vae=teacher.codec.vae, text_encoder=teacher.encoders["text_encoder"],
                            tokenizer=teacher.tokenizers["tokenizer"],
                            text_encoder_2=teacher.encoders["text_encoder_2"],
                            tokenizer_2=teacher.tokenizers["tokenizer_2"], transformer=net)

    def load_export(self, pipeline, path):
        from diffusers import FluxPipeline

        return FluxPipeline.from_pretrained(path, low_cpu_mem_usage=False, use_safetensors=True)

    @staticmethod
    def _size(pipe, z):
        """The image size of latents z (B, C, H, W): H x the VAE's downsampling."""
        return z.shape[-2] * pipe.vae_scale_factor, z.shape[-1] * pipe.vae_scale_factor

    def sample_export(self, pipe, pipeline, raw, n, steps, w, generator):
        import torch

        prompts = (list(raw) * n)[:n] if raw else [""] * n
        kwargs = {} if w is None else {"guidance_scale": w}
        return torch.cat([pipe(prompts[i:i + 8], num_inference_steps=steps, generator=generator, output_type="pt",
                               **kwargs).images.cpu() for i in range(0, n, 8)])

    def run_export(self, pipeline, path, z, raw, steps, w, seed, guided=False):
        """Latents z (B, C, H, W) are packed as FluxPipeline expects; several steps re-noise from torch's global
        generator (the pipeline does not pass its generator to the scheduler), seeded here."""
        import torch

        from ..backbones import pack_latents

        pipe = self.load_export(pipeline, path)
        height, width = self._size(pipe, z)
        torch.manual_seed(seed)
        return pipe(list(raw), num_inference_steps=steps, guidance_scale=w, latents=pack_latents(z),
                    height=height, width=width, output_type="pt").images

    def usage(self, pipeline):
        return ['import torch',
                'from diffusers import FluxPipeline',
                'pipe = FluxPipeline.from_pretrained("PATH")',
                'torch.manual_seed(0)  # several steps re-noise from torch\'s global generator',
                'image = pipe("a photo of a cat", num_inference_steps={n}, guidance_scale={w}).images[0]']


def latent_size(folder: Path) -> int:
    """The teacher's latent side: its transformer config's `sample_size` when written there (diffusers ignores the
    key), else FluxPipeline's default 1024 px, i.e. 128 latents (default_sample_size)."""
    import json

    return int(json.loads((folder / "config.json").read_text()).get("sample_size", 128))


FAMILY = FluxFamily()
