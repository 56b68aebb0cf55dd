"""PIL's convolution resize (`Image.resize` with BICUBIC or LANCZOS) in torch, on any device, bit for bit.

Pillow's `libImaging/Resample.c` resizes in two separable passes, horizontal then vertical, each skipped when its
dimension keeps its size. Per output pixel it takes the input pixels whose centres lie within the filter's support
(scaled by the downscale factor) and weighs them by the filter, normalised to sum to one:
- uint8 images ("8bpc"): the weights are rounded to fixed point with 22 fractional bits, the products summed in
  int32 from half a unit, shifted back and clipped to [0, 255] after each pass; integer arithmetic, so any order
  and any device give PIL's bytes.
- float images (mode "F", "32bpc"): float32 pixels times double weights, summed in double one tap after another
  from the first, stored as float32 after each pass. Here each tap is one double multiply and one double add in
  the same order (separate elementwise operations, never fused), which are correctly rounded on every device.

The weights are computed once per (size in, size out, filter) in Python doubles with the C code's operation order
and libm's `sin`.

Pass order (Pillow 13.0.0, measured against it in tests/test_resample.py): horizontal first, unless the height
shrinks while the width does not. Equal factors on both axes (squares to squares, as every evaluation resize is),
one axis kept, or a growing axis give PIL's result exactly. When both axes shrink by different factors, Pillow
13.0.0 sometimes runs the vertical pass first by a rule not reproduced here, and uint8 results can then differ by
the rounding of the intermediate image.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

FILTERS = ("bicubic", "lanczos")
PRECISION_BITS = 32 - 8 - 2  # Resample.c: 8 bits of result, 2 bits of headroom for negative lobes and overshoot


def bicubic(x: float) -> float:
    """Keys' cubic convolution kernel with a = -0.5, as Resample.c writes it."""
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


def lanczos(x: float) -> float:
    """Lanczos kernel with a = 3 (sinc windowed by a sinc three times wider)."""
    if -3.0 <= x < 3.0:
        return _sinc(x) * _sinc(x / 3)
    return 0.0


_KERNELS = {"bicubic": (bicubic, 2.0), "lanczos": (lanczos, 3.0)}


@lru_cache(maxsize=64)
def coefficients(in_size: int, out_size: int, filter: str) -> tuple[list[list[int]], list[list[float]]]:
    """(input index, weight) per output pixel and tap, `out_size` rows of `ksize` taps, as Resample.c's
    `precompute_coeffs` over the whole input: taps past a row's window have weight 0 and a clamped index."""
    if filter not in _KERNELS:
        raise ValueError(f"resample filter must be one of {FILTERS}, got {filter!r}")
    kernel, kernel_support = _KERNELS[filter]
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = kernel_support * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    ss = 1.0 / filterscale
    index, weight = [], []
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # int() truncates toward zero, as C's cast
        xmax = min(int(center + support + 0.5), in_size) - xmin
        w = [kernel((x + xmin - center + 0.5) * ss) for x in range(xmax)]
        total = 0.0
        for v in w:
            total += v
        if total != 0.0:
            w = [v / total for v in w]
        index.append([min(xmin + x, in_size - 1) for x in range(ksize)])
        weight.append(w + [0.0] * (ksize - xmax))
    return index, weight


def fixed_point(weights: list[list[float]]) -> list[list[int]]:
    """Resample.c's `normalize_coeffs_8bpc`: weight x 2^22, rounded half away from zero by truncation."""
    one = 1 << PRECISION_BITS
    return [[int(-0.5 + w * one) if w < 0 else int(0.5 + w * one) for w in row] for row in weights]


@lru_cache(maxsize=64)
def _taps(in_size: int, out_size: int, filter: str, device: torch.device, fixed: bool):
    index, weight = coefficients(in_size, out_size, filter)
    idx = torch.tensor(index, dtype=torch.long, device=device)
    if fixed:
        return idx, torch.tensor(fixed_point(weight), dtype=torch.int32, device=device)
    return idx, torch.tensor(weight, dtype=torch.float64, device=device)


def _pass(x: torch.Tensor, dim: int, out_size: int, filter: str, fixed: bool) -> torch.Tensor:
    """One separable pass along `dim` (-1: horizontal, -2: vertical); int32 in [0, 255] or float32 in and out."""
    idx, k = _taps(x.shape[dim], out_size, filter, x.device, fixed)
    if dim == -2:
        k = k[:, :, None]
    if fixed:
        acc = torch.full((), 1 << (PRECISION_BITS - 1), dtype=torch.int32, device=x.device)
        for j in range(idx.shape[1]):
            acc = acc + x.index_select(dim, idx[:, j]) * k[:, j]
        return (acc >> PRECISION_BITS).clamp_(0, 255)
    acc = torch.zeros((), dtype=torch.float64, device=x.device)
    for j in range(idx.shape[1]):
        product = x.index_select(dim, idx[:, j]).double() * k[:, j]
        acc = acc + product
    return acc.float()


def _check(x: torch.Tensor, size: tuple[int, int], filter: str, dtype: torch.dtype) -> tuple[int, int]:
    if x.dtype != dtype:
        raise TypeError(f"expected a {dtype} tensor, got {x.dtype}")
    if filter not in _KERNELS:
        raise ValueError(f"resample filter must be one of {FILTERS}, got {filter!r}")
    h, w = (int(s) for s in size)
    if h < 1 or w < 1 or x.shape[-1] < 1 or x.shape[-2] < 1:
        raise ValueError(f"resize needs non-empty images and a positive size, got {tuple(x.shape)} -> {size}")
    return h, w


def _resize(x: torch.Tensor, h: int, w: int, filter: str, fixed: bool) -> torch.Tensor:
    """Two passes, each only when its dimension changes (Resample.c `ImagingResampleInner`): horizontal first,
    unless the height shrinks while the width does not."""
    if w >= x.shape[-1] and h < x.shape[-2]:
        x = _pass(x, -2, h, filter, fixed)
        return x if w == x.shape[-1] else _pass(x, -1, w, filter, fixed)
    if w != x.shape[-1]:
        x = _pass(x, -1, w, filter, fixed)
    if h != x.shape[-2]:
        x = _pass(x, -2, h, filter, fixed)
    return x


def resize_uint8(x: torch.Tensor, size: tuple[int, int], filter: str = "lanczos") -> torch.Tensor:
    """uint8 (..., H, W) -> uint8 (..., h, w) with `size` = (h, w): `Image.resize((w, h), filter)` of each
    channel-plane of an L or RGB image, the same bytes, on x's device."""
    h, w = _check(x, size, filter, torch.uint8)
    if (h, w) == tuple(x.shape[-2:]):
        return x.clone()
    return _resize(x.to(torch.int32), h, w, filter, fixed=True).to(torch.uint8)


def resize_float(x: torch.Tensor, size: tuple[int, int], filter: str = "bicubic") -> torch.Tensor:
    """float32 (..., H, W) -> float32 (..., h, w): `Image.resize((w, h), filter)` of each plane as a mode "F"
    image, on x's device."""
    h, w = _check(x, size, filter, torch.float32)
    if (h, w) == tuple(x.shape[-2:]):
        return x.clone()
    return _resize(x, h, w, filter, fixed=False)


def crop_box(x: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """The (left, top, right, bottom) PIL box of (..., H, W) images, inside the image."""
    left, top, right, bottom = box
    return x[..., top:bottom, left:right]
