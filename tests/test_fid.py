"""dmd_core.fid against clean-fid 0.1.35 itself, with a random-init extractor (no Inception weights, no network)."""
from __future__ import annotations

import inspect
import os
import types

import numpy as np
import pytest
import scipy.linalg
import torch
from cleanfid import fid as cleanfid_fid
from PIL import Image
from torch import nn

from dmd_core import fid

CPU = torch.device("cpu")
N_IMAGES = 40
BATCH = 16


class RandomFeatures(nn.Module):
    """Seeded random conv -> pool -> linear to 16 features; takes float (B, 3, H, W) in [0, 255], any H, W."""

    def __init__(self, dim: int = 16, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.conv = nn.Conv2d(3, 8, 7, stride=4)
            self.pool = nn.AdaptiveAvgPool2d(4)
            self.fc = nn.Linear(8 * 16, dim)
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.conv(x / 255))).flatten(1))


def _images(seed: int, n: int, h: int, w: int, channels: int = 3, lo: int = 0, hi: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(lo, hi, (n, h, w, channels), dtype=np.uint8)


def _write(folder, images: np.ndarray) -> str:
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img[..., 0] if img.shape[2] == 1 else img).save(folder / f"{i:04d}.png")
    return str(folder)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Folder a: 40 random 32x32 images; folder b: 40 brighter 48x40 (HxW) images; b's pixels too."""
    root = tmp_path_factory.mktemp("fid")
    b = _images(2, N_IMAGES, 48, 40, lo=100)
    return _write(root / "a", _images(1, N_IMAGES, 32, 32)), _write(root / "b", b), b


@pytest.fixture(scope="module")
def extractor():
    return RandomFeatures()


@pytest.fixture(scope="module")
def folder_fid(data, extractor):
    """Our clean FID between folders a and b (PIL resizes are the slow part: computed once)."""
    dir_a, dir_b, _ = data
    return fid.fid_from_folders(dir_a, dir_b, extractor, mode="clean", batch_size=BATCH, device=CPU)


def _rel(x: float, y: float) -> float:
    return abs(x - y) / abs(y)


SCIPY_SQRTM = scipy.linalg.sqrtm
SCIPY_TAKES_DISP = "disp" in inspect.signature(SCIPY_SQRTM).parameters


def _sqrtm_118(A):
    """scipy 1.18's `sqrtm` signature: no `disp`, the matrix alone."""
    return SCIPY_SQRTM(A)


@pytest.fixture(autouse=True)
def cleanfid_runs_on_this_scipy(monkeypatch):
    """clean-fid 0.1.35 itself is the reference. It calls `sqrtm(..., disp=False)` and unpacks (X, errest); on a
    scipy without `disp` (>= 1.18) its module sees a `linalg` whose `sqrtm` still takes it, returning the same X."""
    if not SCIPY_TAKES_DISP:
        def sqrtm(A, disp=True):
            X = SCIPY_SQRTM(A)
            return X if disp else (X, float(np.linalg.norm(X @ X - A, "fro") ** 2 / np.linalg.norm(A, "fro")))

        monkeypatch.setattr(cleanfid_fid, "linalg", types.SimpleNamespace(sqrtm=sqrtm))


def _stats(seed: int, dim: int = 24, n: int = 60, shift: float = 0.0):
    feats = np.random.default_rng(seed).standard_normal((n, dim)) @ np.diag(np.linspace(0.5, 2, dim)) + shift
    return np.mean(feats, 0), np.cov(feats, rowvar=False)


def test_frechet_distance_equals_cleanfid():
    for a, b in [(_stats(0), _stats(1, shift=0.3)), (_stats(2, n=12), _stats(3, n=12))]:  # full rank; rank 11 of 24
        ours, theirs = fid.frechet_distance(*a, *b), float(cleanfid_fid.frechet_distance(*a, *b))
        assert ours > 0.1 and _rel(ours, theirs) < 1e-9, (ours, theirs)


