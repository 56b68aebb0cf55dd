"""CLIP score as DMD / DMD2 report it: the mean raw cosine between image and caption embeddings (~0.32 for SD).

DMD2's COCO evaluator (tianweiy/DMD2 `main/coco_eval/coco_evaluator.py`, `compute_clip_score`) uses open_clip
ViT-g-14 `laion2b_s12b_b42k` in fp32. Each uint8 image is center-cropped on its long edge, resized to 256x256
with PIL Lanczos, then passed through open_clip's own preprocess (bicubic resize of the short edge to 224,
center crop, ToTensor, OpenAI mean/std). Captions get "A photo depicts " spliced in after the start token.
Here that 256 step is `resize=DMD2_RESIZE` and the caption prefix is `prefix=DMD2_PREFIX`; both are opt-in.

Weights come only from a local file (`evaluate.clip_weights`); nothing is ever downloaded.
"""
from __future__ import annotations

import functools
from concurrent.futures import Executor
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .fid import check_resize_on, extractor_precision, parallel_map
from .protocols import center_crop_box
from .protocols import center_crop_resize as protocol_crop_resize
from .resample import resize_uint8

DMD2_PREFIX = "A photo depicts "  # Hessel et al. 2021 (CLIPScore), as DMD2's evaluator prepends it
DMD2_RESIZE = 256  # DMD2 resizes the center-cropped image to 256x256 (Lanczos) before CLIP's preprocess
DEFAULT_MODEL = "ViT-g-14"
DEFAULT_TAG = "laion2b_s12b_b42k"

ImagesLike = Union[torch.Tensor, Sequence[Image.Image], Sequence[torch.Tensor]]


def _missing_weights_message(weights: Optional[str], model_name: str, tag: Optional[str]) -> str:
    """One line: which file, which config field, which file to fetch by hand."""
    import open_clip

    what = f"CLIP weights file {weights} not found" if weights else "no CLIP weights file given"
    hint = ""
    hub = open_clip.get_pretrained_cfg(model_name, tag).get("hf_hub", "") if tag else ""
    if hub:
        repo = hub.rstrip("/").split("/")
        hint = (f" (for {model_name} {tag}: open_clip_model.safetensors if the Hugging Face repo "
                f"{'/'.join(repo[:2])} has it, else its open_clip_pytorch_model.bin)")
    return f"{what}: set evaluate.clip_weights to a local open_clip {model_name} checkpoint{hint}; nothing is downloaded"


def load_clip(model_name: str = DEFAULT_MODEL, weights: Optional[str] = None, device: Union[str, torch.device] = "cpu",
              *, tag: Optional[str] = DEFAULT_TAG, random_init: bool = False):
    """(model, preprocess, tokenizer) for an open_clip model from a local weight file, fp32, eval, frozen.

    `tag` names the open_clip pretrained entry the file holds; its preprocessing (mean, std, interpolation,
    resize mode) and QuickGELU flag are read from open_clip's built-in table (no I/O) and applied, because a
    file path alone gets open_clip's defaults. `.safetensors` loads without pickle; other files go through
    `torch.load(weights_only=True)` (open_clip 3.3 passes it). `random_init=True` is for tests only.
    """
    import open_clip

    checkpoint = None
    if not random_init:
        path = Path(weights) if weights else None
        if path is None or not path.is_file():
            raise FileNotFoundError(_missing_weights_message(weights, model_name, tag))
        # An absolute path never equals a pretrained tag, so open_clip cannot mistake it for one and download.
        checkpoint = str(path.resolve())
    pcfg = open_clip.get_pretrained_cfg(model_name, tag) if tag else {}
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=checkpoint, precision="fp32", device=device,
        force_quick_gelu=bool(pcfg.get("quick_gelu", False)),
        image_mean=pcfg.get("mean"), image_std=pcfg.get("std"),
        image_interpolation=pcfg.get("interpolation"), image_resize_mode=pcfg.get("resize_mode"),
        pretrained_image=False, pretrained_text=False, weights_only=True,
    )
    model.eval().requires_grad_(False)
    return model, preprocess, open_clip.get_tokenizer(model_name)


def to_pil(image: Union[torch.Tensor, Image.Image, np.ndarray]) -> Image.Image:
    """A (3, H, W) float tensor in [0, 1] (clamped, rounded to uint8) or uint8 tensor, a uint8 (H, W, 3) array, or
    a PIL image, as RGB PIL."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return Image.fromarray(image)
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"each image must be a (3, H, W) tensor or a PIL image, got "
                         f"{getattr(image, 'shape', type(image).__name__)}")
    x = image.detach().cpu()
    if x.dtype != torch.uint8:
        x = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).numpy())


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """DMD2's evaluator step (`protocols.center_crop_resize`) on a PIL image."""
    return Image.fromarray(protocol_crop_resize(image, size))


