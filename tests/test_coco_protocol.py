"""COCO evaluation protocol: annotations join, caption sampling, DMD2 crop+resize, reference images on disk and S3."""

from __future__ import annotations

import io
import json
import uuid

import numpy as np
import pytest
import torch
from PIL import Image

from dmd_core.protocols import (
    PROTOCOLS,
    center_crop_box,
    center_crop_resize,
    class_balanced_labels,
    get_protocol,
    sample_captions,
)
from storage.coco import iter_reference_images, list_reference_images, read_coco_annotations

S3_BUCKET = "dmd-test"  # created by the s3_endpoint fixture in conftest.py

# (id, file name, (width, height), PIL mode): landscape, portrait, square, grayscale landscape.
IMAGES = [
    (42, "COCO_val2014_000000000042.jpg", (23, 20), "RGB"),
    (73, "COCO_val2014_000000000073.png", (20, 27), "RGB"),
    (74, "COCO_val2014_000000000074.png", (16, 16), "RGB"),
    (133, "COCO_val2014_000000000133.jpg", (30, 17), "L"),
]
# Annotations interleaved across images, as in the real file; image 74 has 3 captions, the others 5.
CAPTIONS = {42: 5, 73: 5, 74: 3, 133: 5}


def _coco_json() -> dict:
    """A captions json with the real captions_val2014.json schema."""
    info = {"description": "This is stable 1.0 version of the 2014 MS COCO dataset.", "url": "http://mscoco.org",
            "version": "1.0", "year": 2014, "contributor": "Microsoft COCO group",
            "date_created": "2015-01-27 09:11:52.357475"}
    images = [{"license": 3, "file_name": name, "coco_url": f"http://mscoco.org/images/{i}", "height": h, "width": w,
               "date_captured": "2013-11-14 11:18:45", "flickr_url": "http://farm9.staticflickr.com/x.jpg", "id": i}
              for i, name, (w, h), _ in IMAGES]
    annotations, ann_id = [], 1000
    for k in range(max(CAPTIONS.values())):
        for image_id, count in CAPTIONS.items():
            if k < count:
                annotations.append({"image_id": image_id, "id": ann_id, "caption": f"image {image_id} caption {k} "})
                ann_id += 1
    licenses = [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1, "name": "BY-NC-SA"}]
    return {"info": info, "images": images, "licenses": licenses, "annotations": annotations}


def _image_bytes(name: str, size: tuple[int, int], mode: str, seed: int) -> bytes:
    """A noise image (so any crop offset shows) encoded as JPEG or PNG by suffix."""
    w, h = size
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buf = io.BytesIO()
    image.save(buf, format="JPEG" if name.endswith(".jpg") else "PNG", quality=95)
    return buf.getvalue()


FILES = {name: _image_bytes(name, size, mode, seed) for seed, (_, name, size, mode) in enumerate(IMAGES)}
EXPECTED_ROWS = [(i, name, f"image {i} caption {k} ") for i, name, _, _ in IMAGES for k in range(CAPTIONS[i])]


@pytest.fixture
def coco_local(tmp_path):
    """(annotations path, val2014 folder path) of the fixture on local disk."""
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2014").mkdir()
    ann = tmp_path / "annotations" / "captions_val2014.json"
    ann.write_text(json.dumps(_coco_json()))
    for name, data in FILES.items():
        (tmp_path / "val2014" / name).write_bytes(data)
    return str(ann), str(tmp_path / "val2014")


