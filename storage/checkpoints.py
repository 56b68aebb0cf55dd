"""Training checkpoints in the store: one folder of files per step, a `_complete.json` marker written last."""
from __future__ import annotations

from storage.layout import checkpoint_prefix, checkpoint_steps
from storage.store import ArtifactStore

MARKER = "_complete.json"


def write_checkpoint(store: ArtifactStore, step: int, files: dict[str, bytes], key: str) -> str:
    """Every state file, then the marker carrying `key` (a checkpoint without its marker is ignored)."""
    prefix = checkpoint_prefix(step)
    for name, data in files.items():
        store.write_bytes(f"{prefix}/{name}", data)
    store.write_json(f"{prefix}/{MARKER}", {"step": step, "hash": key})
    return prefix


def list_checkpoints(store: ArtifactStore, key: str) -> list[int]:
    """Steps of the complete checkpoints written under `key` (the resume hash), ascending."""
    return [s for s in checkpoint_steps(store)
            if store.read_json(f"{checkpoint_prefix(s)}/{MARKER}").get("hash") == key]


def read_checkpoint(store: ArtifactStore, step: int) -> dict[str, bytes]:
    """All state files of the checkpoint at `step` (file name -> bytes), marker excluded."""
    prefix = checkpoint_prefix(step)
    names = [k.rsplit("/", 1)[1] for k in store.ls(prefix)]
    return {n: store.read_bytes(f"{prefix}/{n}") for n in names if n != MARKER}


def checkpoint_weights(store: ArtifactStore, step: int, use_ema: bool = True) -> dict:
    """The generator weights of a checkpoint, EMA (default) or raw, keyed like `UNetDenoiser` ("unet.*")."""
    from safetensors.torch import load

    name = "ema.safetensors" if use_ema else "generator.safetensors"
    return load(store.read_bytes(f"{checkpoint_prefix(step)}/{name}"))
