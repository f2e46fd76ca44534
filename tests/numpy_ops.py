"""TensorFlow's image operations written out in float64 NumPy, channels last: the references that
the graph runners (``KerasGraph``, ``TensorFlowGraph``) are checked against.

Imported as ``from numpy_ops import ...`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import numpy as np


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    """Output size and TensorFlow's ``"SAME"`` padding ``(before, after)`` of one axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return out, total // 2, total - total // 2


def conv2d(x: np.ndarray, kernel: np.ndarray, stride: int, same: bool) -> np.ndarray:
    """``(B, H, W, C)`` cross-correlated with ``(kh, kw, C, F)`` as TensorFlow defines it, in loops."""
    kh, kw = kernel.shape[:2]
    if same:
        out_h, top, bottom = _same_pads(x.shape[1], kh, stride)
        out_w, left, right = _same_pads(x.shape[2], kw, stride)
        x = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    else:
        out_h, out_w = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    result = np.zeros((x.shape[0], out_h, out_w, kernel.shape[3]))
    for i in range(out_h):
        for j in range(out_w):
            patch = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
            result[:, i, j, :] = np.einsum("bhwc,hwcf->bf", patch, kernel)
    return result


def max_pool_same(x: np.ndarray, k: int, stride: int) -> np.ndarray:
    """``k x k`` max pooling of ``(B, H, W, C)`` with ``"SAME"`` padding (padding never wins)."""
    out, before, after = _same_pads(x.shape[1], k, stride)
    x = np.pad(x, ((0, 0), (before, after), (before, after), (0, 0)), constant_values=-np.inf)
    return np.stack([np.stack([x[:, i * stride:i * stride + k, j * stride:j * stride + k, :].max(axis=(1, 2))
                               for j in range(out)], 1) for i in range(out)], 1)
