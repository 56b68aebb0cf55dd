"""Shared pytest fixtures. Sections are owned by different modules; append new ones below."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# Prefect, torch and the hub write under HOME unless told otherwise: keep every byte of a test run in one
# temporary folder (temporary files of this process and its subprocesses included), removed when the session ends.
_HOME = tempfile.mkdtemp(prefix="dmd-tests-")
os.environ["TMPDIR"] = _HOME
tempfile.tempdir = None  # recomputed from TMPDIR on next use
# Registered first, so it runs last at exit: after the Prefect test harness removes its own folder in here.
atexit.register(shutil.rmtree, _HOME, True)
os.environ.setdefault("PREFECT_HOME", os.path.join(_HOME, "prefect"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TORCH_HOME", os.path.join(_HOME, "torch"))
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")

# ---------------------------------------------------------------------------
# S3 / artifact-store fixtures (owner: storage/). Self-contained: a real moto
# server on 127.0.0.1 and an ArtifactStore per backend (memory, file, s3).
# ---------------------------------------------------------------------------
import uuid

import pytest

S3_BUCKET = "dmd-test"
_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_endpoint():
    """Endpoint URL of a real moto S3 server with bucket S3_BUCKET, up for the whole session."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        for name, value in _S3_ENV.items():
            mp.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        mp.setenv("NO_PROXY", "127.0.0.1,localhost")
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
        server.start()
        try:
            host, port = server.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            import boto3

            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=S3_BUCKET)
            yield endpoint
        finally:
            server.stop()


@pytest.fixture
def s3_options(s3_endpoint):
    """storage_options for s3fs pointing at the moto server."""
    return {"endpoint_url": s3_endpoint}


def make_store(backend: str, tmp_path, request):
    """An ArtifactStore with a fresh root on `backend` ('memory', 'file' or 's3')."""
    from storage import ArtifactStore

    unique = uuid.uuid4().hex[:12]
    if backend == "memory":
        return ArtifactStore(f"memory://dmd-test-{unique}")
    if backend == "file":
        return ArtifactStore(f"file://{tmp_path}/store-{unique}")
    if backend == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        return ArtifactStore(f"s3://{S3_BUCKET}/{unique}", endpoint_url=endpoint)
    raise ValueError(f"unknown store backend {backend!r}")


@pytest.fixture
def store_factory(request, tmp_path):
    """Callable backend -> fresh ArtifactStore; memory:// roots are removed afterwards."""
    made = []

    def factory(backend: str):
        made.append(make_store(backend, tmp_path, request))
        return made[-1]

    yield factory
    for s in made:
        if s.root_url.startswith("memory://") and s.fs.exists(s.root_url):
            s.fs.rm(s.root_url, recursive=True)


@pytest.fixture(params=["memory", "file", "s3"])
def store(request, store_factory):
    """An empty ArtifactStore on each backend in turn."""
    return store_factory(request.param)


# --- end of S3 / artifact-store fixtures -----------------------------------


# ---------------------------------------------------------------------------
# Prefect and pipeline fixtures (owner: flows/, tasks/).
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def prefect_api():
    """One temporary Prefect server for every flow test of the session (its API URL)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def tiny_run(prefect_api, tmp_path_factory):
    """The whole pipeline on the `digits-tiny` preset, once per session: (root, run_name, flow output)."""
    from flows.pipeline import dmd

    root = str(tmp_path_factory.mktemp("artifacts"))
    out = dmd(preset="digits-tiny", root=root, run_name="tiny")
    return root, "tiny", out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest, and steadiest on a loaded 2-core runner, on one intra-op thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
