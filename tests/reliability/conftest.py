"""One uninterrupted tiny run per session: the reference bytes the crash and corruption tests reproduce."""
import time

import pytest

from tests.reliability.harness import env_for, outputs, pipeline_command, start


def run_to_end(cmd, env, log) -> None:
    proc = start(cmd, env, log)
    assert proc.wait(600) == 0, log.read_text()[-3000:]


@pytest.fixture(scope="session")
def baseline(prefect_api, tmp_path_factory):
    """(root, run folder, its outputs, seconds it took) of one uninterrupted run of the tiny pipeline."""
    root = tmp_path_factory.mktemp("baseline")
    t0 = time.time()
    run_to_end(pipeline_command(root, "crash"), env_for(prefect_api), root / "log.txt")
    return root, root / "crash", outputs(root / "crash"), time.time() - t0