def test_frechet_distance_closed_form_for_diagonal_covariances():
    """Commuting covariances: FD = |mu1 - mu2|^2 + sum_i (sqrt(s1_i) - sqrt(s2_i))^2."""
    rng = np.random.default_rng(0)
    mu1, mu2, s1, s2 = rng.normal(size=8), rng.normal(size=8), rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    exact = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert _rel(fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)), exact) < 1e-10
    with pytest.raises(ValueError, match="differ in shape"):
        fid.frechet_distance(mu1, np.diag(s1), mu2[:4], np.diag(s2))


def test_frechet_distance_on_scipy_118_signature(monkeypatch):
    """scipy 1.18: `sqrtm` takes no `disp` and returns one array. clean-fid's own function breaks there (what broke
    the evaluate stage on Python 3.12); ours gives the same number as before."""
    a, b = _stats(0), _stats(1, shift=0.3)
    expected = fid.frechet_distance(*a, *b)
    monkeypatch.setattr(scipy.linalg, "sqrtm", _sqrtm_118)
    monkeypatch.setattr(cleanfid_fid, "linalg", scipy.linalg)
    with pytest.raises(TypeError, match="disp"):
        cleanfid_fid.frechet_distance(*a, *b)
    assert fid.frechet_distance(*a, *b) == expected


@pytest.mark.parametrize("mode", ["clean", "legacy_tensorflow"])
def test_folder_fid_equals_cleanfid(data, extractor, folder_fid, mode):
    dir_a, dir_b, _ = data
    if mode == "clean":
        ours = folder_fid
    else:
        ours = fid.fid_from_folders(dir_a, dir_b, extractor, mode=mode, batch_size=BATCH, device=CPU)
    theirs = cleanfid_fid.compute_fid(dir_a, dir_b, mode=mode, custom_feat_extractor=extractor, device=CPU,
                                      num_workers=0, batch_size=BATCH, verbose=False)
    assert ours > 0.01
    assert _rel(ours, float(theirs)) < 1e-6, (ours, theirs)  # measured: 0 (clean), 3e-16 (legacy_tensorflow)


def test_streamed_fid_equals_folder_fid_and_cleanfid_gen(data, extractor, folder_fid):
    dir_a, _, b = data
    mu_a, sigma_a = fid.stats_from_folder(dir_a, extractor, "clean", batch_size=BATCH, device=CPU)

    def generate_batches():  # the model's view: float NCHW in [0, 1], off the uint8 grid (to_uint8 rounds it back)
        x = (torch.from_numpy(b).permute(0, 3, 1, 2).double() + 0.3) / 255
        yield from x.split(BATCH)

    streamed = fid.fid_from_model(generate_batches, (mu_a, sigma_a), extractor, mode="clean", device=CPU)
    assert _rel(streamed, folder_fid) < 1e-12, (streamed, folder_fid)  # same batches, same features: measured 0

    # clean-fid's own model path, as compute_fid(gen=G, fdir2=a) runs it: G returns [0, 255] floats, used
    # unquantised (here integer-valued, so equal to the PNGs), features stacked, then np.mean / np.cov.
    batches = iter(torch.from_numpy(b).permute(0, 3, 1, 2).float().split(8))
    feats = cleanfid_fid.get_model_features(lambda z: next(batches), extractor, mode="clean", z_dim=4,
                                            num_gen=N_IMAGES, batch_size=8, device=CPU, verbose=False)
    theirs = cleanfid_fid.frechet_distance(np.mean(feats, 0), np.cov(feats, rowvar=False), mu_a, sigma_a)
    assert _rel(streamed, float(theirs)) < 1e-6, (streamed, theirs)  # measured: ~1e-16


