"""`unet2d`: a diffusers `UNet2DModel` + DDPM-family scheduler (google/ddpm-cifar10-32, the digits teacher);
unconditional or class-conditional, whose extra class embedding is the null class of guidance.

Exports: one-step unconditional students as a stock `DDIMPipeline`; class-conditional, guided or several-step
students as the shipped `DMDPipeline` (DDIMPipeline cannot pass class labels nor re-noise between steps).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..teacher_files import check_unet2d, read_scheduler
from .base import TeacherFamily, resolve_prediction_type


class UNet2DFamily(TeacherFamily):
    name = "unet2d"
    pipelines = ("DDIMPipeline", "DMDPipeline")

    def check_folder(self, root: Path) -> None:
        check_unet2d(root)

    def select_files(self, src: Path, files: dict[str, Path]) -> dict[str, Path]:
        """unet/ + scheduler/; a flat UNet2DModel folder (google/ddpm-cifar10-32) is laid out as unet/ + scheduler/."""
        if "config.json" in files and "scheduler_config.json" in files and not (src / "unet").is_dir():
            return {(f"scheduler/{k}" if k == "scheduler_config.json" else f"unet/{k}"): p for k, p in files.items()
                    if "/" not in k}
        if (src / "unet").is_dir():
            return {k: p for k, p in files.items() if k.startswith(("unet/", "scheduler/"))}
        return files

    def load(self, path, prediction_type: Optional[str] = None, decoder_path: Optional[str] = None, **_):
        from diffusers import UNet2DModel

        from ..teachers import network_teacher, vp_process

        unet_dir, sched_dir = check_unet2d(Path(path))
        config = read_scheduler(sched_dir)
        # low_cpu_mem_usage=False: accelerate's empty-weights init patches nn.Module globally (not thread-safe).
        unet = UNet2DModel.from_pretrained(unet_dir, low_cpu_mem_usage=False, use_safetensors=True)
        classes = int(unet.config.num_class_embeds or 0)
        kind = resolve_prediction_type(config, prediction_type)
        return network_teacher(self.name, unet, vp_process(config), kind, num_classes=max(classes - 1, 0),
                               scheduler_config=config)

    def export(self, teacher, net, generator_timesteps, guided=None):
        from diffusers import DDPMScheduler

        from ..backbones import GuidedUNet2D
        from ..exports import ddim_export
        from ..pipeline import DMDPipeline

        scheduler = DDPMScheduler.from_config(teacher.scheduler_config)
        if isinstance(net, GuidedUNet2D):
            return DMDPipeline(net.unet, scheduler, generator_timesteps, teacher.prediction_type,
                               guidance=net.guidance, guidance_scale=guided["guidance_scale"])
        if not teacher.num_classes:
            try:
                return ddim_export(net, teacher.scheduler_config, generator_timesteps, teacher.prediction_type)
            except ValueError:
                pass
        return DMDPipeline(net, scheduler, generator_timesteps, teacher.prediction_type)

    def load_export(self, pipeline, path):
        if pipeline == "DDIMPipeline":
            from diffusers import DDIMPipeline

            return DDIMPipeline.from_pretrained(path, low_cpu_mem_usage=False, use_safetensors=True)
        from ..pipeline import DMDPipeline

        # trust_remote_code: a guided student's guidance/ component ships its own module file
        return DMDPipeline.from_pretrained(path, low_cpu_mem_usage=False, use_safetensors=True, trust_remote_code=True)

    def sample_export(self, pipe, pipeline, raw, n, steps, w, generator):
        import numpy as np
        import torch

        if pipeline == "DDIMPipeline":  # it draws its own z: randn_tensor((n, C, H, W), generator)
            got = pipe(batch_size=n, generator=generator, num_inference_steps=steps, output_type="np").images
            return torch.from_numpy(np.asarray(got)).permute(0, 3, 1, 2)
        classes = pipe.unet.config.num_class_embeds
        labels = raw if raw is not None else (torch.arange(n) % (classes - 1) if classes else None)
        return pipe(batch_size=n, class_labels=labels, generator=generator, output_type="pt", guidance_scale=w).images

    def run_export(self, pipeline, path, z, raw, steps, w, seed, guided: bool = False):
        import torch

        pipe = self.load_export(pipeline, path)
        if pipeline == "DDIMPipeline":  # z was drawn with seed 0, as DDIMPipeline draws it
            return self.sample_export(pipe, pipeline, raw, z.shape[0], steps, w, torch.Generator().manual_seed(0))
        return pipe(latents=z, class_labels=raw, generator=torch.Generator().manual_seed(seed), output_type="pt",
                    guidance_scale=w if guided else None).images

    def pipeline_inputs(self, pipe, pipeline):
        """Images (C, s, s) at the UNet's sample_size; a class-conditional DMDPipeline's classes without the null
        label of its guidance (the last class embedding)."""
        size, classes = pipe.unet.config.sample_size, pipe.unet.config.num_class_embeds
        shape = (pipe.unet.config.in_channels, *((size, size) if isinstance(size, int) else size))
        return (classes - 1 if classes and pipeline == "DMDPipeline" else 0), shape

    def call_pipeline(self, pipe, pipeline, z, raw, steps, w, generator):
        """DDIMPipeline draws its noise itself (`randn_tensor` of its module, it takes no latents): for this call
        that function returns z, and the stock `__call__` runs unchanged."""
        if pipeline == "DDIMPipeline":
            from diffusers.pipelines.ddim import pipeline_ddim

            draw = pipeline_ddim.randn_tensor
            pipeline_ddim.randn_tensor = lambda shape, **kw: z.to(kw.get("device"), kw.get("dtype"))
            try:
                return pipe(batch_size=z.shape[0], num_inference_steps=steps, generator=generator,
                            output_type="pt").images
            finally:
                pipeline_ddim.randn_tensor = draw
        return pipe(latents=z, class_labels=raw, generator=generator, output_type="pt", guidance_scale=w).images

    def usage(self, pipeline):
        if pipeline == "DDIMPipeline":
            return ['from diffusers import DDIMPipeline', 'pipe = DDIMPipeline.from_pretrained("PATH")',
                    'images = pipe(batch_size=16, num_inference_steps={n}).images']
        return ['from diffusers import DiffusionPipeline',
                'pipe = DiffusionPipeline.from_pretrained("PATH", custom_pipeline="PATH", trust_remote_code=True)',
                'images = pipe(batch_size=16, class_labels=list(range(16))).images']


FAMILY = UNet2DFamily()
