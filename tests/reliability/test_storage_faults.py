"""Storage faults on a real S3 endpoint (moto behind a fault-injecting proxy): transient 503s and dropped
connections are retried with backoff; a permanent failure raises and leaves no object, never a partial one."""
import time
import uuid

import pytest

from storage import ArtifactStore, verify_shard, write_shard
from tests.conftest import S3_BUCKET
from tests.reliability.flaky_proxy import FlakyProxy


def direct(s3_endpoint, prefix):
    return ArtifactStore(f"s3://{S3_BUCKET}/{prefix}", endpoint_url=s3_endpoint)


def faults_on(method, pattern, outcomes):
    """A rule: the n-th `method` request whose path contains `pattern` gets outcomes[n] (then "ok")."""
    def rule(m, path, n):
        return outcomes[n] if m == method and pattern in path and n < len(outcomes) else "ok"
    return rule


@pytest.mark.parametrize("outcomes", [["503", "503"], ["drop"], ["503", "drop", "503"]])
def test_transient_write_faults_are_retried(s3_endpoint, outcomes):
    prefix = uuid.uuid4().hex[:8]
    data = bytes(range(256)) * 64
    with FlakyProxy(s3_endpoint, faults_on("PUT", "/obj.bin", outcomes)) as proxy:
        store = ArtifactStore(f"s3://{S3_BUCKET}/{prefix}", endpoint_url=proxy.url)
        store.write_bytes("obj.bin", data)
    puts = [o for m, p, o in proxy.log if m == "PUT" and p.endswith("/obj.bin")]
    assert puts == [*outcomes, "ok"]  # every fault was answered by another attempt
    assert direct(s3_endpoint, prefix).read_bytes("obj.bin") == data


def test_transient_read_faults_are_retried(s3_endpoint):
    prefix = uuid.uuid4().hex[:8]
    direct(s3_endpoint, prefix).write_bytes("r.json", b'{"a": 1}')
    with FlakyProxy(s3_endpoint, faults_on("GET", "/r.json", ["503", "drop"])) as proxy:
        assert ArtifactStore(f"s3://{S3_BUCKET}/{prefix}", endpoint_url=proxy.url).read_json("r.json") == {"a": 1}
    assert [o for m, p, o in proxy.log if m == "GET" and p.endswith("/r.json")] == ["503", "drop", "ok"]


def test_retries_back_off(s3_endpoint):
    """The gaps between attempts grow: retries are not a tight loop."""
    prefix, stamps = uuid.uuid4().hex[:8], []

    def rule(m, path, n):
        if m == "PUT" and path.endswith("/b.bin"):
            stamps.append(time.monotonic())
            return "503" if n < 3 else "ok"
        return "ok"

    with FlakyProxy(s3_endpoint, rule) as proxy:
        ArtifactStore(f"s3://{S3_BUCKET}/{prefix}", endpoint_url=proxy.url).write_bytes("b.bin", b"x" * 100)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert len(gaps) == 3 and sum(gaps) > 0.05, gaps


@pytest.mark.parametrize("fault", ["503", "drop"])
def test_a_permanent_failure_raises_and_leaves_no_object(s3_endpoint, fault):
    prefix = uuid.uuid4().hex[:8]
    with FlakyProxy(s3_endpoint, lambda m, p, n: fault if m in ("PUT", "POST") else "ok") as proxy:
        # fewer botocore attempts than its default (about 40 s before giving up) to keep the test short
        store = ArtifactStore(f"s3://{S3_BUCKET}/{prefix}", endpoint_url=proxy.url,
                              config_kwargs={"retries": {"max_attempts": 2, "mode": "standard"}})
        t0 = time.time()
        with pytest.raises(Exception) as err:
            store.write_bytes("gone.bin", b"y" * 1000)
        assert time.time() - t0 < 120
    # a clean error the task fails with: S3's own answer, or the dropped connection naming the object
    assert "reduce your request rate" in str(err.value) or "gone.bin" in str(err.value), err.value
    assert len([1 for m, _, _ in proxy.log if m == "PUT"]) > 2  # it was retried before giving up
    after = direct(s3_endpoint, prefix)
    assert after.ls() == []  # no object, whole or partial


def test_a_shard_written_through_faults_verifies(s3_endpoint):
    prefix = uuid.uuid4().hex[:8]
    samples = [{"__key__": f"{i:08d}", "json": {"index": i}} for i in range(8)]
    with FlakyProxy(s3_endpoint, faults_on("PUT", "shard-000000.tar", ["drop", "503"])) as proxy:
        store = ArtifactStore(f"s3://{S3_BUCKET}/{prefix}", endpoint_url=proxy.url)
        record = write_shard(store, "pairs/shard-000000.tar", samples)
    verify_shard(direct(s3_endpoint, prefix), record)
    assert record.n_samples == 8