def test_preprocess_inputs_agree_with_cleanfid_folder_reading(tmp_path, extractor):
    grey = _images(3, 4, 20, 24, channels=1)
    folder = _write(tmp_path / "grey", grey)  # saved as mode "L"; clean-fid reads it with .convert("RGB")
    theirs = cleanfid_fid.get_folder_features(folder, extractor, num_workers=0, batch_size=4, device=CPU,
                                              mode="clean", verbose=False)
    as_tensor = torch.from_numpy(grey).permute(0, 3, 1, 2).float() / 255
    for images in (grey, list(grey[..., 0]), as_tensor):
        np.testing.assert_array_equal(fid.features(images, extractor, "clean", batch_size=4, device=CPU), theirs)
    assert fid.preprocess(grey, "clean").shape == (4, 3, 299, 299)
    assert fid.preprocess(grey, "legacy_tensorflow").shape == (4, 3, 20, 24)
    with pytest.raises(TypeError, match="uint8"):
        fid.preprocess(grey.astype(np.float32), "clean")
    with pytest.raises(ValueError, match="mode"):
        fid.preprocess(grey, "legacy_pytorch")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_feature_stats_equal_numpy(dtype):
    feats = (np.random.default_rng(0).standard_normal((203, 16)) * 3 + 5).astype(dtype)
    stats = fid.FeatureStats()
    for start, stop in [(0, 1), (1, 64), (64, 64), (64, 150), (150, 203)]:
        stats.update(feats[start:stop])
    mu, sigma = stats.compute()
    ref_mu, ref_sigma = np.mean(feats, 0), np.cov(feats, rowvar=False)
    assert mu.dtype == ref_mu.dtype and sigma.dtype == np.float64
    np.testing.assert_array_equal(mu, ref_mu)  # bit for bit, float32 accumulation included
    np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-10, atol=1e-12 * np.abs(ref_sigma).max())


def test_feature_stats_rejects_bad_input():
    stats = fid.FeatureStats()
    stats.update(np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match="at least 2"):
        stats.compute()
    with pytest.raises(ValueError, match="changed"):
        stats.update(np.zeros((3, 5), np.float32))


def _fake_inception_file(path: str) -> None:
    """A TorchScript module shaped like NVIDIA's: `.layers(x) -> (B, 2048, 1, 1)`, `forward(x, return_features)`."""

    class Layers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.proj = nn.Conv2d(3, 2048, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(self.pool(x))

    class Fake(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = Layers()

        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            x = nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            return self.layers((x - 128) / 128)

    torch.manual_seed(0)
    torch.jit.script(Fake()).save(path)


def test_inception_extractor_loads_local_file_through_cleanfid_wrapper(tmp_path, data):
    path = str(tmp_path / fid.INCEPTION_FILE)
    _fake_inception_file(path)
    _, dir_b, b = data
    for mode in fid.MODES:
        model = fid.inception_extractor(path, CPU, mode=mode)
        assert model.resize_inside == (mode == "legacy_tensorflow")
        ours = fid.features(b[:4], model, mode, device=CPU)
        theirs = cleanfid_fid.get_files_features(fid.list_images(dir_b)[:4], model, num_workers=0, batch_size=4,
                                                 device=CPU, mode=mode, verbose=False)
        assert ours.shape == (4, 2048)
        np.testing.assert_array_equal(ours, theirs)
    assert fid.inception_extractor(str(tmp_path), CPU).resize_inside is False  # a folder holding the file


def test_missing_inception_file_is_named_and_never_downloaded(tmp_path, monkeypatch):
    import requests
    import urllib.request

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(requests.Session, "get", no_network)
    missing = str(tmp_path / "weights" / fid.INCEPTION_FILE)
    with pytest.raises(FileNotFoundError) as err:
        fid.inception_extractor(missing, CPU)
    message = str(err.value)
    assert "\n" not in message
    assert missing in message and fid.CLEANFID_INCEPTION_PATH in message and "evaluate.inception_weights" in message
    assert not os.path.exists(missing) and not os.path.exists(os.path.dirname(missing))
    if not os.path.exists(fid.CLEANFID_INCEPTION_PATH):
        with pytest.raises(FileNotFoundError, match=fid.CLEANFID_INCEPTION_PATH):
            fid.inception_extractor(None, CPU)
        assert not os.path.exists(fid.CLEANFID_INCEPTION_PATH)
