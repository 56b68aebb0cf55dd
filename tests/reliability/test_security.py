"""Security: nothing unpickles, keys cannot escape the root, credentials never reach logs, configs or artifacts."""
import ast
from pathlib import Path

import pytest

from storage import ArtifactStore
from storage.layout import run_store

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for d in ("dmd_core", "storage", "tasks", "flows", "bench") for p in (REPO / d).rglob("*.py"))
UNPICKLERS = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            yield (owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")), node.func.attr, node


def keyword(node, name):
    return next((k.value for k in node.keywords if k.arg == name), None)


def test_nothing_unpickles():
    """torch.load only with weights_only=True, np.load only with allow_pickle=False, no pickle-family modules."""
    problems = []
    assert len(SOURCES) > 40
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        where = path.relative_to(REPO)
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            problems += [f"{where}: imports {n}" for n in names if n.split(".")[0] in UNPICKLERS]
        for owner, attr, node in calls(tree):
            if owner == "torch" and attr == "load":
                value = keyword(node, "weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    problems.append(f"{where}:{node.lineno}: torch.load without weights_only=True")
            if owner in ("np", "numpy") and attr == "load":
                value = keyword(node, "allow_pickle")
                if not (isinstance(value, ast.Constant) and value.value is False):
                    problems.append(f"{where}:{node.lineno}: np.load without allow_pickle=False")
            if attr == "read_pickle":
                problems.append(f"{where}:{node.lineno}: read_pickle")
    assert not problems, "\n".join(problems)


def test_the_checker_finds_an_unpickling_call():
    tree = ast.parse("import torch, numpy as np\ntorch.load(p)\nnp.load(p, allow_pickle=True)\n")
    found = [(o, a) for o, a, n in calls(tree) if a == "load" and keyword(n, "weights_only") is None]
    assert found == [("torch", "load"), ("np", "load")]


ESCAPES = ["../x", "a/../../x", "/etc/passwd", "a/./b", "s3://other-bucket/x", "file:///etc/x", "a\\..\\x", "",
           "a//b", "..", "x\x00y", ".dmd-tmp-x"]


@pytest.mark.parametrize("key", ESCAPES)
def test_keys_cannot_escape_the_root(tmp_path, key):
    store = ArtifactStore(f"file://{tmp_path}/root")
    before = sorted(tmp_path.rglob("*"))
    for op in (lambda: store.write_bytes(key, b"x"), lambda: store.read_bytes(key), lambda: store.exists(key),
               lambda: store.delete(key), lambda: store.open(key, "wb"), lambda: store.child(key)):
        with pytest.raises(ValueError):
            op()
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("name", ["..", "../x", "/abs", "a/b", "", ".hidden", "x:y"])
def test_run_names_cannot_escape_the_root(tmp_path, name):
    with pytest.raises(ValueError):
        run_store(str(tmp_path), name)


def test_a_manifest_naming_a_key_outside_the_run_is_refused(tmp_path):
    from storage import ShardRecord, verify_shard

    store = ArtifactStore(f"file://{tmp_path}/root")
    (tmp_path / "secret").write_bytes(b"x")
    record = ShardRecord(shard="../secret", url="", n_samples=1, first_index=0, last_index=0, sha256="0" * 64,
                         n_bytes=1, created_at="", producer_hash="h")
    with pytest.raises(ValueError, match="'..'"):
        verify_shard(store, record)


SECRET_ID, SECRET_KEY = "AKIADMDCANARY0000001", "dmd-canary-secret-k3y-do-not-log"


def test_credentials_never_reach_logs_configs_or_artifacts(s3_endpoint, prefect_api, monkeypatch, capfd, one_thread):
    """A run on S3 (moto) with distinctive credentials: nothing the run wrote or logged contains them."""
    import boto3
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from flows.pipeline import dmd
    from tests.conftest import S3_BUCKET

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", SECRET_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    root = f"s3://{S3_BUCKET}/secure"
    state = dmd(preset="digits-tiny", root=root, run_name="s", stages=["teacher", "pairs"], return_state=True)
    assert state.is_completed()
    flow_run_id = state.state_details.flow_run_id
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=S3_BUCKET, Prefix="secure/")["Contents"]]
    assert "secure/s/config.json" in keys and any(k.endswith(".tar") for k in keys)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        artifacts = client.read_artifacts()
        flow_run = client.read_flow_run(flow_run_id)
    assert logs and artifacts
    texts = {"logs": "\n".join(log.message for log in logs),
             "artifacts": "\n".join(f"{a.key} {a.data} {a.description}" for a in artifacts),
             "flow run": flow_run.model_dump_json(), "output": "".join(capfd.readouterr())}
    for key in keys:
        if not key.endswith((".tar", ".safetensors", ".parquet", ".png")):
            texts[key] = s3.get_object(Bucket=S3_BUCKET, Key=key)["Body"].read().decode("utf-8", "replace")
    leaked = [name for name, text in texts.items() if SECRET_ID in text or SECRET_KEY in text]
    assert not leaked, leaked
