"""Real images for the GAN (`storage.real_images`): img2dataset WebDataset tars, folders and parquet, on file://,
memory:// and s3:// (moto); centre crop + Lanczos as the protocols; bad images counted, named and skipped, and a
reader that fails past the bad-image limit."""
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from dmd_core.protocols import center_crop_resize
from storage.real_images import SkipReport, detect_format, iter_real_images


def encoded(rng, w, h, fmt="JPEG", mode="RGB") -> bytes:
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 255, (h, w, channels), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode).save(buf, format=fmt)
    return buf.getvalue()


def expected(data: bytes, r: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return center_crop_resize(im, r)


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_img2dataset_shards_on_every_backend(store):
    rng = np.random.default_rng(0)
    a, b, c = encoded(rng, 40, 30), encoded(rng, 24, 36, "PNG", "RGBA"), encoded(rng, 32, 32, "WEBP")
    d = encoded(rng, 20, 20, "PNG", "L")
    store.write_bytes("shards/00001.tar", tar_bytes([
        ("00001/000010.jpg", c), ("00001/000010.json", json.dumps({"caption": " a webp cat ", "url": "x"}).encode()),
        ("00001/000011.json", json.dumps({"status": "failed_to_download"}).encode()),  # not a sample
        ("00001/000012.png", d)]))
    store.write_bytes("shards/00000.tar", tar_bytes([
        ("00000/000000.jpg", a), ("00000/000000.txt", b"a red bus\n"), ("00000/000000.json", b'{"caption": "x"}'),
        ("00000/000001.png", b), ("00000/000001.txt", "un caffè".encode()),
        ("00000/000002.jpg", b"\xff\xd8 not really a jpeg"), ("00000/000002.txt", b"broken")]))
    root = store.url("shards")
    assert detect_format(type(store)(root, **store.storage_options)) == "webdataset"
    report = SkipReport()
    got = list(iter_real_images(root, 16, report, max_bad_fraction=0.25, **store.storage_options))
    assert [g.key for g in got] == ["00000.tar:00000/000000", "00000.tar:00000/000001", "00001.tar:00001/000010",
                                    "00001.tar:00001/000012"]
    assert [g.caption for g in got] == ["a red bus", "un caffè", "a webp cat", None]  # .txt wins over .json
    for g, data in zip(got, (a, b, c, d)):
        assert g.image.dtype == np.uint8 and g.image.shape == (16, 16, 3)
        assert np.array_equal(g.image, expected(data, 16))
    assert report.seen == 5 and [n for n, _ in report.bad] == ["00000.tar:00000/000002"]
    assert report.as_dict()["bad"] == 1 and "UnidentifiedImageError" in report.bad[0][1]


def test_folder_and_parquet(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    a, b = encoded(rng, 50, 20), encoded(rng, 20, 50, "PNG")
    (folder / "b.jpg").write_bytes(a)
    (folder / "b.txt").write_text("  two dogs  ")
    (folder / "sub" / "a.png").write_bytes(b)
    (folder / "notes.md").write_text("not an image")
    report = SkipReport()
    got = list(iter_real_images(str(folder), 8, report))
    assert [(g.key, g.caption) for g in got] == [("b.jpg", "two dogs"), ("sub/a.png", None)]
    assert np.array_equal(got[0].image, expected(a, 8)) and report.seen == 2 and not report.bad

    import pyarrow.parquet as pq

    (tmp_path / "p").mkdir()  # rows as Hugging Face datasets store images: {"bytes", "path"}
    pq.write_table(pa.table({"image": [{"bytes": a, "path": "a"}, {"bytes": b, "path": "b"}],
                             "text": ["one", "two"]}), tmp_path / "p" / "0.parquet")
    got = list(iter_real_images(str(tmp_path / "p"), 8, SkipReport()))
    assert [(g.key, g.caption) for g in got] == [("0.parquet:0", "one"), ("0.parquet:1", "two")]
    assert np.array_equal(got[1].image, expected(b, 8))
    pq.write_table(pa.table({"pixels": [a]}), tmp_path / "p" / "1.parquet")
    with pytest.raises(ValueError, match=r"1\.parquet: no image column"):
        list(iter_real_images(str(tmp_path / "p"), 8, SkipReport()))


def test_more_bad_images_than_the_limit_fail_naming_them(tmp_path):
    rng = np.random.default_rng(2)
    for i in range(99):
        (tmp_path / f"{i:03d}.png").write_bytes(encoded(rng, 8, 8, "PNG"))
    (tmp_path / "zz-bad.jpg").write_bytes(b"garbage")
    assert len(list(iter_real_images(str(tmp_path), 8, SkipReport()))) == 99  # 1 of 100: at the 1 % limit
    (tmp_path / "zz-bad2.png").write_bytes(b"garbage")
    report = SkipReport()
    with pytest.raises(ValueError, match=r"2 of 101 images are unreadable \(more than 1\.0%\): zz-bad\.jpg"):
        list(iter_real_images(str(tmp_path), 8, report))
    with pytest.raises(ValueError, match="no folder samples"):
        list(iter_real_images(str(tmp_path / "empty"), 8, SkipReport()))
