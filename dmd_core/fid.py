"""FID exactly as clean-fid 0.1.35 computes it (Parmar et al. 2022), streamed from a model or read from folders.

clean-fid's own pieces are imported, not rewritten: the Inception wrapper (`InceptionV3W`), the resizers
(`build_resizer` via `ResizeDataset`) and the batch feature call (`get_batch_features`). `frechet_distance` is clean-fid's
formula written out here, because clean-fid's own calls `scipy.linalg.sqrtm(..., disp=False)`, which scipy 1.18 removed.
What clean-fid does to images, by path (read in cleanfid/fid.py, utils.py, resize.py):
- folders: every file is `Image.open(p).convert("RGB")` -> uint8 HWC; "clean" resizes each channel as float32
  with PIL bicubic to 299x299 (clipped to [0, 255]); "legacy_tensorflow" keeps the size and feeds
  `ToTensor()(uint8) * 255`, the network resizing inside.
- models (`compute_fid(gen=...)`, `get_model_features`): G's float output in [0, 255] is used as is, never
  quantised. A folder of PNGs of the same images is quantised, so to make streamed FID equal folder FID we
  quantise float images with `to_uint8` first and then follow the folder path exactly.
Statistics: mu is `np.mean(feats, 0)` bit for bit (numpy accumulates rows in the features' dtype, float32 for
Inception); sigma is `np.cov(feats, rowvar=False)` in float64 to ~1e-15, merged batch by batch (Chan et al.).
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import os
from concurrent.futures import Executor
from glob import glob
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from cleanfid.fid import get_batch_features
from cleanfid.inception_torchscript import InceptionV3W
from cleanfid.utils import EXTENSIONS, ResizeDataset
from PIL import Image
from scipy import linalg
from torch import nn

MODES = ("clean", "legacy_tensorflow")
# Where the per-image resizes run: PIL on the CPU (the reference), or `dmd_core.resample` on the extractor's device,
# which gives the same values (tests/test_resample.py, tests/test_eval_fast.py).
RESIZE_ON = ("cpu", "device")
# The precision a feature extractor runs in (Inception, CLIP). "fp32" leaves torch's flags as they are: by default
# fp32 matrix multiplies and cuDNN convolutions allowed TF32, as clean-fid and DMD2's evaluator run.
EXTRACTOR_PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
INCEPTION_FILE = "inception-2015-12-05.pt"
# cleanfid/features.py feature_extractor(): path = "./" on Windows else "/tmp", then InceptionV3W joins the name.
CLEANFID_INCEPTION_PATH = os.path.join("/tmp", INCEPTION_FILE)

Images = Union[np.ndarray, torch.Tensor, Sequence[np.ndarray]]
Extractor = Callable[[torch.Tensor], torch.Tensor]


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"FID mode must be one of {MODES}, got {mode!r}")


def inception_extractor(path: str | None, device: torch.device | str, mode: str = "clean") -> nn.Module:
    """clean-fid's Inception-V3 TorchScript wrapper from a local file, never downloaded: [0, 255] -> (B, 2048).

    `path` is the file `inception-2015-12-05.pt` or a folder holding it; None means clean-fid's own location.
    The file must keep that name: `InceptionV3W` joins it onto the folder itself.
    """
    _check_mode(mode)
    path = path or CLEANFID_INCEPTION_PATH
    if os.path.isdir(path):
        path = os.path.join(path, INCEPTION_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Inception weights not found: {path} (clean-fid expects the TorchScript file at "
            f"{CLEANFID_INCEPTION_PATH}; nothing is downloaded: copy it there or set evaluate.inception_weights "
            f"to a local copy named {INCEPTION_FILE})")
    if os.path.basename(path) != INCEPTION_FILE:
        raise ValueError(f"evaluate.inception_weights: clean-fid's InceptionV3W loads a file named {INCEPTION_FILE}, "
                         f"got {path}; rename the file or pass its folder")
    model = InceptionV3W(os.path.dirname(path), download=False, resize_inside=(mode == "legacy_tensorflow"))
    return model.to(device).eval().requires_grad_(False)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> uint8 on the CPU by clamp, x255, round half to even (the PNG a folder would hold).

    Quantised where the images are, then copied: a quarter of the bytes cross to the host, and the three float32
    operations are correctly rounded on every device, so the bytes are those of the CPU's quantisation.
    """
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


