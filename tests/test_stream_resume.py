"""Streaming: 2N steps equal N steps + resume in a fresh process, bit-identical on CPU, across a shard
boundary, on file:// and s3:// (moto)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from storage import ArtifactStore, ShardStream, read_manifest, sample_key, write_manifest, write_shard
from tests.helpers import make_trainer

REPO = Path(__file__).resolve().parent.parent
MANIFEST = "pairs/manifest.parquet"
SHARDS, SHARD_SIZE, PAIR_BATCH = 3, 5, 4
# make_trainer updates G (and draws a pair batch) every 2nd step: N = 4 steps read 8 samples, stopping inside the
# second shard; 2N read 16 of the 15-sample epoch, so the resumed run crosses a shard and an epoch boundary.
N = 4

RESUME_SCRIPT = """
import json, os, sys, torch
from pathlib import Path
from safetensors.torch import save_file
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
from storage import ArtifactStore
from tests.test_stream_resume import streaming_trainer
folder, url, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
options = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]} if url.startswith("s3://") else {}
trainer = streaming_trainer(ArtifactStore(url, **options))
trainer.load_state_files({p.name: p.read_bytes() for p in (folder / "ckpt").iterdir()})
for _ in range(n):
    trainer.train_step()
for name, module in (("G", trainer.G.denoiser), ("fake", trainer.mu_fake), ("ema", trainer.ema),
                     ("gan_head", trainer.gan_head)):
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(folder / f"{name}.safetensors"))
(folder / "pairs.json").write_text(json.dumps(trainer.pairs.state_dict()))
"""


def write_pairs(store: ArtifactStore) -> None:
    """SHARDS shards of SHARD_SIZE float32 (1, 8, 8) noise/image pairs with a class in their json, and a manifest."""
    records = []
    for s in range(SHARDS):
        samples = []
        for i in range(s * SHARD_SIZE, (s + 1) * SHARD_SIZE):
            rng = np.random.default_rng(i)
            samples.append({"__key__": sample_key(i), "json": {"index": i, "class": i % 10},
                            "noise.npy": rng.standard_normal((1, 8, 8)).astype(np.float32),
                            "image.npy": rng.uniform(-1, 1, (1, 8, 8)).astype(np.float32)})
        records.append(write_shard(store, f"pairs/{s:06d}.tar", samples))
    write_manifest(store, MANIFEST, records)


def streaming_trainer(store: ArtifactStore):
    """tests.helpers.make_trainer (GAN head, TTUR 2, two-step G, EMA) reading its pairs from the store's shards."""
    records = read_manifest(store, MANIFEST)
    return make_trainer(stream_cls=lambda tensors, batch, seed: ShardStream(store, records, PAIR_BATCH, seed=1,
                                                                            shuffle_buffer=4))


@pytest.fixture
def deterministic():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the resumed process runs; also steadier on a loaded machine
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["file", "s3"])
def test_stream_resume_in_fresh_process_is_bit_identical(store_factory, backend, tmp_path, deterministic):
    from safetensors.torch import load_file

    store = store_factory(backend)
    write_pairs(store)

    first = streaming_trainer(store)
    initial = first.G.denoiser.net.conv_in.weight.detach().clone()
    for _ in range(N):
        first.train_step()
    position = first.pairs.state_dict()
    assert (position["epoch"], position["shard"]) == (0, 1) and position["offset"] > 0, position
    (tmp_path / "ckpt").mkdir()
    for name, data in first.state_files().items():
        (tmp_path / "ckpt" / name).write_bytes(data)
    del first

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if backend == "s3":
        env.update(AWS_ENDPOINT_URL=store.storage_options["endpoint_url"], AWS_ACCESS_KEY_ID="testing",
                   AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    args = [sys.executable, "-c", RESUME_SCRIPT, str(tmp_path), store.root_url, str(N)]
    # The resumed process starts now and runs while this one trains the straight 2N steps.
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        straight = streaming_trainer(store)
        for _ in range(2 * N):
            straight.train_step()
        assert straight.pairs.state_dict()["epoch"] == 1, straight.pairs.state_dict()
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]

    assert json.loads((tmp_path / "pairs.json").read_text()) == straight.pairs.state_dict()
    for name, module in (("G", straight.G.denoiser), ("fake", straight.mu_fake), ("ema", straight.ema),
                         ("gan_head", straight.gan_head)):
        resumed = load_file(str(tmp_path / f"{name}.safetensors"))
        assert resumed.keys() == module.state_dict().keys()
        for key, value in module.state_dict().items():
            assert torch.equal(resumed[key], value), f"{name}.{key} differs after resume"
    # The weights moved, so equality above is not that of two untrained copies.
    assert not torch.equal(straight.G.denoiser.net.conv_in.weight, initial)
