"""Training checkpoints in the store: one folder of files per step, a `_complete.json` marker written last.

Each marker carries its resume key. The first key's checkpoints live in `distill/checkpoints/`; a later key (the
pairs or the config changed) gets `distill/checkpoints/<key>/`, so the earlier ones stay in place, untouched.
"""
from __future__ import annotations

import hashlib
import re

from storage.layout import CHECKPOINTS, checkpoint_prefix, checkpoint_steps
from storage.manifest import ChecksumError
from storage.store import ArtifactStore

MARKER = "_complete.json"


def write_checkpoint(store: ArtifactStore, step: int, files: dict[str, bytes], key: str) -> str:
    """Every state file, then the marker carrying `key` (a checkpoint without its marker is ignored)."""
    prefix = checkpoint_prefix(step, checkpoint_folder(store, key))
    for name, data in files.items():
        store.write_bytes(f"{prefix}/{name}", data)
    sha256 = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    store.write_json(f"{prefix}/{MARKER}", {"step": step, "hash": key, "sha256": sha256})
    return prefix


def checkpoint_folder(store: ArtifactStore, key: str) -> str:
    """Where the checkpoints of `key` are (or go): its own subfolder once it has one, else the shared folder
    unless that holds another key's checkpoints."""
    own = f"{CHECKPOINTS}/{key}"
    if checkpoint_steps(store, own):
        return own
    keys = {_marker(store, s).get("hash") for s in checkpoint_steps(store)} - {None}
    return CHECKPOINTS if not keys or key in keys else own


def list_checkpoints(store: ArtifactStore, key: str) -> list[int]:
    """Steps of the complete checkpoints written under `key` (the resume key), ascending."""
    folder = checkpoint_folder(store, key)
    return [s for s in checkpoint_steps(store, folder) if _marker(store, s, folder).get("hash") == key]


def checkpoint_keys(store: ArtifactStore) -> dict[str, list[int]]:
    """Every resume key with complete checkpoints in the store -> its steps, ascending."""
    keys: dict[str, list[int]] = {}
    for path in store.ls(CHECKPOINTS):
        m = re.match(rf"^{CHECKPOINTS}/(?:([^/]+)/)?step-(\d+)/{MARKER}$", path)
        if m:
            folder, step = f"{CHECKPOINTS}/{m.group(1)}" if m.group(1) else CHECKPOINTS, int(m.group(2))
            key = _marker(store, step, folder).get("hash")
            if key and folder in (CHECKPOINTS, f"{CHECKPOINTS}/{key}"):
                keys.setdefault(key, []).append(step)
    return {k: sorted(v) for k, v in keys.items()}


def _marker(store: ArtifactStore, step: int, folder: str = CHECKPOINTS) -> dict:
    """A checkpoint's marker; an unreadable one is named and counts as no marker."""
    try:
        marker = store.read_json(f"{checkpoint_prefix(step, folder)}/{MARKER}")
    except (ValueError, UnicodeDecodeError) as err:
        print(f"checkpoint step {step}: marker is damaged ({err}); ignoring this checkpoint")
        return {}
    return marker if isinstance(marker, dict) else {}


def read_checkpoint(store: ArtifactStore, step: int, key: str) -> dict[str, bytes]:
    """All state files of the checkpoint of `key` at `step` (file name -> bytes), marker excluded; each file's
    sha256 is checked against the marker (ChecksumError names a damaged or missing file)."""
    prefix = checkpoint_prefix(step, checkpoint_folder(store, key))
    expected = store.read_json(f"{prefix}/{MARKER}").get("sha256")
    names = [k.rsplit("/", 1)[1] for k in store.ls(prefix)]
    files = {n: store.read_bytes(f"{prefix}/{n}") for n in names if n != MARKER}
    for name, digest in (expected or {}).items():
        _check(store, prefix, name, files.get(name), digest)
    return files


def _check(store: ArtifactStore, prefix: str, name: str, data, digest: str) -> None:
    if data is None:
        raise ChecksumError(f"checkpoint file {store.url(f'{prefix}/{name}')} is missing")
    if hashlib.sha256(data).hexdigest() != digest:
        raise ChecksumError(f"checkpoint file {store.url(f'{prefix}/{name}')} does not match the sha256 "
                            "recorded in its marker (damaged)")


def checkpoint_weights(store: ArtifactStore, step: int, key: str, use_ema: bool = True) -> dict:
    """The generator weights of the checkpoint of `key` at `step`, EMA (default) or raw, keyed like
    `UNetDenoiser` ("unet.*")."""
    from safetensors.torch import load

    name = "ema.safetensors" if use_ema else "generator.safetensors"
    prefix = checkpoint_prefix(step, checkpoint_folder(store, key))
    data = store.read_bytes(f"{prefix}/{name}")
    digest = (store.read_json(f"{prefix}/{MARKER}").get("sha256") or {}).get(name)
    if digest:
        _check(store, prefix, name, data, digest)
    return load(data)
