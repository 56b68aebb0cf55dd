"""Image encodings leaving the process: sample grids as PNG."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def grid_png(images: torch.Tensor, nrow: int = 8, scale: int = 4) -> bytes:
    """PNG bytes of a grid of images in [-1, 1], shape (N, C, H, W); each pixel scaled up `scale` times."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, c, h, w = x.shape
    ncol = min(nrow, n)
    rows = (n + ncol - 1) // ncol
    canvas = torch.zeros((c, rows * (h + 1) + 1, ncol * (w + 1) + 1), dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        canvas[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + k * (w + 1):1 + k * (w + 1) + w] = x[i]
    arr = canvas.permute(1, 2, 0).numpy()
    arr = np.repeat(np.repeat(arr, scale, 0), scale, 1)
    img = Image.fromarray(arr[..., 0] if c == 1 else arr)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
