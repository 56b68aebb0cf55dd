"""What a run leaves: exports that are byte-reproducible and carry their evaluation, files that follow the
umask, no temporary file of a killed writer once the next run starts."""
import json
import os
import stat

import pytest

from storage import ArtifactStore
from storage.layout import EXPORT_MARKER
from storage.store import TMP_PREFIX, current_umask, sweep_temporaries

pytestmark = pytest.mark.slow


def test_export_folder_holds_no_marker_no_load_path_and_the_evaluation(tiny_run):
    root, run, out = tiny_run
    folder = os.path.join(root, run)
    export = os.path.join(folder, "export")
    names = [os.path.relpath(os.path.join(d, f), export) for d, _, fs in os.walk(export) for f in fs]
    assert "_complete.json" not in {os.path.basename(n) for n in names}
    assert json.load(open(os.path.join(folder, EXPORT_MARKER)))["step"] == 4
    for name in names:
        if name.endswith(".json"):
            assert "_name_or_path" not in json.load(open(os.path.join(export, name))), name
    card = open(os.path.join(export, "README.md")).read()
    assert "## Evaluation" in card and "checkpoint step 4" in card
    student_fd = next(r["value"] for r in out["evaluate"]["rows"] if r["model"] == "student" and r["metric"] == "fd")
    assert f"| DMD 1-step | 1 | {student_fd:.2f} |" in card


def test_run_files_follow_the_umask(tiny_run):
    root, run, _ = tiny_run
    expected = 0o666 & ~current_umask()
    modes = {stat.S_IMODE(os.stat(os.path.join(d, f)).st_mode) for d, _, fs in os.walk(os.path.join(root, run))
             for f in fs}
    assert modes == {expected}, sorted(oct(m) for m in modes)


DEAD_WRITER = """
import os, sys
from storage import ArtifactStore
writer = ArtifactStore(sys.argv[1]).open("pairs/shard-000000.tar", "wb")
writer.write(b"partial")
writer.flush()
os._exit(0)  # dies mid-write: the temporary stays on disk
"""


def test_a_killed_writers_temporary_is_invisible_and_swept_a_live_ones_kept(tmp_path):
    import subprocess
    import sys

    from tests.reliability.harness import REPO

    url = f"file://{tmp_path}/run"
    subprocess.run([sys.executable, "-c", DEAD_WRITER, url], cwd=REPO, check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    store = ArtifactStore(url)
    live = store.open("pairs/shard-000001.tar", "wb")
    live.write(b"in progress")
    temporaries = sorted(p.name for p in (tmp_path / "run" / "pairs").iterdir())
    assert len(temporaries) == 2 and all(n.startswith(TMP_PREFIX) for n in temporaries)
    assert store.ls() == [] and not store.exists("pairs/shard-000000.tar")
    swept = sweep_temporaries(store)
    assert len(swept) == 1 and "shard-000000.tar" in swept[0]
    live.close()
    assert store.ls() == ["pairs/shard-000001.tar"] and store.read_bytes("pairs/shard-000001.tar") == b"in progress"