def tokenize_captions(captions: Sequence[str], tokenizer: Callable, prefix: str = "") -> torch.Tensor:
    """Token ids of `prefix + caption`. With a prefix ending in a space (DMD2_PREFIX) and open_clip's BPE
    tokenizer this equals DMD2's splice of the prefix ids after the start token, truncation included."""
    if isinstance(captions, str):
        raise TypeError("captions must be a sequence of strings, not one string")
    return tokenizer([prefix + c for c in captions])


def split_preprocess(preprocess: Callable) -> tuple[Callable, Callable]:
    """(PIL stages, tensor stages) of an open_clip preprocess, split before its ToTensor; composed they are it.
    A preprocess of another kind is all PIL stages."""
    stages = list(getattr(preprocess, "transforms", []))
    at = next((i for i, t in enumerate(stages) if type(t).__name__ in ("ToTensor", "MaybeToTensor")), None)
    if at is None:
        return preprocess, _identity
    return type(preprocess)(stages[:at]), type(preprocess)(stages[at:])


def _identity(x):
    return x


def pil_stages(image: Union[torch.Tensor, Image.Image, np.ndarray], pil_preprocess: Callable,
               resize: Optional[int] = None):
    """One image up to the model's ToTensor: uint8 RGB PIL, DMD2's crop + Lanczos to `resize` when given, then the
    preprocess's PIL stages. PIL only (no torch, whose own threads would multiply), so any worker can run it."""
    pil = to_pil(image)
    return pil_preprocess(pil if resize is None else center_crop_resize(pil, resize))


def _portable(image):
    """A uint8 (3, H, W) tensor as a contiguous (H, W, 3) array: pickled alone to a worker process, not its batch."""
    if isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3:
        return np.ascontiguousarray(image.permute(1, 2, 0).numpy())
    return image


def _resized_size(h: int, w: int, size) -> tuple[int, int]:
    """torchvision `Resize(size)`'s output (h, w) for an h x w image: an int (or [int]) is the short side."""
    if isinstance(size, int) or len(size) == 1:
        short, long = (w, h) if w <= h else (h, w)
        new_short = size if isinstance(size, int) else size[0]
        new_long = int(new_short * long / short)
        return (new_long, new_short) if w <= h else (new_short, new_long)
    return int(size[0]), int(size[1])


