"""The configuration's shared pieces: the strict pydantic base, its error type, guidance-scale lists, path
resolution and the stable hash every stage key is made of."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, model_serializer

PROJECT_DIR = Path(__file__).resolve().parents[2]


def _positive_scales(v: list[float]) -> list[float]:
    if any(w <= 0 for w in v):
        raise ValueError("guidance scales must be positive, e.g. [1, 1.5, 2, 3]")
    return v


GuidanceScales = Annotated[list[float], AfterValidator(_positive_scales)]  # pairs.guidance_scales, evaluate's sweep


class ConfigError(ValueError):
    """A configuration problem, reported as one line naming the field."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    # (field, value, keys): while `field` equals `value`, `keys` are left out of the dump, so a section dumps (and
    # hashes) exactly as before those keys existed and earlier runs keep their cached stages.
    omit_when: ClassVar[tuple[tuple[str, Any, tuple[str, ...]], ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_keys(self, handler):
        data = handler(self)
        if isinstance(data, dict):
            for field, value, keys in self.omit_when:
                if getattr(self, field) == value:
                    for key in keys:
                        data.pop(key, None)
        return data


def resolve_path(path: str) -> str:
    """A local path as given (absolute, or relative to the current folder); a relative one that does not exist
    there is looked up in the project folder, where presets find the shipped tiny teachers and prompts.
    URLs (anything with '://') pass through."""
    if "://" in path:
        return path
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists() or not (PROJECT_DIR / p).exists():
        return str(p)
    return str(PROJECT_DIR / p)


def stable_hash(obj: Any) -> str:
    """16 hex digits of SHA-256 over canonical JSON: the same value in every process and version of Python."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]
