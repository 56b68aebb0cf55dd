"""The tiny full pipelines with root=s3://… on a real (moto) S3 server, the endpoint given in the config: every
stage's artifacts land in the bucket, the pairs stream back from it during training, and nothing is written to
local disk outside temporary folders."""
import os
import uuid
from pathlib import Path

import pytest

from storage import ArtifactStore
from storage.layout import run_store
from tasks.stages import STAGE_SPECS

REPO = Path(__file__).resolve().parent.parent
SECRET = "dmd-test-secret-" + uuid.uuid4().hex  # moto accepts any key pair


def project_files() -> set[str]:
    """Files under the project folder, minus byte-code caches and git's own."""
    out = set()
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in ("__pycache__", ".git", ".pytest_cache", ".venv")]
        out.update(os.path.relpath(os.path.join(folder, f), REPO) for f in files)
    return out


@pytest.mark.parametrize("preset", ["pixel-tiny", "sd-tiny"])
def test_tiny_pipeline_on_s3(prefect_api, s3_endpoint, tmp_path, monkeypatch, preset):
    import fsspec.config
    from prefect.blocks.system import Secret

    from flows.pipeline import dmd

    # fresh process-wide S3 settings for this test only; the endpoint comes from the config, not the environment
    monkeypatch.setitem(fsspec.config.conf, "s3", {})
    for name in ("FSSPEC_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, os.environ.get(name, "unset"))
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    block = f"dmd-s3-{uuid.uuid4().hex[:8]}"
    Secret(value={"aws_access_key_id": "testing", "aws_secret_access_key": SECRET}).save(block)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = project_files()

    root = f"s3://dmd-test/{uuid.uuid4().hex}"
    dmd(preset=preset, root=root, run_name="r",
        overrides=[f"storage.endpoint_url={s3_endpoint}", f"storage.credentials_block={block}"])

    store = run_store(root, "r", endpoint_url=s3_endpoint)
    keys = store.ls()
    for stage in ("teacher", "pairs", "distill", "export"):
        assert STAGE_SPECS[stage].marker in keys, stage
    expected = ["config.json", "teacher/unet/config.json", "pairs/manifest.parquet", "pairs/shard-000000.tar",
                "distill/metrics.parquet", "distill/checkpoints/step-00000004/generator.safetensors",
                "distill/checkpoints/step-00000004/rng.safetensors", "distill/samples/step-00000004.png",
                "export/model_index.json", "export/unet/diffusion_pytorch_model.safetensors",
                "eval/summary.json"]  # the tiny presets have no metric protocol: evaluate writes its summary only
    assert [k for k in expected if k not in keys] == []
    if preset == "sd-tiny":
        assert {"teacher/vae/config.json", "export/vae/config.json", "export/text_encoder/config.json"} <= set(keys)
    # the credentials stayed out of every artifact; the config names the block only
    config = store.read_json("config.json")
    assert config["storage"] == {"endpoint_url": s3_endpoint, "credentials_block": block}
    for key in keys:
        assert SECRET.encode() not in store.read_bytes(key), key
    # nothing local: the working folder is empty, the project folder unchanged
    assert list(cwd.iterdir()) == []
    assert project_files() == before
    assert ArtifactStore("s3://dmd-test", endpoint_url=s3_endpoint).exists(f"{root[len('s3://dmd-test/'):]}/r/config.json")
