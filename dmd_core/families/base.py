"""What a teacher family is: the files of its folder, how it loads, encodes conditions, and exports (torch-free here)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..teacher_files import require, require_weights


class TeacherFamily:
    """One teacher family. Subclasses set the class attributes and implement `load`, `encode` and the export."""

    name: str = ""
    conditioning: str = "none"  # text, class or none
    components: tuple[str, ...] = ()  # subfolders holding config.json + *.safetensors weights
    tokenizers: tuple[str, ...] = ()  # subfolders holding a CLIP tokenizer (vocab.json, merges.txt)
    pipelines: tuple[str, ...] = ()  # the pipeline classes of its exports
    latent: bool = False
    flow: bool = False  # a rectified-flow teacher: timestep T (sigma 1, pure noise) is a valid generator step

    # ---- the folder ---------------------------------------------------------------------------
    def check_folder(self, root: Path) -> None:
        """The files `load` reads are there (nothing is loaded); TeacherLoadError names the first missing one."""
        for name in self.components:
            require(root / name / "config.json")
            require_weights(root / name)
        for name in self.tokenizers:
            for file in ("vocab.json", "merges.txt"):
                require(root / name / file)
        require(root / "scheduler" / "scheduler_config.json")

    def select_files(self, src: Path, files: dict[str, Path]) -> dict[str, Path]:
        """The files of a teacher folder the run keeps (relative path -> source): model_index.json and the
        subfolders `load` reads."""
        keep = tuple(f"{name}/" for name in (*self.components, *self.tokenizers, "scheduler"))
        return {k: p for k, p in files.items() if k == "model_index.json" or k.startswith(keep)}

    # ---- the model ----------------------------------------------------------------------------
    def load(self, path: str | Path, prediction_type: Optional[str] = None, decoder_path: Optional[str] = None,
             **options: Any):
        """The frozen `Teacher` of a local folder."""
        raise NotImplementedError

    def encode(self, teacher, prompts: list[str]):
        """Prompts -> the network's condition (text families)."""
        raise NotImplementedError(f"{self.name} teachers take no prompts")

    def embedded_guidance(self, teacher) -> bool:
        """Whether the network takes the guidance scale as an input instead of classifier-free guidance."""
        return False

    def null_cond(self, teacher):
        """The unconditional input of classifier-free guidance, batch 1 (text families: the empty prompt's)."""
        return teacher.encode([""])

    # ---- the export ---------------------------------------------------------------------------
    def export(self, teacher, net, generator_timesteps: list[int], guided: Optional[dict] = None):
        """The pipeline object saved as the export (`net`: the student's network; `guided`: a guided student's
        {"guidance_scale": w} or None)."""
        raise NotImplementedError

    def load_export(self, pipeline: str, path: str):
        """An export folder loaded on CPU by its pipeline class."""
        raise NotImplementedError

    def sample_export(self, pipe, pipeline: str, raw, n: int, steps: int, w, generator):
        """n images in [0, 1] (n, 3, H, W) from a loaded export: `raw` prompts for text families (else class ids
        0, 1, ... where the export takes them), `steps` its number of steps, `w` its guidance_scale (None: default)."""
        raise NotImplementedError

    def run_export(self, pipeline: str, path: str, z, raw, steps: int, w: float, seed: int, guided: bool = False):
        """Images in [0, 1] (B, 3, H, W) from the export folder at `path`, loaded by its stock class, from noise z
        and raw conditions (prompts or class ids), with `seed` for the re-noising of several steps; `guided`: the
        student takes `w` as an input (else w = 1 runs it without guidance)."""
        raise NotImplementedError

    def pipeline_inputs(self, pipe, pipeline: str) -> tuple[int, tuple[int, ...]]:
        """(number of classes (0: none), the shape of one noise sample) of a loaded stock pipeline of this family,
        at its default size: what `call_pipeline` takes."""
        raise NotImplementedError(f"{self.name}: evaluating a {pipeline} folder by path is not supported yet")

    def call_pipeline(self, pipe, pipeline: str, z, raw, steps: int, w: Optional[float], generator):
        """Images in [0, 1] (B, 3, H, W) from a loaded stock pipeline of this family, called on the noise z with raw
        conditions (prompts, class ids or None), `steps` steps, guidance_scale `w` (None: the pipeline's default)."""
        raise NotImplementedError(f"{self.name}: evaluating a {pipeline} folder by path is not supported yet")

    def usage(self, pipeline: str) -> list[str]:
        """The model card's code lines loading and calling the export (PATH, {n}, {w} filled in)."""
        raise NotImplementedError


def resolve_prediction_type(scheduler_config: dict, override: Optional[str]) -> str:
    """The teacher's prediction type: the override, else its scheduler config's."""
    from ..denoisers import PREDICTION_TYPES

    kind = override or scheduler_config.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"teacher.prediction_type must be one of {PREDICTION_TYPES}, got {kind!r}")
    return kind


def load_decoder(decoder_path: Optional[str]):
    """The optional smaller decoder (diffusers `AutoencoderTiny`, e.g. TAESD) of the regression loss (DMD App. B.3)."""
    if not decoder_path:
        return None
    from diffusers import AutoencoderTiny

    dec = Path(decoder_path)
    require(dec / "config.json")
    require_weights(dec)
    return AutoencoderTiny.from_pretrained(dec, low_cpu_mem_usage=False, use_safetensors=True)
