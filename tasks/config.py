"""The run's configuration: the core sections of `dmd_core.config`, plus how each stage is spread and stored
(Prefect task runners over threads, Dask or Ray; torchrun's launcher and rendezvous; S3 credentials from a Prefect
Secret block), presets and `--set` overrides. The YAML layout and every config hash are those of the sections as
before the split: the settings below are fields of the same `pairs`, `distill` and `storage` sections.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import Field, ValidationError, model_validator

from dmd_core.config import (PROJECT_DIR, ConfigError, DataConfig, DistillConfig, EvaluateConfig, ExportConfig,
                             PairsConfig, TeacherConfig, stable_hash)
from dmd_core.config.base import _Model
from dmd_core.protocols import get_protocol

CONFIG_DIR = PROJECT_DIR / "configs"
STAGES = ("teacher", "pairs", "real", "distill", "export", "evaluate")
DEFAULT_PRESET = "digits"


class PairsSettings(PairsConfig):
    """The pairs section with how its shard tasks run."""

    runner: Literal["threads", "dask", "ray"] = Field("threads", description="Prefect task runner of the shard "
                                                      "tasks: a thread pool, Dask (prefect-dask) or Ray (prefect-ray)")
    runner_address: Optional[str] = Field(None, description="scheduler of an existing Dask or Ray cluster; "
                                                            "default: start a local one")
    runner_workers: int = Field(2, gt=0, description="threads, or workers of a local Dask/Ray cluster (one GPU "
                                                     "each when there are GPUs)")



class DistillSettings(DistillConfig):
    """The distill section with how its processes start (torchrun, several nodes)."""

    launcher: Literal["auto", "torchrun", "none"] = Field(
        "auto", description="auto: torchrun when world_size > 1; torchrun: always start worker processes; none: "
                            "this process is already one rank of an outside launcher (RANK/WORLD_SIZE set)")
    nnodes: int = Field(1, ge=1, description="nodes of a multi-node run (world_size / nnodes processes each)")
    rdzv_endpoint: Optional[str] = Field(None, description="host:port of the c10d rendezvous when nnodes > 1")
    rdzv_id: str = Field("dmd", description="rendezvous id shared by the nodes of one run")

    @model_validator(mode="after")
    def _nodes(self) -> "DistillSettings":
        if self.world_size % self.nnodes:
            raise ValueError(f"world_size={self.world_size} must be divisible by nnodes={self.nnodes}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("rdzv_endpoint (host:port reachable from every node) is required when nnodes > 1")
        return self


class StorageConfig(_Model):
    """The artifact root's object store: a custom S3 endpoint (MinIO, Ceph) and where credentials come from.
    Credentials themselves never enter a config: the environment / AWS config files, or a Prefect Secret block."""

    endpoint_url: Optional[str] = Field(None, description="S3-compatible endpoint, e.g. http://minio:9000; "
                                                          "default: AWS (or AWS_ENDPOINT_URL)")
    credentials_block: Optional[str] = Field(None, description="name of a Prefect Secret block holding JSON "
                                                               '{"aws_access_key_id": ..., "aws_secret_access_key": '
                                                               "...}; default: the environment")


class PipelineConfig(_Model):
    """Everything one run needs; saved beside its artifacts."""

    name: str = "digits"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = torch default")
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    pairs: PairsSettings = Field(default_factory=PairsSettings)
    distill: DistillSettings = Field(default_factory=DistillSettings)
    export: ExportConfig = Field(default_factory=ExportConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @model_validator(mode="after")
    def _timesteps_in_range(self) -> "PipelineConfig":
        if self.teacher.text and not self.data.captions:
            raise ValueError(f"data.captions is required for a text-to-image teacher (teacher.kind={self.teacher.kind})")
        if self.evaluate.protocol and get_protocol(self.evaluate.protocol).text and not self.teacher.text:
            raise ValueError(f"evaluate.protocol={self.evaluate.protocol} scores text-to-image teachers "
                             "(a text teacher.kind: sd, sdxl, sd3 or flux)")
        T = self.teacher.num_train_timesteps
        flow = self.teacher.flow
        if flow and self.pairs.solver == "pndm":
            raise ValueError(f"pairs.solver=pndm is a VP solver: a flow teacher ({self.teacher.kind}) takes euler, "
                             "heun or ddim")
        top = T if flow else T - 1  # a flow's timestep T is sigma 1, pure noise
        if self.distill.generator_timesteps[0] > top:
            raise ValueError(f"distill.generator_timesteps must be at most {top} (teacher.num_train_timesteps {T})")
        if self.pairs.guidance_scales is not None and self.distill.guidance_range is None:
            raise ValueError("pairs.guidance_scales makes pairs at several w: it needs a student that takes w "
                             "(distill.guidance_range)")
        if self.pairs.guidance_scales is not None and self.distill.regression_guidance == "drawn":
            raise ValueError("pairs.guidance_scales makes each pair at its own w: set distill.regression_guidance=pairs "
                             "so the student regresses onto it at that w")
        if self.evaluate.teacher_steps == len(self.distill.generator_timesteps):
            raise ValueError("evaluate.teacher_steps must differ from the number of generator steps "
                             "(the teacher's own generator-style baseline uses that count)")
        return self

    def section_hash(self, *sections: str, ignore: Optional[dict[str, set[str]]] = None) -> str:
        """Short stable hash of the named sections (used to key cached stage outputs); fields that only say how
        the work is spread over processes (EXECUTION_FIELDS) are left out: they do not change the outputs; so are
        the fields `ignore` names per section (inputs of other stages)."""
        ignore = ignore or {}
        return stable_hash({s: getattr(self, s).model_dump(
            mode="json", exclude=(EXECUTION_FIELDS.get(s) or set()) | ignore.get(s, set()) or None) for s in sections})


# How a stage's work is spread (threads, Dask, torchrun ranks) or sped up, not what it computes.
EXECUTION_FIELDS = {"pairs": {"runner", "runner_address", "runner_workers"},
                    "distill": {"world_size", "launcher", "nnodes", "rdzv_endpoint", "rdzv_id", "compile",
                                "compile_scope", "channels_last"},
                    "evaluate": {"world_size", "workers"}}


def _first_error(err: ValidationError) -> str:
    e = err.errors()[0]
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]).lstrip(".") or "config"
    got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
    return f"invalid config: {field}: {e['msg']}{got}"


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse `a.b=value` with a YAML-typed value."""
    if "=" not in item:
        raise ConfigError(f"invalid override {item!r}: expected key.path=value")
    key, raw = item.split("=", 1)
    if not key.strip():
        raise ConfigError(f"invalid override {item!r}: empty key")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `--set a.b=value` overrides to a nested dict (unknown keys are caught by validation); a number picks
    an item of a list, e.g. `distill.phases.1.lr=5e-7`."""
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = _item(node, part, item) if isinstance(node, list) else node.setdefault(part, {})
            if not isinstance(child, (dict, list)):
                raise ConfigError(f"invalid override {item!r}: {part} is not a section")
            node = child
        if isinstance(node, list):
            _item(node, path[-1], item)
            node[int(path[-1])] = value
        else:
            node[path[-1]] = value
    return data


def _item(items: list, part: str, override: str) -> Any:
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(f"invalid override {override!r}: {part} is not an index of a list of {len(items)}")
    return items[int(part)]


def preset_names() -> list[str]:
    """Names of the YAML presets shipped in configs/."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(preset: Optional[str] = None, config: Optional[str | dict] = None,
                overrides: Optional[list[str]] = None) -> PipelineConfig:
    """Resolve preset or config file/dict plus overrides into a validated PipelineConfig."""
    if preset and config is not None:
        raise ConfigError("give either a preset or a config, not both")
    if isinstance(config, dict):
        data = json.loads(json.dumps(config))
    elif config is not None:
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = _read_yaml(path)
    else:
        name = preset or DEFAULT_PRESET
        path = CONFIG_DIR / f"{name}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown preset {name!r}; available: {', '.join(preset_names())}")
        data = _read_yaml(path)
    data = apply_overrides(data, list(overrides or []))
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_first_error(err)) from None


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data
