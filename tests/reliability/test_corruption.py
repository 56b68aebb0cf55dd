"""Corruption: a truncated, bit-flipped or deleted shard and a tampered checkpoint are detected and named; pairs
regenerates only the bad shard; a damaged latest checkpoint falls back to the previous valid one, saying so."""
import shutil

import pytest

from storage import ChecksumError
from tests.reliability.harness import files, outputs, record_figures

pytestmark = pytest.mark.slow
BAD_SHARD = "pairs/shard-000001.tar"
FIGURES = {"tried": 0, "detected": 0}


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip(path, offset=2000):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def delete(path):
    path.unlink()


@pytest.fixture
def copy(baseline, tmp_path):
    """A private copy of the finished tiny run: (root, run folder)."""
    _, run, _, _ = baseline
    shutil.copytree(run, tmp_path / "crash")
    return tmp_path, tmp_path / "crash"


@pytest.fixture(scope="module", autouse=True)
def figures():
    yield
    record_figures("corruption", **FIGURES)


@pytest.mark.parametrize("damage", [truncate, flip, delete])
def test_a_damaged_shard_is_named_and_only_it_is_regenerated(copy, baseline, damage, capsys, one_thread):
    from tasks.pairs import plan_pairs, record_shards, run_pairs_shard

    root, run = copy
    before = files(run / "pairs")
    damage(run / BAD_SHARD)
    FIGURES["tried"] += 1
    todo, kept = plan_pairs(str(root), "crash")
    named = BAD_SHARD in capsys.readouterr().out
    assert todo == [1] and named
    FIGURES["detected"] += 1
    record_shards(str(root), "crash", [*kept, run_pairs_shard(str(root), "crash", 1)], complete=True)
    after = files(run / "pairs")
    assert {k: v for k, v in after.items() if k.startswith("pairs/shard")} == \
           {k: v for k, v in before.items() if k.startswith("pairs/shard")}
    assert plan_pairs(str(root), "crash")[0] == []


@pytest.mark.parametrize("damage", [truncate, flip, delete])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(copy, baseline, damage, capsys, one_thread):
    from tasks.distill import run_distill

    root, run = copy
    expected = {k: v for k, v in baseline[2].items() if k.startswith("distill/")}
    (run / "distill" / "_complete.json").unlink()  # as if killed after the last checkpoint, before the marker
    damage(run / "distill" / "checkpoints" / "step-00000004" / "generator.safetensors")
    FIGURES["tried"] += 1
    run_distill(str(root), "crash")
    said = capsys.readouterr().out
    assert "checkpoint step 4 is damaged" in said and "generator.safetensors" in said
    assert "falling back to step 2" in said
    FIGURES["detected"] += 1
    assert {k: v for k, v in outputs(run).items() if k.startswith("distill/")} == expected


def test_a_damaged_checkpoint_marker_is_named_and_ignored(copy, baseline, capsys, one_thread):
    from tasks.distill import run_distill

    root, run = copy
    (run / "distill" / "_complete.json").unlink()
    (run / "distill" / "checkpoints" / "step-00000004" / "_complete.json").write_text("{trunc")
    FIGURES["tried"] += 1
    run_distill(str(root), "crash")
    assert "checkpoint step 4: marker is damaged" in capsys.readouterr().out
    FIGURES["detected"] += 1
    assert {k: v for k, v in outputs(run).items() if k.startswith("distill/")} == \
           {k: v for k, v in baseline[2].items() if k.startswith("distill/")}


def test_export_refuses_damaged_final_weights(copy, one_thread):
    from tasks.export import run_export

    root, run = copy
    (run / "export.complete.json").unlink()
    flip(run / "distill" / "checkpoints" / "step-00000004" / "ema.safetensors")
    FIGURES["tried"] += 1
    with pytest.raises(ChecksumError, match="step-00000004/ema.safetensors"):
        run_export(str(root), "crash")
    FIGURES["detected"] += 1
