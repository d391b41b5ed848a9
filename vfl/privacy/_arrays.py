"""Input checks shared by the defences and the audit: a gradient batch ``[b, w]`` and its labels ``[b]``."""

from __future__ import annotations

import numpy as np

from .spec import PrivacyError


def as_grads(grads, *, finite: bool = True) -> np.ndarray:
    """``grads`` as a float64 ``[b, w]`` array (a copy; float32 in, so float64 math stays exact per element).
    NaN or infinity is refused unless ``finite`` is False."""
    g = np.asarray(grads)
    if g.ndim != 2:
        raise PrivacyError(f"gradients must have shape [rows, width], got {g.shape}")
    if g.dtype.kind not in "fiu":
        raise PrivacyError(f"gradients must be numbers, got dtype {g.dtype}")
    g = g.astype(np.float64)
    if finite and not np.isfinite(g).all():
        raise PrivacyError("gradients contain NaN or infinity: the training diverged (lower the learning rate)")
    return g


def as_labels(labels, rows: int, n_classes: int | None = None) -> np.ndarray:
    """``labels`` as an int64 ``[rows]`` array of class indices (0/1 float labels of a binary task accepted), each in
    ``[0, n_classes)`` when ``n_classes`` is given."""
    y = np.asarray(labels).reshape(-1)
    if y.shape[0] != rows:
        raise PrivacyError(f"{y.shape[0]} labels for {rows} gradient rows")
    if y.dtype.kind == "b":
        y = y.astype(np.int64)
    elif y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise PrivacyError("labels must be whole class indices (binary: 0 or 1)")
        y = y.astype(np.int64)
    elif y.dtype.kind in "iu":
        y = y.astype(np.int64)
    else:
        raise PrivacyError(f"labels must be class indices, got dtype {y.dtype}")
    if n_classes is not None and y.size and (y.min() < 0 or y.max() >= n_classes):
        raise PrivacyError(f"labels must lie in [0, {n_classes}), got {int(y.min())}..{int(y.max())}")
    return y


def out_like(result: np.ndarray, grads) -> np.ndarray:
    """The defence's result in the input's float dtype (float32 in, float32 out; other inputs give float32)."""
    dtype = np.asarray(grads).dtype
    return result.astype(dtype if dtype.kind == "f" else np.float32)
