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


def test_a_killed_writers_temporary_is_invisible_and_swept(tmp_path):
    store = ArtifactStore(f"file://{tmp_path}/run")
    writer = store.open("pairs/shard-000000.tar", "wb")
    writer.write(b"partial")  # the process dies here: the temporary stays on disk
    leftover = [p for p in (tmp_path / "run" / "pairs").iterdir() if p.name.startswith(TMP_PREFIX)]
    assert len(leftover) == 1 and store.ls() == [] and not store.exists("pairs/shard-000000.tar")
    assert sweep_temporaries(store) == [str(leftover[0])]
    assert list((tmp_path / "run" / "pairs").iterdir()) == []
    writer.abort()
