"""The teacher family registry: one module a family, each owning loading, folder checks, condition encoding and
the null condition, the latent codec and the export (DESIGN-CORE). Adding a family is one file here, its backbone
(if its network class is new) in `dmd_core.backbones`, and one line below.

Family modules import torch and diffusers only inside their methods: the command line checks a teacher folder
(`check_folder`) before anything heavy is imported.
"""
from __future__ import annotations

import importlib

FAMILIES = {  # teacher.kind -> the module defining FAMILY
    "unet2d": "dmd_core.families.unet2d",
    "sd": "dmd_core.families.sd",
    "sdxl": "dmd_core.families.sdxl",
    "sd3": "dmd_core.families.sd3",
    "flux": "dmd_core.families.flux",
}
KINDS = (*FAMILIES, "callable")


def family(kind: str):
    """The `TeacherFamily` of teacher.kind `kind`."""
    if kind not in FAMILIES:
        raise ValueError(f"teacher.kind must be one of {KINDS}, got {kind!r}")
    return importlib.import_module(FAMILIES[kind]).FAMILY


def family_of_pipeline(pipeline: str):
    """The family whose exports are the pipeline class `pipeline` (a model_index.json `_class_name`), or None."""
    for kind in FAMILIES:
        if pipeline in family(kind).pipelines:
            return family(kind)
    return None