@contextlib.contextmanager
def extractor_precision(precision: str, device: torch.device | str) -> Iterator[None]:
    """The region a feature extractor runs in: "fp32" as torch's flags are (the metric's definition), "tf32"
    (fp32 weights; TF32 matrix multiplies and convolutions: process-wide flags, restored on exit, so fp32 work of
    other threads meanwhile uses TF32 too), "bf16" or "fp16" (autocast, local to the thread: matrix multiplies in
    half precision with fp32 accumulation, normalisations and the residual stream of an fp32 input in fp32; fp16
    keeps TF32's 10-bit mantissa where bf16 has 7)."""
    if precision not in EXTRACTOR_PRECISIONS:
        raise ValueError(f"extractor precision must be one of {EXTRACTOR_PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        yield
    elif precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        with torch.autocast(torch.device(device).type, dtype=dtype):
            yield
    else:
        flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def parallel_map(fn: Callable, items: Sequence, pool: Optional[Executor]) -> list:
    """[fn(x) for x in items], through `pool` when given (threads, as PIL releases the GIL while it resizes, or
    processes, for picklable `fn`); the results keep the items' order, so they are those of the loop."""
    return list(pool.map(fn, items)) if pool is not None else [fn(x) for x in items]


def _rgb(img: np.ndarray) -> np.ndarray:
    """One uint8 HxW[xC] image as PIL's `.convert("RGB")` gives it: grey replicated, alpha dropped."""
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise ValueError(f"an image must be HxW, HxWx1, HxWx3 or HxWx4, got shape {img.shape}")
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3])


def _uint8_images(images: Images) -> list[np.ndarray]:
    """uint8 NHWC array, uint8 / float-in-[0, 1] NCHW tensor, or a list of uint8 HWC arrays -> list of RGB HWC uint8."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"image tensors must be NCHW, got shape {tuple(images.shape)}")
        if images.dtype != torch.uint8:
            if not images.is_floating_point():
                raise TypeError(f"image tensors must be uint8 or float in [0, 1], got {images.dtype}")
            images = to_uint8(images)
        items = list(images.detach().cpu().permute(0, 2, 3, 1).numpy())
    elif isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(f"image arrays must be NHWC, got shape {images.shape}")
        items = list(images)
    else:
        items = [np.asarray(im) for im in images]
    for im in items:
        if im.dtype != np.uint8:
            raise TypeError(f"numpy images must be uint8 in [0, 255], got {im.dtype}; pass floats as a torch tensor")
    return [_rgb(im) for im in items]


@functools.lru_cache(maxsize=None)
def _resize_dataset(mode: str) -> ResizeDataset:
    """clean-fid's own `fn_resize` and `ToTensor` for `mode`, built once per process."""
    return ResizeDataset([], mode=mode)


def _clean_resize(mode: str, img: np.ndarray) -> np.ndarray:
    """clean-fid's `fn_resize` of one image: PIL and numpy only, so it runs in any worker thread or process."""
    return _resize_dataset(mode).fn_resize(img)


def _to_tensor(mode: str, resized: np.ndarray) -> torch.Tensor:
    """The rest of `cleanfid.utils.ResizeDataset.__getitem__`: `ToTensor()` (x255 for uint8)."""
    if resized.dtype == np.uint8:
        return _resize_dataset(mode).transforms(np.array(resized)) * 255
    if resized.dtype == np.float32:
        return _resize_dataset(mode).transforms(resized)
    raise TypeError(f"clean-fid's resizer returned {resized.dtype}")


def check_resize_on(resize_on: str) -> None:
    if resize_on not in RESIZE_ON:
        raise ValueError(f"resize_on must be one of {RESIZE_ON}, got {resize_on!r}")


def clean_resize_on_device(items: list[np.ndarray], device: torch.device | str) -> torch.Tensor:
    """clean-fid's "clean" `fn_resize` + `ToTensor()` on `device`: each channel as float32 through PIL's mode "F"
    bicubic to 299x299 (`resample.resize_float`), clipped to [0, 255]; the same float32 values."""
    from .resample import resize_float

    batches = []
    for _, run in itertools.groupby(items, key=lambda a: a.shape):  # runs of one image size, resized together
        x = torch.from_numpy(np.stack(list(run))).to(device).permute(0, 3, 1, 2).float()
        batches.append(resize_float(x, (299, 299), "bicubic").clamp_(0, 255))
    return torch.cat(batches)


def preprocess(images: Images, mode: str = "clean", pool: Optional[Executor] = None, *, resize_on: str = "cpu",
               device: torch.device | str = "cpu") -> torch.Tensor:
    """What clean-fid's folder path feeds the extractor: float32 (B, 3, 299, 299) for "clean", (B, 3, H, W) for legacy.

    Per image, as `cleanfid.utils.ResizeDataset.__getitem__`: its `fn_resize` (in `pool`'s workers when given:
    PIL and numpy, no torch, whose own threads would multiply), then `ToTensor()` here. `resize_on="device"` does
    "clean"'s resize on `device` instead (`clean_resize_on_device`), the batch left there.
    """
    _check_mode(mode)
    check_resize_on(resize_on)
    items = _uint8_images(images)
    if resize_on == "device" and mode == "clean" and items:
        return clean_resize_on_device(items, device)
    resized = parallel_map(functools.partial(_clean_resize, mode), items, pool)
    if not resized:
        raise ValueError("no images to preprocess")
    return torch.stack([_to_tensor(mode, r) for r in resized])


