"""Model folders (diffusers `save_pretrained` layouts) in the artifact store."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from storage.store import ArtifactStore


def save_folder(store: ArtifactStore, prefix: str, write: Callable[[str], None]) -> list[str]:
    """Call write(local_dir) and upload every file it produced under `prefix/`; returns the keys written."""
    keys = []
    with tempfile.TemporaryDirectory(prefix="dmd-save-") as tmp:
        write(tmp)
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                key = f"{prefix}/{path.relative_to(tmp).as_posix()}"
                store.write_bytes(key, path.read_bytes())
                keys.append(key)
    if not keys:
        raise ValueError(f"nothing was written for {store.url(prefix)}")
    return keys


@contextlib.contextmanager
def local_folder(store: ArtifactStore, prefix: str) -> Iterator[str]:
    """Materialise `prefix/` of the store as a local folder (a temporary copy) for `from_pretrained`."""
    keys = store.ls(prefix)
    if not keys:
        raise FileNotFoundError(f"no files under {store.url(prefix)}")
    with tempfile.TemporaryDirectory(prefix="dmd-load-") as tmp:
        for key in keys:
            target = Path(tmp) / key[len(prefix):].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(store.read_bytes(key))
        yield os.fspath(tmp)