@pytest.fixture
def coco_s3(s3_options):
    """(annotations URL, val2014 URL) of the fixture on the moto S3 server."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_options)
    root = f"{S3_BUCKET}/coco-{uuid.uuid4().hex[:8]}"
    fs.pipe_file(f"{root}/annotations/captions_val2014.json", json.dumps(_coco_json()).encode())
    for name, data in FILES.items():
        fs.pipe_file(f"{root}/val2014/{name}", data)
    return f"s3://{root}/annotations/captions_val2014.json", f"s3://{root}/val2014"


def _decoded(name: str) -> Image.Image:
    return Image.open(io.BytesIO(FILES[name])).convert("RGB")


# --- annotations ------------------------------------------------------------------------------------------


def test_read_annotations_local_file_url_and_s3(coco_local, coco_s3, s3_options):
    ann, _ = coco_local
    assert read_coco_annotations(ann) == EXPECTED_ROWS
    assert read_coco_annotations(f"file://{ann}") == EXPECTED_ROWS
    assert read_coco_annotations(coco_s3[0], **s3_options) == EXPECTED_ROWS


def test_read_annotations_errors_are_one_line(tmp_path):
    bad = _coco_json()
    bad["annotations"][3].pop("caption")
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r'annotations\[3\]: "caption" is missing') as e:
        read_coco_annotations(str(path))
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    with pytest.raises(FileNotFoundError, match="not found"):
        read_coco_annotations(str(tmp_path / "missing.json"))


# --- caption sampling -------------------------------------------------------------------------------------


def _pandas_recipe(rows, n, seed):
    """DMD2 main/sdxl/data_process.py with pandas' calls spelled out: np.random.seed, then choice() twice."""
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        shuffled = [rows[i] for i in np.random.choice(len(rows), size=len(rows), replace=False)]  # df.sample(frac=1)
        first, seen = [], set()
        for row in shuffled:  # drop_duplicates(subset='file_name'), keep='first'
            if row[1] not in seen:
                seen.add(row[1])
                first.append(row)
        return [first[i] for i in np.random.choice(len(first), size=n, replace=False)]  # df.sample(n)
    finally:
        np.random.set_state(state)


def test_sample_captions_deterministic_one_per_image():
    rows = EXPECTED_ROWS
    a, b = sample_captions(rows, 3, seed=123), sample_captions(rows, 3, seed=123)
    assert a == b and len(a) == 3
    assert len({r[0] for r in a}) == 3  # one caption per image
    draws = {tuple(sample_captions(rows, 3, seed=s)) for s in range(8)}
    assert len(draws) > 1  # the seed matters
    assert sample_captions(rows, 4, seed=7) != sample_captions(rows, 4, seed=8)
    assert sample_captions(rows, 2, seed=5) == sample_captions(rows, 4, seed=5)[:2]  # smaller n is a prefix
    assert sample_captions(rows, 4, seed=123) == _pandas_recipe(rows, 4, 123)


def test_sample_captions_matches_recipe_on_a_larger_set():
    rows = [(i, f"img{i}.jpg", f"c{i}-{k}") for i in range(300) for k in range(1 + i % 5)]
    for seed in (0, 123):
        assert sample_captions(rows, 200, seed) == _pandas_recipe(rows, 200, seed)


def test_sample_captions_more_than_images_is_an_error():
    with pytest.raises(ValueError, match="asked for 5 captions, one per image, but only 4 images"):
        sample_captions(EXPECTED_ROWS, 5, seed=123)
    assert len(sample_captions(EXPECTED_ROWS, 4, seed=123)) == 4


# --- crop + resize ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size,box", [((23, 20), (2, 0, 22, 20)),  # excess 3: round(1.5) = 2
                                      ((20, 27), (0, 4, 20, 24)),  # excess 7: round(3.5) = 4
                                      ((30, 17), (6, 0, 23, 17)),  # excess 13: round(6.5) = 6 (half to even)
                                      ((16, 16), (0, 0, 16, 16))])
def test_center_crop_box_by_hand(size, box):
    assert center_crop_box(*size) == box