def _chunks(items: list, size: int | None) -> Iterable[list]:
    size = size or max(len(items), 1)
    if size < 1:
        raise ValueError(f"batch_size must be positive, got {size}")
    for start in range(0, len(items), size):
        yield items[start:start + size]


def features(images: Images, extractor: Extractor, mode: str, batch_size: int | None = None,
             device: torch.device | str = "cpu", *, pool: Optional[Executor] = None,
             precision: str = "fp32", resize_on: str = "cpu") -> np.ndarray:
    """(N, D) features through clean-fid's `get_batch_features` (no_grad, to `device`, back to numpy); resized
    in `pool`'s threads when given, or on `device` (`resize_on="device"`, the same values), the extractor run in
    `precision` (`extractor_precision`; float32 out)."""
    items = _uint8_images(images)
    if not items:
        raise ValueError("no images to compute features of")
    net = extractor if precision == "fp32" else (lambda x: extractor(x).float())
    feats = []
    for chunk in _chunks(items, batch_size):
        batch = preprocess(chunk, mode, pool, resize_on=resize_on, device=device)
        with extractor_precision(precision, device):
            feats.append(get_batch_features(batch, net, torch.device(device)))
    return np.concatenate(feats)


def device_features(images: torch.Tensor, extractor: Extractor, mode: str = "clean",
                    precision: str = "fp32") -> torch.Tensor:
    """`features` of uint8 (N, H, W, 3) images on the extractor's device, left there: "clean"'s resize to 299 on
    the device (`clean_resize_on_device`'s values) and no copy to the host, so nothing waits for the GPU."""
    if mode != "clean":
        raise ValueError(f"device_features runs clean-fid's 'clean' resize only, got mode {mode!r}")
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"device_features takes uint8 (N, H, W, 3) images, got {images.dtype} {tuple(images.shape)}")
    from .resample import resize_float

    x = resize_float(images.permute(0, 3, 1, 2).float(), (299, 299), "bicubic").clamp_(0, 255)
    with torch.no_grad(), extractor_precision(precision, images.device):
        return extractor(x).float()


