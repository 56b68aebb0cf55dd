"""`sd3`: the Stable Diffusion 3 / 3.5 layout: SD3Transformer2DModel (MMDiT) over a rectified flow
(FlowMatchEulerDiscreteScheduler, shift 3), two CLIP text encoders with projection, an optional T5 encoder, and the
VAE's shift and scaling factors. Exported as a stock `StableDiffusion3Pipeline`.

Conditions follow `StableDiffusion3Pipeline.encode_prompt` (diffusers 0.42): each CLIP's penultimate hidden state
(clip_skip None), concatenated on the feature axis and zero-padded to T5's width, then T5's last hidden state (or,
without `text_encoder_3`, zeros of `max_sequence_length` x `joint_attention_dim`) on the sequence axis;
`pooled_projections` = both CLIPs' projected pooled outputs concatenated. The null condition is the empty prompt's
encoding (the pipeline's negative prompt defaults to ""). The network's time input is 1000 sigma.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..teacher_files import read_scheduler
from .base import TeacherFamily, load_decoder
from .sd import clip_ids, load_part

MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline.__call__'s default T5 length


class StableDiffusion3Family(TeacherFamily):
    name = "sd3"
    conditioning = "text"
    components = ("transformer", "vae", "text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    pipelines = ("StableDiffusion3Pipeline",)
    latent = True
    flow = True

    def select_files(self, src, files):
        """The optional T5 encoder and its tokenizer travel with the folder when present."""
        keep = super().select_files(src, files)
        keep.update({k: p for k, p in files.items() if k.startswith(("text_encoder_3/", "tokenizer_3/"))})
        return keep

    def load(self, path, prediction_type: Optional[str] = None, decoder_path: Optional[str] = None, **_):
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        from ..processes import RectifiedFlow
        from ..teachers import LatentCodec, network_teacher

        root = Path(path)
        self.check_folder(root)
        config = read_scheduler(root / "scheduler")
        if prediction_type not in (None, "flow_prediction"):
            raise ValueError(f"teacher.prediction_type: an SD3 transformer predicts the flow velocity "
                             f"(flow_prediction), got {prediction_type!r}")
        vae = load_part(AutoencoderKL, root / "vae")
        encoders = {name: load_part(CLIPTextModelWithProjection, root / name)
                    for name in ("text_encoder", "text_encoder_2")}
        tokenizers = {name: CLIPTokenizer.from_pretrained(root / name) for name in ("tokenizer", "tokenizer_2")}
        if (root / "text_encoder_3").is_dir():
            from transformers import T5EncoderModel, T5TokenizerFast

            encoders["text_encoder_3"] = load_part(T5EncoderModel, root / "text_encoder_3")
            tokenizers["tokenizer_3"] = T5TokenizerFast.from_pretrained(root / "tokenizer_3")
        return network_teacher(
            self.name, load_part(SD3Transformer2DModel, root / "transformer"),
            RectifiedFlow.from_scheduler_config(config, time_scale=1000.0), "flow_prediction",
            encoders=encoders, tokenizers=tokenizers,
            codec=LatentCodec(vae, float(vae.config.scaling_factor), float(vae.config.shift_factor or 0.0),
                              decoder=load_decoder(decoder_path)),
            scheduler_config=config)

    def encode(self, teacher, prompts):
        import torch
        import torch.nn.functional as F

        states, pooled = [], []
        for tok, enc in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
            encoder = teacher.encoders[enc]
            out = encoder(clip_ids(teacher.tokenizers[tok], prompts).to(encoder.device), output_hidden_states=True)
            pooled.append(out[0])
            states.append(out.hidden_states[-2])
        clip = torch.cat(states, dim=-1)
        t5 = self._t5(teacher, prompts, clip)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2), "pooled_projections": torch.cat(pooled, -1)}

    @staticmethod
    def _t5(teacher, prompts, like):
        """T5's last hidden state, or the pipeline's zeros without a T5 encoder."""
        import torch

        encoder = teacher.encoders.get("text_encoder_3")
        if encoder is None:
            width = teacher.net.config.joint_attention_dim
            return torch.zeros(len(prompts), MAX_SEQUENCE_LENGTH, width, dtype=like.dtype, device=like.device)
        ids = teacher.tokenizers["tokenizer_3"](prompts, padding="max_length", max_length=MAX_SEQUENCE_LENGTH,
                                                truncation=True, add_special_tokens=True,
                                                return_tensors="pt").input_ids
        return encoder(ids.to(encoder.device))[0]

    def export(self, teacher, net, generator_timesteps, guided=None):
        from diffusers import StableDiffusion3Pipeline

        from ..exports import flow_student_scheduler

        scheduler = flow_student_scheduler(teacher.process, generator_timesteps)
        return StableDiffusion3Pipeline(
            transformer=net, scheduler=scheduler, vae=teacher.codec.vae,
            text_encoder=teacher.encoders["text_encoder"], tokenizer=teacher.tokenizers["tokenizer"],
            text_encoder_2=teacher.encoders["text_encoder_2"], tokenizer_2=teacher.tokenizers["tokenizer_2"],
            text_encoder_3=teacher.encoders.get("text_encoder_3"), tokenizer_3=teacher.tokenizers.get("tokenizer_3"))

    def load_export(self, pipeline, path):
        """Without T5 in the folder, the stock pipeline is told so (text_encoder_3=None, tokenizer_3=None)."""
        from diffusers import StableDiffusion3Pipeline

        no_t5 = {} if (Path(path) / "text_encoder_3").is_dir() else {"text_encoder_3": None, "tokenizer_3": None}
        return StableDiffusion3Pipeline.from_pretrained(path, low_cpu_mem_usage=False, use_safetensors=True, **no_t5)

    def sample_export(self, pipe, pipeline, raw, n, steps, w, generator):
        prompts = (list(raw) * n)[:n] if raw else [""] * n
        return pipe(prompts, num_inference_steps=steps, guidance_scale=1.0 if w is None else w,
                    generator=generator, output_type="pt").images

    def run_export(self, pipeline, path, z, raw, steps, w, seed, guided=False):
        """`StableDiffusion3Pipeline` does not pass its generator to the scheduler: the re-noising of several steps
        draws from torch's global generator, seeded here."""
        import torch

        pipe = self.load_export(pipeline, path)
        torch.manual_seed(seed)
        return pipe(list(raw), num_inference_steps=steps, guidance_scale=w, latents=z, output_type="pt").images

    def usage(self, pipeline):
        """An export without T5 (the teacher had none) loads with text_encoder_3=None, tokenizer_3=None."""
        return ['import torch',
                'from diffusers import StableDiffusion3Pipeline',
                'pipe = StableDiffusion3Pipeline.from_pretrained("PATH")  # no T5 in PATH: add '
                'text_encoder_3=None, tokenizer_3=None',
                'torch.manual_seed(0)  # several steps re-noise from torch\'s global generator',
                'image = pipe("a photo of a cat", num_inference_steps={n}, guidance_scale={w}).images[0]']


FAMILY = StableDiffusion3Family()
