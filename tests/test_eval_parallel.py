"""Data-parallel evaluation: 2 torchrun ranks (gloo, CPU) share the protocol's samples and gather their FID
statistics and CLIP cosines; the rows equal one process's (FID within 1e-3, CLIP within 1e-4)."""
import numpy as np
import pytest
import torch

from dmd_core.fid import FeatureStats


def test_merged_statistics_equal_numpy_over_all_features():
    """Chan's pairwise merge of uneven shares (also through packed/unpacked) = np.mean / np.cov of all features."""
    rng = np.random.default_rng(3)
    feats = rng.normal(2.0, 3.0, (53, 7)).astype(np.float32)
    merged = FeatureStats()
    for lo, hi in ((0, 1), (1, 20), (20, 20), (20, 53)):
        part = FeatureStats()
        part.update(feats[lo:hi])
        merged.merge(FeatureStats.unpacked(part.packed()) if part.n else part)
    mu, sigma = merged.compute()
    assert merged.n == 53 and mu.dtype == np.float32
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float64), rowvar=False), rtol=1e-12, atol=1e-12)


def test_rank_slices_cover_the_samples_once():
    from dmd_core.distributed import DistEnv
    from dmd_core.eval_parallel import rank_slice

    for n, w in ((7, 2), (6, 3), (5, 5)):
        shares = [rank_slice(n, DistEnv(r, r, w)) for r in range(w)]
        assert [i for s in shares for i in range(n)[s]] == list(range(n))
    with pytest.raises(ValueError, match="3 samples cannot be shared by 4 ranks"):
        rank_slice(3, DistEnv(0, 0, 4))


@pytest.mark.slow
def test_two_ranks_equal_one_process(prefect_api, tmp_path, capsys):
    from flows.pipeline import dmd
    from storage.layout import RESULTS, root_store, run_store
    from tasks.evaluate import run_evaluate
    from tests.test_eval_coco import write_fixture

    captions, images = write_fixture(tmp_path / "coco")
    root = str(tmp_path / "artifacts")
    overrides = ["evaluate.protocol=coco30k", "evaluate.n_samples=5", "evaluate.batch_size=2",
                 f"evaluate.captions={captions}", f"evaluate.reference_images={images}",
                 "evaluate.random_extractors=true", "device=cpu"]
    dmd(preset="sd-tiny", root=root, run_name="dp", overrides=overrides)
    store = run_store(root, "dp")
    one = {(r["model"], r["steps"], r["metric"]): r["value"] for r in store.read_table(RESULTS).to_pylist()}
    assert {k[2] for k in one} == {"fid", "clip"} and len(one) == 6

    # The same run evaluated again by 2 ranks, from scratch: no rows, no cached teacher baselines.
    store.delete(RESULTS)
    for key in root_store(root).ls("_reference"):
        if key.startswith("_reference/teacher-"):
            root_store(root).delete(key)
    cfg = store.read_json("config.json")
    cfg["evaluate"]["world_size"] = 2
    store.write_json("config.json", cfg)
    capsys.readouterr()
    summary = run_evaluate(root, "dp")
    assert "evaluate: starting 2 ranks on 1 node(s)" in capsys.readouterr().out
    rows = store.read_table(RESULTS).to_pylist()
    two = {(r["model"], r["steps"], r["metric"]): r["value"] for r in rows}
    assert two.keys() == one.keys() and all(r["n_samples"] == 5 and not r["cached"] for r in rows)
    for key, value in one.items():
        assert abs(two[key] - value) <= (1e-3 if key[2] == "fid" else 1e-4), (key, value, two[key])
    assert {(r["model"], r["metric"]) for r in summary["rows"]} == {(m, k) for m, _, k in one}
    # the teacher baselines the ranks computed are cached once (rank 0 wrote them)
    assert len([k for k in root_store(root).ls("_reference") if k.startswith("_reference/teacher-")]) == 4