class FeatureStats:
    """Streaming (mu, sigma): clean-fid's `np.mean(feats, 0)` bit for bit, `np.cov(feats, rowvar=False)` to ~1e-15."""

    def __init__(self) -> None:
        self.n = 0
        self._sum: np.ndarray | None = None    # row-by-row running sum in the features' dtype, as np.mean does
        self._mean64: np.ndarray | None = None
        self._m2: np.ndarray | None = None     # float64 sum of centred outer products

    def update(self, feats: np.ndarray) -> None:
        """Add a batch of features (B, D), float32 or float64."""
        feats = np.asarray(feats)
        if feats.ndim != 2 or feats.dtype not in (np.float32, np.float64):
            raise ValueError(f"features must be (B, D) float32 or float64, got {feats.dtype} {feats.shape}")
        if self._sum is not None and (feats.dtype != self._sum.dtype or feats.shape[1] != self._sum.shape[0]):
            raise ValueError(f"features changed from {self._sum.dtype} (*, {self._sum.shape[0]}) "
                             f"to {feats.dtype} {feats.shape}")
        nb = feats.shape[0]
        if nb == 0:
            return
        f64 = feats.astype(np.float64)
        mean_b = f64.mean(0)
        centred = f64 - mean_b
        m2_b = centred.T @ centred
        if self.n == 0:
            self._sum = np.add.reduce(feats, axis=0)
            self._mean64, self._m2 = mean_b, m2_b
        else:
            # numpy reduces axis 0 one row after another, so continuing from the running sum keeps its order.
            self._sum = np.add.reduce(np.concatenate([self._sum[None], feats]), axis=0)
            n = self.n + nb
            delta = mean_b - self._mean64
            self._mean64 = self._mean64 + delta * (nb / n)
            self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (self.n * nb / n)
        self.n += nb

    def compute(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu in the features' dtype, sigma in float64), as clean-fid's `np.mean` / `np.cov`."""
        if self.n < 2:
            raise ValueError(f"FID statistics need at least 2 images, got {self.n}")
        mu = np.true_divide(self._sum, np.intp(self.n), out=np.empty_like(self._sum), casting="unsafe")
        return mu, self._m2 / (self.n - 1)

    def merge(self, other: "FeatureStats") -> None:
        """Add another set's statistics, as if its features had followed these (Chan et al. 1979 pairwise update);
        how data-parallel ranks combine their shares."""
        if other.n == 0:
            return
        if self.n == 0:
            self.n, self._sum, self._mean64, self._m2 = other.n, other._sum.copy(), other._mean64.copy(), other._m2.copy()
            return
        n = self.n + other.n
        delta = other._mean64 - self._mean64
        self._sum = np.add(self._sum, other._sum, dtype=self._sum.dtype)
        self._mean64 = self._mean64 + delta * (other.n / n)
        self._m2 = self._m2 + other._m2 + np.outer(delta, delta) * (self.n * other.n / n)
        self.n = n

    def packed(self) -> np.ndarray:
        """float64 [n, is_float64, sum, mean, m2] of a non-empty set: one flat array a collective can carry."""
        if self.n == 0:
            raise ValueError("packed: no features yet")
        return np.concatenate([[self.n, self._sum.dtype == np.float64], self._sum, self._mean64, self._m2.ravel()])

    @classmethod
    def unpacked(cls, v: np.ndarray) -> "FeatureStats":
        """The FeatureStats `packed` described."""
        stats, d = cls(), int(round(np.sqrt(v.size - 1))) - 1  # v.size = 2 + 2d + d² = (d + 1)² + 1
        stats.n = int(v[0])
        stats._sum = v[2:2 + d].astype(np.float64 if v[1] else np.float32)
        stats._mean64, stats._m2 = v[2 + d:2 + 2 * d].copy(), v[2 + 2 * d:].reshape(d, d).copy()
        return stats


def stats_from_batches(batches: Iterable[Images], extractor: Extractor, mode: str, device: torch.device | str = "cpu",
                       batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of image batches; each batch goes to the extractor whole unless `batch_size` splits it."""
    stats = FeatureStats()
    for batch in batches:
        stats.update(features(batch, extractor, mode, batch_size, device))
    return stats.compute()


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Frechet distance |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), as clean-fid 0.1.35 computes it.

    Same steps as `cleanfid.fid.frechet_distance`: scipy's `sqrtm` of S1 S2; if that is not finite, eps on both
    diagonals and again; an imaginary diagonal part above 1e-3 raises, a smaller one is dropped. `sqrtm` is called
    without `disp`: every scipy then returns the matrix alone, the one clean-fid unpacks from `sqrtm(..., disp=False)`
    (scipy 1.18 removed the keyword).
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"FID statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():  # the product is (almost) singular
        print(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):  # numerical error can leave a small imaginary part
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def list_images(fdir: str) -> list[str]:
    """The files clean-fid's `get_folder_features` reads from a folder, in its order (sorted, recursive)."""
    files = sorted(f for ext in EXTENSIONS for f in glob(os.path.join(fdir, f"**/*.{ext}"), recursive=True))
    npy = [f for f in files if f.endswith(".npy")]
    if npy:
        raise ValueError(f"{fdir}: .npy files are not read here (e.g. {npy[0]}); store images as PNG")
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(EXTENSIONS))}) under {fdir}")
    return files


def _read_rgb(path: str) -> np.ndarray:
    with Image.open(path) as img:
        return np.array(img.convert("RGB"))


def stats_from_folder(fdir: str, extractor: Extractor, mode: str, batch_size: int = 32,
                      device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a folder of images, read as clean-fid reads them, `batch_size` files at a time."""
    files = list_images(fdir)
    return stats_from_batches(([_read_rgb(p) for p in chunk] for chunk in _chunks(files, batch_size)),
                              extractor, mode, device)


def fid_from_folders(dir_a: str, dir_b: str, extractor: Extractor, mode: str = "clean", batch_size: int = 32,
                     device: torch.device | str = "cpu") -> float:
    """FID between two image folders; equals `cleanfid.fid.compute_fid(dir_a, dir_b, ...)` with the same extractor."""
    stats_a = stats_from_folder(dir_a, extractor, mode, batch_size, device)
    stats_b = stats_from_folder(dir_b, extractor, mode, batch_size, device)
    return frechet_distance(*stats_a, *stats_b)


def fid_from_model(generate_batches: Iterable[Images] | Callable[[], Iterable[Images]],
                   ref_stats: tuple[np.ndarray, np.ndarray], extractor: Extractor, mode: str = "clean",
                   device: torch.device | str = "cpu", batch_size: int | None = None) -> float:
    """FID of streamed model samples against reference (mu, sigma); float batches are quantised with `to_uint8`.

    `generate_batches` is an iterable of batches, or a no-argument callable returning one.
    """
    batches = generate_batches() if callable(generate_batches) else generate_batches
    mu, sigma = stats_from_batches(batches, extractor, mode, device, batch_size)
    return frechet_distance(mu, sigma, *ref_stats)
