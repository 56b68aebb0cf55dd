"""COCO captions and reference images on any fsspec URL (local path, file://, s3://) for the COCO protocols."""

from __future__ import annotations

import io
import json
import logging
import posixpath
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from dmd_core.protocols import center_crop_resize
from storage.captions import _decode, _display, _error, _read
from storage.store import ArtifactStore, check_key, open_url

log = logging.getLogger(__name__)

# clean-fid's folder reader (vendored in DMD2 main/coco_eval/cleanfid/utils.py), minus .npy.
IMAGE_SUFFIXES = (".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")


def read_coco_annotations(url: str, **storage_options: Any) -> list[tuple[int, str, str]]:
    """(image_id, file_name, caption) of a COCO captions json (`captions_val2014.json`) on any fsspec URL.

    The order is that of DMD2's `pd.DataFrame(images).merge(annotations, how='left', ...)`: images in file
    order, each image's captions in annotation order; `sample_captions` relies on it. Captions are kept
    verbatim (not stripped), as DMD2's prompt lists keep them. Images without a caption and captions of an
    unknown image are skipped and counted in a warning.
    """
    obj = _json(url, _decode(url, _read(url, storage_options)))
    images, annotations = obj.get("images"), obj.get("annotations")
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise _error(url, 'needs lists "images" and "annotations" (the COCO captions schema)')
    file_names: dict[int, str] = {}
    for i, image in enumerate(images):
        image_id = _field(url, "images", i, image, "id", int)
        file_name = _field(url, "images", i, image, "file_name", str)
        if image_id in file_names:
            raise _error(url, f"images[{i}]: image id {image_id} appears twice")
        file_names[image_id] = file_name
    captions: dict[int, list[str]] = {image_id: [] for image_id in file_names}
    orphans = 0
    for i, annotation in enumerate(annotations):
        image_id = _field(url, "annotations", i, annotation, "image_id", int)
        caption = _field(url, "annotations", i, annotation, "caption", str)
        if image_id in captions:
            captions[image_id].append(caption)
        else:
            orphans += 1
    rows = [(image_id, file_names[image_id], c) for image_id in file_names for c in captions[image_id]]
    bare = sum(1 for c in captions.values() if not c)
    if orphans or bare:
        log.warning("captions file %s: skipped %d captions of unknown images and %d images without captions",
                    _display(url), orphans, bare)
    if not rows:
        raise _error(url, "no captions joined to an image")
    return rows


def list_reference_images(images_url: str, **storage_options: Any) -> list[str]:
    """Sorted relative paths of the image files under a folder URL (recursive), as clean-FID's folder glob."""
    keys = ArtifactStore(images_url, **storage_options).ls()
    return [k for k in keys if posixpath.splitext(k)[1].lower() in IMAGE_SUFFIXES]


def iter_reference_images(images_url: str, file_names: Sequence[str], size: int, batch_size: int = 64,
                          workers: int = 4, **storage_options: Any) -> Iterator[np.ndarray]:
    """uint8 (B, size, size, 3) batches of `file_names` under `images_url`, in order, via `center_crop_resize`.

    Each file is read through fsspec, converted to RGB and centre-cropped + Lanczos-resized as the DMD2
    evaluator prepares its reference folder. `workers` threads read and decode a batch. A missing file is a
    FileNotFoundError, an undecodable one a ValueError; both one line naming the file.
    """
    if size < 1 or batch_size < 1 or workers < 1:
        raise ValueError(f"iter_reference_images: size, batch_size and workers must be positive, "
                         f"got {size}, {batch_size}, {workers}")
    base = images_url.rstrip("/")
    urls = [f"{base}/{check_key(name, 'image file name')}" for name in file_names]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(urls), batch_size):
            chunk = urls[start:start + batch_size]
            yield np.stack(list(pool.map(lambda u: _load(u, size, storage_options), chunk)))


def _load(url: str, size: int, storage_options: dict[str, Any]) -> np.ndarray:
    """One reference image at `url`, cropped and resized; one-line errors naming it."""
    try:
        with open_url(url, "rb", **storage_options) as f:
            data = f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"reference image {_display(url)}: not found") from e
    except (OSError, ValueError) as e:
        raise ValueError(f"reference image {_display(url)}: cannot read it ({_detail(e)})") from e
    try:
        with Image.open(io.BytesIO(data)) as image:
            return center_crop_resize(image.convert("RGB"), size)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"reference image {_display(url)}: not a readable image ({_detail(e)})") from e


def _detail(e: BaseException) -> str:
    """`Type: first line of the message` (at most 200 characters)."""
    text = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _json(url: str, text: str) -> dict:
    """The JSON object in `text`; one-line ValueError otherwise."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise _error(url, f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    if not isinstance(obj, dict):
        raise _error(url, f"top level is a JSON {type(obj).__name__}, not the COCO captions object")
    return obj


def _field(url: str, section: str, index: int, entry: Any, name: str, kind: type) -> Any:
    """`entry[name]`, checked to be of `kind` (bool is not an int); one-line ValueError naming it."""
    value = entry.get(name) if isinstance(entry, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        got = "missing" if value is None else f"a {type(value).__name__}"
        raise _error(url, f'{section}[{index}]: "{name}" is {got}, not {kind.__name__}')
    return value
