"""Real images with their captions, for DMD2's GAN on real data (`data.real`), from any fsspec root:

- WebDataset tars in img2dataset's layout: samples `KEY.jpg|jpeg|png|webp` with `KEY.txt` and/or `KEY.json`
  (its "caption", else "text") beside them in the tar, shards read in name order;
- a folder of images, each with an optional caption file of the same stem (`cat.jpg` + `cat.txt`);
- parquet files with an image column (`image`, `jpg`, `png` or `webp`: raw bytes, or a struct with `bytes`, as
  Hugging Face `datasets` stores images) and a caption column (`caption`, `text`, `txt` or `prompt`).

Every image is centre-cropped to a square on its short side and resized to the teacher's resolution with PIL
Lanczos (DMD2 `main/sdxl/generate_vae_latents.py` resizes its LAION images with `Image.LANCZOS`; img2dataset's
`resize_mode=center_crop` crops them square), as the evaluation protocols treat their references
(`dmd_core.protocols.center_crop_resize`). An image that cannot be decoded is skipped, counted and named in the
`SkipReport`; the reader fails when more than `max_bad_fraction` of the samples were bad, never silently.
"""
from __future__ import annotations

import io
import json
import posixpath
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
from PIL import Image

from dmd_core.protocols import center_crop_resize
from storage.store import ArtifactStore

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTS = ("txt", "json")
IMAGE_COLUMNS = ("image", "jpg", "png", "webp")
CAPTION_COLUMNS = ("caption", "text", "txt", "prompt")
FORMATS = ("webdataset", "folder", "parquet")


@dataclass(frozen=True)
class RealImage:
    """One real sample: where it came from, its uint8 (R, R, 3) image, its caption (None when it has none)."""

    key: str
    image: np.ndarray
    caption: Optional[str]


@dataclass
class SkipReport:
    """Samples seen and the bad ones (name, reason), in reading order."""

    seen: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)

    def check(self, max_bad_fraction: float, url: str) -> None:
        """ValueError naming the first bad samples when more than `max_bad_fraction` of the samples were bad."""
        if self.seen and len(self.bad) > max_bad_fraction * self.seen:
            names = ", ".join(f"{n} ({why})" for n, why in self.bad[:3])
            raise ValueError(f"data.real {url}: {len(self.bad)} of {self.seen} images are unreadable "
                             f"(more than {max_bad_fraction:.1%}): {names}{' ...' if len(self.bad) > 3 else ''}")

    def as_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "bad": len(self.bad), "bad_samples": [{"name": n, "reason": r} for n, r in self.bad]}


def detect_format(store: ArtifactStore) -> str:
    """webdataset when the root holds .tar shards, parquet when it holds .parquet files, else a folder."""
    keys = store.ls()
    if any(k.endswith(".tar") for k in keys):
        return "webdataset"
    if any(k.endswith(".parquet") for k in keys):
        return "parquet"
    return "folder"


def iter_real_images(url: str, resolution: int, report: SkipReport, fmt: Optional[str] = None,
                     max_bad_fraction: float = 0.01, skip: int = 0, **storage_options: Any) -> Iterator[RealImage]:
    """The real samples under `url` in a fixed order, cropped and resized to `resolution`²; bad images go to
    `report`, and after the last sample the reader fails if more than `max_bad_fraction` were bad. The first
    `skip` samples are passed over undecoded (a resumed reader whose `report` already counts them)."""
    store = ArtifactStore(url, **storage_options)
    fmt = fmt or detect_format(store)
    if fmt not in FORMATS:
        raise ValueError(f"data.real format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    samples = {"webdataset": _webdataset, "folder": _folder, "parquet": _parquet}[fmt](store)
    for position, (name, data, caption) in enumerate(samples):
        if position < skip:
            continue
        report.seen += 1
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                image = center_crop_resize(im, resolution)
        except Exception as e:  # noqa: BLE001 - any decoder error makes this one sample bad, counted and named
            reason = re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(e).__name__}: {e}".splitlines()[0])  # no addresses
            report.bad.append((name, reason[:200]))
            continue
        yield RealImage(name, image, caption)
    if report.seen == 0:
        raise ValueError(f"data.real {url}: no {fmt} samples found")
    report.check(max_bad_fraction, url)


def _caption(ext: str, data: bytes) -> Optional[str]:
    """A caption from a .txt (stripped) or .json ("caption", else "text") file; None when it has none."""
    text = data.decode("utf-8", errors="replace")
    if ext == "txt":
        return text.strip()
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    value = obj.get("caption", obj.get("text")) if isinstance(obj, dict) else None
    return value.strip() if isinstance(value, str) else None


def _webdataset(store: ArtifactStore) -> Iterator[tuple[str, bytes, Optional[str]]]:
    """(shard:key, image bytes, caption) of every sample of every .tar shard, in shard-name and tar order."""
    for shard in (k for k in store.ls() if k.endswith(".tar")):
        with store.open(shard) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            current, parts = None, {}
            for member in tar:
                if not member.isfile():
                    continue
                stem, _, ext = posixpath.basename(member.name).partition(".")
                key = posixpath.join(posixpath.dirname(member.name), stem)
                if key != current and current is not None:
                    yield from _sample(shard, current, parts)
                    parts = {}
                current = key
                parts[ext.lower()] = tar.extractfile(member).read()
            if current is not None:
                yield from _sample(shard, current, parts)


def _sample(shard: str, key: str, parts: dict[str, bytes]) -> Iterator[tuple[str, bytes, Optional[str]]]:
    """One grouped tar sample, if it has an image (other groups, e.g. img2dataset's failed downloads, are not
    samples)."""
    image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
    if image is None:
        return
    caption = next((c for c in (_caption(e, parts[e]) for e in CAPTION_EXTS if e in parts) if c is not None), None)
    yield f"{shard}:{key}", image, caption


def _folder(store: ArtifactStore) -> Iterator[tuple[str, bytes, Optional[str]]]:
    """(path, image bytes, caption) of every image file in name order; `stem.txt` beside it is its caption."""
    keys = store.ls()
    present = set(keys)
    for key in keys:
        stem, ext = posixpath.splitext(key)
        if ext[1:].lower() not in IMAGE_EXTS:
            continue
        text = f"{stem}.txt"
        yield key, store.read_bytes(key), (_caption("txt", store.read_bytes(text)) if text in present else None)


def _parquet(store: ArtifactStore) -> Iterator[tuple[str, bytes, Optional[str]]]:
    """(file:row, image bytes, caption) of every row of every .parquet file, in name and row order."""
    for key in (k for k in store.ls() if k.endswith(".parquet")):
        table = store.read_table(key)
        names = table.column_names
        image_col = next((c for c in IMAGE_COLUMNS if c in names), None)
        if image_col is None:
            raise ValueError(f"data.real {store.url(key)}: no image column (one of {', '.join(IMAGE_COLUMNS)})")
        caption_col = next((c for c in CAPTION_COLUMNS if c in names), None)
        images = table.column(image_col).to_pylist()
        captions = table.column(caption_col).to_pylist() if caption_col else [None] * len(images)
        for i, (cell, caption) in enumerate(zip(images, captions)):
            data = cell.get("bytes") if isinstance(cell, dict) else cell
            yield f"{key}:{i}", data if isinstance(data, bytes) else b"", caption