def device_preprocess(images: torch.Tensor, preprocess: Callable, resize: Optional[int] = None) -> torch.Tensor:
    """`pil_stages` then the tensor stages of an open_clip preprocess, for uint8 (N, 3, H, W) images on their
    device: DMD2's crop + Lanczos to `resize`, Resize (bicubic or Lanczos, `resample.resize_uint8`: PIL's bytes),
    CenterCrop (torchvision's offsets), RGB, ToTensor (/255), Normalize; the tensors the PIL path gives."""
    x = images
    if resize is not None:
        left, top, right, bottom = center_crop_box(x.shape[3], x.shape[2])
        x = resize_uint8(x[:, :, top:bottom, left:right], (resize, resize), "lanczos")
    for t in getattr(preprocess, "transforms", [preprocess]):
        name = type(t).__name__
        interpolation = getattr(getattr(t, "interpolation", None), "value", None)
        if name == "Resize" and interpolation in ("bicubic", "lanczos") and getattr(t, "max_size", None) is None:
            x = resize_uint8(x, _resized_size(x.shape[2], x.shape[3], t.size), interpolation)
        elif name == "CenterCrop" and all(c <= s for c, s in zip(t.size, x.shape[2:])):
            top, left = (int(round((s - c) / 2.0)) for s, c in zip(x.shape[2:], t.size))
            x = x[:, :, top:top + t.size[0], left:left + t.size[1]]
        elif name == "MaybeConvertMode" or getattr(t, "__name__", "") == "_convert_to_rgb":
            continue  # the images are RGB already
        elif name in ("ToTensor", "MaybeToTensor") and x.dtype == torch.uint8:
            x = x.float().div(255)
        elif name == "Normalize" and x.is_floating_point():
            mean = torch.as_tensor(t.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
            std = torch.as_tensor(t.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
            x = x.sub(mean).div(std)
        else:
            raise ValueError(f"resize_on='device' cannot run the preprocess stage {t!r}; use resize_on='cpu'")
    return x


@torch.no_grad()
def clip_score(images: ImagesLike, captions: Sequence[str], model: nn.Module, preprocess: Callable,
               tokenizer: Callable, prefix: str = "", batch_size: int = 64,
               resize: Optional[int] = None, *, pool: Optional[Executor] = None,
               precision: str = "fp32", resize_on: str = "cpu",
               text: Optional[torch.Tensor] = None) -> tuple[float, torch.Tensor]:
    """(mean cosine, per-sample cosine (N,) on CPU) between L2-normalised image and caption embeddings.

    Images: (N, 3, H, W) float in [0, 1] or uint8, or a list of PIL images / (3, H, W) tensors. Each becomes a
    uint8 RGB PIL image and goes through the model's own `preprocess`, exactly as open_clip treats a PIL image
    (PIL bicubic on uint8 differs slightly from torchvision's tensor resize). `resize=DMD2_RESIZE` adds DMD2's
    center crop + 256 Lanczos step first; `prefix=DMD2_PREFIX` adds its caption prefix. The images are prepared
    in `pool`'s threads when given, or on the model's device with `resize_on="device"` (image tensors only;
    `device_preprocess`, the same tensors); both towers run in `precision` (`fid.extractor_precision`).
    `text`: the captions' `text_features`, (N, D) in caption order, computed beforehand; the text tower is not run.
    """
    check_resize_on(resize_on)
    n = len(images)
    if n != len(captions):
        raise ValueError(f"{n} images but {len(captions)} captions")
    if n == 0:
        raise ValueError("clip_score needs at least one image-caption pair")
    if text is not None and len(text) != n:
        raise ValueError(f"{n} captions but {len(text)} text features")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    if resize_on == "device" and not (isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[1] == 3):
        raise ValueError("resize_on='device' takes an (N, 3, H, W) image tensor; pass PIL images with resize_on='cpu'")
    pil_part, tensor_part = split_preprocess(preprocess)
    scores = []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        if resize_on == "device":
            x = images[start:stop].to(device)
            if x.dtype != torch.uint8:  # as `to_pil` quantises
                x = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
            batch = device_preprocess(x, preprocess, resize)
        else:
            items = [_portable(images[i]) for i in range(start, stop)]
            pils = parallel_map(functools.partial(pil_stages, pil_preprocess=pil_part, resize=resize), items, pool)
            batch = torch.stack([tensor_part(p) for p in pils])
        txt = (text[start:stop].to(device) if text is not None
               else _text(model, tokenize_captions(list(captions[start:stop]), tokenizer, prefix), precision))
        scores.append(_cosines(model, batch.to(device), txt, precision).cpu())
    per_sample = torch.cat(scores)
    return float(per_sample.double().mean()), per_sample


def text_features(captions: Sequence[str], model: nn.Module, tokenizer: Callable, prefix: str = "",
                  batch_size: int = 64, precision: str = "fp32") -> torch.Tensor:
    """L2-normalised caption embeddings (N, D), float32 on the model's device, `batch_size` captions a call of the
    text tower: the text half of every cosine here. It depends only on the captions and the model, so a protocol
    computes it once and every scored model reuses it (`ClipScorer.text`); in the same batches, the same values."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return torch.cat([_text(model, tokenize_captions(list(captions[i:i + batch_size]), tokenizer, prefix), precision)
                      for i in range(0, len(captions), batch_size)])


def _text(model: nn.Module, tokens: torch.Tensor, precision: str) -> torch.Tensor:
    """Normalised text embeddings of token ids, on the model's device. The ids cross from pinned memory without
    waiting, so a GPU caller is not held until its queue drains."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        tokens = tokens.pin_memory().to(device, non_blocking=True)
    else:
        tokens = tokens.to(device)
    with torch.no_grad(), extractor_precision(precision, device):
        return F.normalize(model.encode_text(tokens).float(), dim=-1)


def _cosines(model: nn.Module, batch: torch.Tensor, txt: torch.Tensor, precision: str) -> torch.Tensor:
    """Per-sample cosine of preprocessed images (on the model's device) and normalised text embeddings, on the
    device."""
    with torch.no_grad(), extractor_precision(precision, batch.device):
        img = F.normalize(model.encode_image(batch).float(), dim=-1)
    return (img * txt).sum(-1)


def device_cosines(images: torch.Tensor, captions: Sequence[str], model: nn.Module, preprocess: Callable,
                   tokenizer: Callable, prefix: str = "", resize: Optional[int] = None,
                   precision: str = "fp32", text: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`clip_score`'s per-sample cosines of uint8 (N, H, W, 3) images on the model's device with
    `resize_on="device"`, in one batch, left on the device (nothing waits for the GPU); `text` as there."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"device_cosines takes uint8 (N, H, W, 3) images, got {images.dtype} {tuple(images.shape)}")
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    batch = device_preprocess(images.permute(0, 3, 1, 2), preprocess, resize)
    if text is None:
        text = _text(model, tokenize_captions(list(captions), tokenizer, prefix), precision)
    return _cosines(model, batch, text.to(batch.device), precision)
