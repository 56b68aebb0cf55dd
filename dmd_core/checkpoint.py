"""Checkpoint state as bytes: tensors in safetensors, everything else in JSON (never pickle)."""
from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


def tensors_to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """Serialise a flat name -> tensor dict as safetensors bytes."""
    return st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def bytes_to_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """Inverse of tensors_to_bytes."""
    return st_load(data)


def _flatten(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {"__items__": [[k, _flatten(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path} without pickle")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__items__" in obj:
        return {k: _unflatten(v, tensors) for k, v in obj["__items__"]}
    if isinstance(obj, dict) and "__list__" in obj:
        items = [_unflatten(v, tensors) for v in obj["__list__"]]
        return tuple(items) if obj.get("tuple") else items
    return obj


def state_to_files(state: Any, name: str) -> dict[str, bytes]:
    """Split a nested state (e.g. an optimizer state_dict) into `{name}.safetensors` + `{name}.json`."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, tensors, "s")
    return {f"{name}.safetensors": tensors_to_bytes(tensors),
            f"{name}.json": json.dumps(skeleton, sort_keys=True).encode()}


def files_to_state(files: dict[str, bytes], name: str) -> Any:
    """Inverse of state_to_files."""
    tensors = bytes_to_tensors(files[f"{name}.safetensors"])
    return _unflatten(json.loads(files[f"{name}.json"]), tensors)
