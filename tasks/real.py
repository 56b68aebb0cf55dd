"""Stage `real`: real images for DMD2's GAN (DMD2 §4.2), read once into shards in the teacher's model space.

`data.real` names the images (`storage.real_images`: img2dataset tars, a folder or parquet). Each is centre-cropped
and resized to the teacher's image size, then encoded: latent teachers store the VAE posterior's mode, scaled as the
teacher's samples (DMD2 `main/sdxl/generate_vae_latents.py` encodes its LAION images once, the same way); pixel
teachers store the image in [-1, 1]. A shard holds `image.npy` and a json with the index, the caption as `prompt`
(text teachers), or the caption as `class` (class-conditional teachers), and the source sample's name.

Deterministic, resumable and idempotent: the images are read in one fixed order; after each shard the manifest
records it with the reader's position and the unreadable images so far, so a resumed stage skips what is written
(undecoded) and writes the same shards an uninterrupted one would. Unreadable images are skipped, counted and named
in `real/report.json`; more than `data.real.max_bad_fraction` of them fails the stage.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from prefect import task
from prefect.cache_policies import NONE

from storage import ShardRecord, read_manifest, shard_damage, write_manifest, write_shard
from storage.layout import REAL_MANIFEST, REAL_REPORT, real_shard_key
from storage.manifest import read_manifest_metadata
from storage.real_images import RealImage, SkipReport, iter_real_images
from tasks.context import device_for, open_run, run_teacher
from tasks.gpu_slots import gpu_slots
from tasks.stages import REAL_STAGE

ENCODE_BATCH = 16


def kept_shards(store, cfg) -> list[ShardRecord]:
    """The manifest's shards 0..k-1 written under this config with a valid sha256 (the first gap ends them)."""
    key, kept = REAL_STAGE.key(cfg), []
    for i, rec in enumerate(sorted(read_manifest(store, REAL_MANIFEST), key=lambda r: r.first_index)):
        if rec.producer_hash != key or rec.shard != real_shard_key(i):
            break
        damage = shard_damage(store, rec)
        if damage is not None:
            print(f"real: {store.url(rec.shard)} is damaged or missing ({damage}); rewriting from there")
            break
        kept.append(rec)
    return kept


def model_space(teacher, images: list[RealImage], channels: int, device: torch.device) -> np.ndarray:
    """uint8 (R, R, 3) images -> the teacher's model space (float32 numpy, one row per image)."""
    if channels == 1:  # PIL's ITU-R 601-2 luma, as `.convert("L")` gives it
        arrays = [np.asarray(Image.fromarray(im.image).convert("L"))[None] for im in images]
    else:
        arrays = [im.image.transpose(2, 0, 1) for im in images]
    x = torch.from_numpy(np.stack(arrays)).float().div(127.5).sub(1).to(device)
    with torch.no_grad():
        return teacher.encode_images(x).float().cpu().numpy()


def sample_meta(teacher, index: int, image: RealImage) -> dict:
    """The json of one real sample: index, source name, and its caption as the teacher conditions on it."""
    meta = {"index": index, "source": image.key, "class": None}
    if teacher.conditioning == "text":
        meta["prompt"] = image.caption or ""
    elif teacher.num_classes:
        try:
            meta["class"] = int((image.caption or "").strip())
        except ValueError:
            raise ValueError(f"data.real: {image.key} has caption {image.caption!r}; a class-conditional teacher "
                             f"needs each image's class id (0..{teacher.num_classes - 1}) as its caption") from None
    return meta


def run_real(root: str, run_name: str, force: bool = False) -> int:
    """Write the real shards still missing; returns how many were written (0 when done or no `data.real`)."""
    store, cfg = open_run(root, run_name)
    r = cfg.data.real
    if r is None:
        return 0
    if force:
        REAL_STAGE.unmark(store)
        records = []
    elif REAL_STAGE.is_done(store, cfg) and (records := kept_shards(store, cfg)) == sorted(
            read_manifest(store, REAL_MANIFEST), key=lambda x: x.first_index):
        return 0
    else:
        REAL_STAGE.unmark(store)
        records = kept_shards(store, cfg)
    meta = read_manifest_metadata(store, REAL_MANIFEST) if records else {}
    report = SkipReport(meta.get("seen", 0), [tuple(b) for b in meta.get("bad", [])])
    device = device_for(cfg)
    teacher = run_teacher(store, cfg, device)
    channels, side = teacher.image_shape
    index, written, buffer = sum(rec.n_samples for rec in records), 0, []

    def flush() -> None:
        nonlocal index, written, buffer
        rows = np.concatenate([model_space(teacher, buffer[i:i + ENCODE_BATCH], channels, device)
                               for i in range(0, len(buffer), ENCODE_BATCH)])
        samples = [{"__key__": f"{index + j:08d}", "image.npy": rows[j], "json": sample_meta(teacher, index + j, im)}
                   for j, im in enumerate(buffer)]
        records.append(write_shard(store, real_shard_key(len(records)), samples, producer_hash=REAL_STAGE.key(cfg)))
        write_manifest(store, REAL_MANIFEST, records, metadata={"seen": report.seen, "bad": report.bad,
                                                                 "side": side, "channels": channels})
        index, written, buffer = index + len(buffer), written + 1, []

    for image in iter_real_images(r.url, side, report, r.format, r.max_bad_fraction, skip=report.seen):
        if r.n is not None and index + len(buffer) >= r.n:
            break
        buffer.append(image)
        if len(buffer) == r.shard_size:
            flush()
    if buffer:
        flush()
    report.check(r.max_bad_fraction, r.url)
    if index == 0:
        raise ValueError(f"data.real {r.url}: no readable images")
    store.write_json(REAL_REPORT, {**report.as_dict(), "written": index, "shards": len(records)})
    for name, why in report.bad:
        print(f"real: skipped {name}: {why}")
    REAL_STAGE.mark(store, cfg, n=index, shards=len(records), bad=len(report.bad))
    return written


@task(name="real", retries=1, cache_policy=NONE, persist_result=False)
def real_task(root: str, run_name: str, force: bool = False) -> int:
    """Prefect wrapper of run_real (one GPU slot: the VAE encodes on it)."""
    with gpu_slots(open_run(root, run_name)[1]):
        return run_real(root, run_name, force)