@pytest.mark.parametrize("name,box", [(IMAGES[0][1], (2, 0, 22, 20)), (IMAGES[1][1], (0, 4, 20, 24))])
def test_center_crop_resize_landscape_and_portrait(name, box):
    image = _decoded(name)
    expected = np.asarray(image.crop(box).resize((8, 8), Image.Resampling.LANCZOS))
    out = center_crop_resize(image, 8)
    assert out.dtype == np.uint8 and out.shape == (8, 8, 3)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(center_crop_resize(np.asarray(image), 8), expected)  # HWC array input
    upscaled = np.asarray(image.crop(box).resize((64, 64), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(center_crop_resize(image, 64), upscaled)


def test_center_crop_matches_torchvision_center_crop():
    tvf = pytest.importorskip("torchvision.transforms.functional")
    for _, name, _, _ in IMAGES:
        image = _decoded(name)
        official = tvf.center_crop(image, min(image.size)).resize((12, 12), Image.LANCZOS)  # DMD2's two lines
        np.testing.assert_array_equal(center_crop_resize(image, 12), np.asarray(official))


# --- reference images -------------------------------------------------------------------------------------


def _expected_batch(names, size):
    return np.stack([center_crop_resize(_decoded(n), size) for n in names])


def test_iter_reference_images_local_and_file_url(coco_local):
    _, folder = coco_local
    names = [name for _, name, _, _ in IMAGES]
    for url in (folder, f"file://{folder}", folder + "/"):
        batches = list(iter_reference_images(url, names, size=8, batch_size=3, workers=2))
        assert [b.shape for b in batches] == [(3, 8, 8, 3), (1, 8, 8, 3)]
        assert all(b.dtype == np.uint8 for b in batches)
        np.testing.assert_array_equal(np.concatenate(batches), _expected_batch(names, 8))
    assert list_reference_images(folder) == sorted(names)


def test_iter_reference_images_s3(coco_s3, s3_options):
    ann_url, folder = coco_s3
    rows = sample_captions(read_coco_annotations(ann_url, **s3_options), 3, seed=123)
    names = [r[1] for r in rows]
    batches = list(iter_reference_images(folder, names, size=8, batch_size=2, **s3_options))
    np.testing.assert_array_equal(np.concatenate(batches), _expected_batch(names, 8))
    assert list_reference_images(folder, **s3_options) == sorted(FILES)


def test_missing_reference_image_is_one_line_error(coco_local, coco_s3, s3_options):
    _, folder = coco_local
    names = [IMAGES[0][1], "COCO_val2014_000000999999.jpg"]
    with pytest.raises(FileNotFoundError, match=r"COCO_val2014_000000999999\.jpg: not found") as e:
        list(iter_reference_images(folder, names, size=8))
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match=r"s3://.*/val2014/COCO_val2014_000000999999\.jpg: not found"):
        list(iter_reference_images(coco_s3[1], names, size=8, **s3_options))


def test_unreadable_reference_image_is_one_line_error(coco_local):
    _, folder = coco_local
    with open(f"{folder}/broken.jpg", "wb") as f:
        f.write(b"not a jpeg")
    with pytest.raises(ValueError, match=r"broken\.jpg: not a readable image") as e:
        list(iter_reference_images(folder, ["broken.jpg"], size=8))
    assert "\n" not in str(e.value)


# --- registry ---------------------------------------------------------------------------------------------


def test_protocol_registry():
    assert (PROTOCOLS["coco30k"].n, PROTOCOLS["coco30k"].resolution) == (30_000, 256)
    assert (PROTOCOLS["coco10k"].n, PROTOCOLS["coco10k"].reference_is_caption_images) == (10_000, True)
    cifar = get_protocol("cifar10-50k")
    assert (cifar.n, cifar.resolution, cifar.class_balanced) == (50_000, 32, True)
    assert get_protocol("digits").resolution == 8
    with pytest.raises(ValueError, match="use one of cifar10-50k, coco10k, coco30k, digits"):
        get_protocol("coco5k")


def test_class_balanced_labels():
    labels = class_balanced_labels(50_000, 10)
    assert labels.dtype == torch.long and torch.bincount(labels).tolist() == [5000] * 10
    assert torch.bincount(class_balanced_labels(7, 3)).tolist() == [3, 2, 2]
