"""dmd_core.resample against PIL itself: uint8 resizes byte for byte, float ("F") resizes to the bit."""
import numpy as np
import pytest
import torch
from PIL import Image

from dmd_core.resample import coefficients, resize_float, resize_uint8

PIL_FILTERS = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC}
# (H, W) -> (h, w): the evaluation's resizes, odd and even, up and down, non-square with one axis kept or growing.
SIZES = [((512, 512), (256, 256)), ((480, 480), (256, 256)), ((256, 256), (299, 299)), ((256, 256), (224, 224)),
         ((53, 37), (16, 37)), ((37, 53), (37, 16)), ((53, 37), (16, 40)), ((37, 53), (16, 16)),
         ((7, 9), (13, 5)), ((33, 64), (99, 64)), ((64, 64), (8, 64)), ((64, 64), (63, 63)), ((5, 5), (1, 1)),
         ((24, 24), (299, 299)), ((300, 301), (300, 17)), ((16, 16), (16, 16))]


def _pil_uint8(a: np.ndarray, size, filter: str) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize(size[::-1], PIL_FILTERS[filter]))


def _ulps(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32)).max())


@pytest.mark.parametrize("filter", sorted(PIL_FILTERS))
@pytest.mark.parametrize("src, dst", SIZES)
def test_uint8_rgb_equals_pil_byte_for_byte(src, dst, filter):
    rng = np.random.default_rng(sum(src) * 7 + sum(dst))
    a = rng.integers(0, 256, (*src, 3), dtype=np.uint8)
    ours = resize_uint8(torch.from_numpy(a).permute(2, 0, 1)[None], dst, filter)[0].permute(1, 2, 0).numpy()
    assert ours.dtype == np.uint8 and np.array_equal(ours, _pil_uint8(a, dst, filter))


@pytest.mark.parametrize("filter", sorted(PIL_FILTERS))
def test_uint8_extremes_clip_as_pil(filter):
    """A checkerboard of 0 and 255 overshoots both ways; each pass clips as PIL does."""
    a = np.kron((np.indices((20, 20)).sum(0) % 2) * 255, np.ones((3, 3))).astype(np.uint8)[:, :, None].repeat(3, 2)
    for dst in [(25, 25), (31, 31), (7, 7), (60, 60)]:
        ours = resize_uint8(torch.from_numpy(a).permute(2, 0, 1), dst, filter).permute(1, 2, 0).numpy()
        assert np.array_equal(ours, _pil_uint8(a, dst, filter))


def test_uint8_squares_of_many_sizes_equal_pil():
    rng = np.random.default_rng(0)
    for n in [2, 3, 10, 31, 64, 97, 255]:
        for m in [1, 7, 16, 24, 32, 100, 224, 256]:
            a = rng.integers(0, 256, (n, n, 3), dtype=np.uint8)
            for filter in PIL_FILTERS:
                ours = resize_uint8(torch.from_numpy(a).permute(2, 0, 1), (m, m), filter).permute(1, 2, 0).numpy()
                assert np.array_equal(ours, _pil_uint8(a, (m, m), filter)), (n, m, filter)


@pytest.mark.parametrize("filter", sorted(PIL_FILTERS))
@pytest.mark.parametrize("src, dst", SIZES)
def test_float_equals_pil_mode_f(src, dst, filter):
    """Mode "F": measured 0 ulp on every size here (each tap is one double multiply and one double add, in PIL's
    order); the bound asserted is that."""
    rng = np.random.default_rng(sum(src) + 3 * sum(dst))
    a = (rng.random(src) * 300 - 20).astype(np.float32)
    ref = np.asarray(Image.fromarray(a, mode="F").resize(dst[::-1], PIL_FILTERS[filter]))
    ours = resize_float(torch.from_numpy(a), dst, filter).numpy()
    assert ours.dtype == np.float32 and _ulps(ours, ref) == 0


def test_float_batches_resize_each_plane():
    x = torch.rand(2, 3, 20, 20, generator=torch.Generator().manual_seed(0)) * 255
    out = resize_float(x, (29, 29), "bicubic")
    for i in range(2):
        for c in range(3):
            ref = np.asarray(Image.fromarray(x[i, c].numpy(), mode="F").resize((29, 29), Image.Resampling.BICUBIC))
            assert np.array_equal(out[i, c].numpy(), ref)


def test_weights_sum_to_one_and_bad_arguments_raise():
    _, weights = coefficients(512, 256, "lanczos")
    assert all(abs(sum(row) - 1) < 1e-12 for row in weights) and len(weights[0]) == 13
    with pytest.raises(ValueError, match="filter"):
        resize_uint8(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), (2, 2), "bilinear")
    with pytest.raises(TypeError, match="uint8"):
        resize_uint8(torch.zeros(1, 3, 4, 4), (2, 2))
    with pytest.raises(ValueError, match="positive"):
        resize_float(torch.zeros(4, 4), (0, 2))
