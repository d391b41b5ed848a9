"""Per-row clipping plus Gaussian noise, the Gaussian mechanism of DP-SGD applied to the cut-layer gradient: each
row ``g`` becomes ``g * min(1, C / |g|) + N(0, (sigma * C)^2 I)``.

Clipping bounds every row's contribution (its norm can no longer tell a large loss from a small one beyond ``C``),
and the noise, the same for every row whatever its label, hides what is left at a scale set by ``sigma``. Unlike
marvell it needs no labels, so it works for any task, but it spends its noise in every direction alike.
"""

from __future__ import annotations

import numpy as np

from ._arrays import as_grads, as_labels, out_like

__all__ = ["clip_rows", "gradient_noise"]


def clip_rows(g: np.ndarray, clip: float) -> np.ndarray:
    """Every row of the float64 array ``g`` scaled down to L2 norm at most ``clip`` (shorter rows unchanged)."""
    norms = np.sqrt((g * g).sum(axis=1))
    factor = np.divide(clip, norms, out=np.ones_like(norms), where=norms > clip)
    return g * factor[:, None]


def gradient_noise(grads, labels, rng: np.random.Generator, *, clip: float, sigma: float) -> np.ndarray:
    """``grads`` ``[b, w]`` clipped per row to L2 ``<= clip``, plus independent ``N(0, (sigma * clip)^2)`` noise on
    every coordinate. Same shape and float dtype; ``labels`` are checked but not used. Draws one ``[b, w]`` standard
    normal array from ``rng`` (also when ``sigma`` is 0), so a seeded generator repeats the result."""
    if not clip > 0 or not sigma >= 0:
        raise ValueError(f"gradient_noise needs clip > 0 and sigma >= 0, got clip={clip!r}, sigma={sigma!r}")
    g = as_grads(grads)
    as_labels(labels, g.shape[0])
    noise = rng.standard_normal(g.shape)
    return out_like(clip_rows(g, clip) + (sigma * clip) * noise, grads)
