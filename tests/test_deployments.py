"""Every deployment in prefect.yaml points at an importable flow `dmd` whose parameters validate."""
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOYMENTS = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]


def test_expected_deployments_are_declared():
    names = {d["name"] for d in DEPLOYMENTS}
    assert {"full-pipeline", "pairs", "distill", "export", "evaluate", "nightly-eval"} <= names
    nightly = next(d for d in DEPLOYMENTS if d["name"] == "nightly-eval")
    assert nightly["schedules"][0]["cron"] and nightly["parameters"]["evaluate_all_checkpoints"] is True


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d["name"])
def test_entrypoint_imports_and_parameters_validate(deployment, monkeypatch):
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(REPO)
    flow = load_flow_from_entrypoint(deployment["entrypoint"])
    assert flow.name == "dmd"
    flow.validate_parameters(deployment.get("parameters") or {})
