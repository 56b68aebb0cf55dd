"""The `real` stage on sd-tiny: img2dataset-style tars (jpg + txt, one corrupt image) -> VAE latent shards with their
captions, the corrupt image reported and skipped; distill's GAN then reads them; a rerun rewrites nothing."""
import io
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from storage import read_manifest, verify_manifest
from storage.layout import METRICS, REAL_MANIFEST, REAL_REPORT, run_store
from storage.stream import read_shard

REPO = Path(__file__).resolve().parent.parent
N_GOOD, SHARD = 100, 32


def write_tars(folder: Path) -> list[tuple[str, np.ndarray, str]]:
    """Two tars of 48x40 jpgs with txt captions; sample 00000007 of the first is not an image. Returns the good
    ones (name, decoded pixels, caption) in reading order."""
    folder.mkdir()
    rng, good = np.random.default_rng(0), []
    members = [(f"{i:08d}", rng.integers(0, 256, (40, 48, 3), dtype=np.uint8), f"a test caption {i}")
               for i in range(N_GOOD + 1)]
    for t, chunk in enumerate((members[:60], members[60:])):
        with tarfile.open(folder / f"{t:05d}.tar", "w") as tar:
            for key, pixels, caption in chunk:
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
                data = b"this is not a jpeg" if key == "00000007" else buf.getvalue()
                for ext, payload in (("jpg", data), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                if key != "00000007":
                    good.append((f"{t:05d}.tar:{key}", np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")),
                                 caption))
    return good


def test_real_stage_writes_latents_skips_the_corrupt_image_and_feeds_the_gan(prefect_api, tmp_path):
    good = write_tars(tmp_path / "laion")
    root = str(tmp_path / "root")
    args = [sys.executable, "-m", "flows.cli", "run", "--preset", "sd-tiny", "--root", root, "--run-name", "r",
            "--stages", "teacher,real,distill", "--set", f"data.real.url=file://{tmp_path / 'laion'}",
            "--set", f"data.real.shard_size={SHARD}", "--set", "distill.gan.enabled=true",
            "--set", "distill.regression=none", "--set", "distill.steps=2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": prefect_api}
    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    store = run_store(root, "r")
    records = read_manifest(store, REAL_MANIFEST)
    verify_manifest(store, records)
    assert [r.n_samples for r in records] == [32, 32, 32, 4]
    report = store.read_json(REAL_REPORT)
    assert report["seen"] == N_GOOD + 1 and report["bad"] == 1 and report["written"] == N_GOOD
    assert report["bad_samples"][0]["name"] == "00000.tar:00000007"
    assert "00000.tar:00000007" in out.stdout + out.stderr

    # Each stored latent is the VAE posterior's mode of the centre-cropped, Lanczos-resized image, scaled.
    from dmd_core.protocols import center_crop_resize
    from tasks.context import open_run, run_teacher

    _, cfg = open_run(root, "r")
    teacher = run_teacher(store, cfg, torch.device("cpu"))
    samples = [s for r in records for s in read_shard(store, r)]
    assert [s["json"]["index"] for s in samples] == list(range(N_GOOD))
    assert [s["json"]["source"] for s in samples] == [g[0] for g in good]
    assert [s["json"]["prompt"] for s in samples] == [g[2] for g in good]
    side = teacher.image_shape[1]
    for s, (_, pixels, _) in list(zip(samples, good))[:3]:
        x = torch.from_numpy(center_crop_resize(pixels, side).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            expected = (teacher.codec.vae.encode(x).latent_dist.mean - teacher.codec.shift) * teacher.codec.scale
        assert torch.allclose(torch.from_numpy(s["image.npy"]), expected[0], atol=1e-5)

    # distill trained with the GAN on these latents
    rows = store.read_table(METRICS).to_pylist()
    assert rows and all(np.isfinite(r["loss_gan_D"]) for r in rows)

    # A rerun rewrites no shard.
    tokens = {r.shard: store.info(r.shard)["token"] for r in records}
    import tasks.real as real_stage

    assert real_stage.run_real(root, "r") == 0
    assert {r.shard: store.info(r.shard)["token"] for r in read_manifest(store, REAL_MANIFEST)} == tokens

    # SIGKILLed as it starts its third shard, a resumed stage writes shards 2 and 3 only, the same samples as the
    # uninterrupted run (latents to float tolerance: thread counts differ between processes), and the same report.
    killed = subprocess.run([sys.executable, "-c", KILL_AT_THIRD_SHARD, root], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(read_manifest(store, REAL_MANIFEST)) == 2 and not store.exists("real/_complete.json")
    kept = {r.shard: store.info(r.shard)["token"] for r in read_manifest(store, REAL_MANIFEST)}
    assert real_stage.run_real(root, "r") == 2
    resumed = read_manifest(store, REAL_MANIFEST)
    verify_manifest(store, resumed)
    assert [r.shard for r in resumed] == [r.shard for r in records]
    assert {r.shard: store.info(r.shard)["token"] for r in resumed if r.shard in kept} == kept
    again = [s for r in resumed for s in read_shard(store, r)]
    assert [(s["__key__"], s["json"]) for s in again] == [(s["__key__"], s["json"]) for s in samples]
    for a, b in zip(again, samples):
        np.testing.assert_allclose(a["image.npy"], b["image.npy"], atol=1e-5)
    assert store.read_json(REAL_REPORT) == report


# The real stage rerun from scratch in a fresh process, killed (SIGKILL: no handler, no finally) as it begins to
# write its third shard.
KILL_AT_THIRD_SHARD = """
import os, signal, sys
import tasks.real as real_stage
write_shard, calls = real_stage.write_shard, []
def write_or_die(*args, **kwargs):
    calls.append(args[1])
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return write_shard(*args, **kwargs)
real_stage.write_shard = write_or_die
real_stage.run_real(sys.argv[1], "r", force=True)
"""


def test_real_stage_on_s3(prefect_api, s3_endpoint, tmp_path, monkeypatch):
    """Real images read from a bucket, shards written to a run root in it (moto's S3 server)."""
    import uuid

    import fsspec
    import fsspec.config

    from flows.pipeline import dmd

    monkeypatch.setitem(fsspec.config.conf, "s3", {})
    write_tars(tmp_path / "laion")
    data = f"s3://dmd-test/{uuid.uuid4().hex}/laion"
    fs = fsspec.filesystem("s3", endpoint_url=s3_endpoint)
    for tar in sorted((tmp_path / "laion").iterdir()):
        fs.put_file(str(tar), f"{data}/{tar.name}")
    root = f"s3://dmd-test/{uuid.uuid4().hex}"
    dmd(preset="sd-tiny", root=root, run_name="r", stages=["teacher", "real", "distill"],
        overrides=[f"storage.endpoint_url={s3_endpoint}", f"data.real.url={data}", f"data.real.shard_size={SHARD}",
                   "distill.gan.enabled=true", "distill.regression=none", "distill.steps=2"])
    store = run_store(root, "r", endpoint_url=s3_endpoint)
    records = read_manifest(store, REAL_MANIFEST)
    verify_manifest(store, records)
    assert sum(r.n_samples for r in records) == N_GOOD
    assert store.read_json(REAL_REPORT)["bad_samples"][0]["name"] == "00000.tar:00000007"
    assert all(np.isfinite(r["loss_gan_D"]) for r in store.read_table(METRICS).to_pylist())
