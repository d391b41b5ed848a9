"""Li et al.'s "max norm" heuristic: every row's gradient gets the batch's largest L2 norm, so the norm attack
(score = gradient norm) sees the same number for every row of a batch.

Li et al. 2021, "Label Leakage and Protection in Two-party Split Learning" (arXiv 2102.08504), describe max norm as
noise that brings each example's gradient norm up to the largest in the batch; their reference code
(github.com/OscarcarLi/label-protection, ``custom_gradients_masking.py``, ``gradient_perp_masking_function_creator``
with ``lower = upper = 1``) adds, to each row ``g``, noise *perpendicular* to ``g`` of norm ``sqrt(M^2 - |g|^2)``,
where ``M`` is the batch's largest norm. That is what this module does, rather than scaling ``g`` up, because

- the norm becomes exactly ``M`` (the guarantee), while the noise, a uniformly random direction orthogonal to
  ``g``, has mean zero: the expected update is the true one (scaling would reweight the loss towards the rows the
  top model already fits, the small gradients);
- the direction is blurred too (cosine to the true gradient ``|g| / M``), though Li et al. show that max norm does
  not stop the direction attack: marvell does.

Rows of norm zero stay zero (nothing to hide in them); a width-1 gradient has no perpendicular direction, so there
each row is scaled to ``M`` with its sign kept.
"""

from __future__ import annotations

import numpy as np

from ._arrays import as_grads, as_labels, out_like

__all__ = ["max_norm"]


def max_norm(grads, labels, rng: np.random.Generator) -> np.ndarray:
    """``grads`` ``[b, w]`` with every non-zero row brought to the batch's largest L2 norm by noise orthogonal to it
    (see the module docstring). Same shape and float dtype; ``labels`` are checked but not used. Draws exactly one
    ``[b, w]`` standard normal array from ``rng``, so a seeded generator gives the same result every time."""
    g = as_grads(grads)
    as_labels(labels, g.shape[0])
    if g.size == 0:
        return out_like(g, grads)
    z = rng.standard_normal(g.shape)
    norms = np.sqrt(np.einsum("ij,ij->i", g, g))
    top = norms.max()
    live = norms > 0
    unit = np.zeros_like(g)
    unit[live] = g[live] / norms[live, None]
    perp = z - np.einsum("ij,ij->i", z, unit)[:, None] * unit
    perp_norm = np.sqrt(np.einsum("ij,ij->i", perp, perp))
    # width 1 (or, with probability zero, a draw parallel to g): no perpendicular direction, scale to the top norm
    usable = live & (perp_norm > 1e-12 * np.maximum(1.0, np.abs(z).max(axis=1)))
    gap = np.sqrt(np.maximum(top * top - norms * norms, 0.0))
    out = g.copy()
    out[usable] += (gap[usable] / perp_norm[usable])[:, None] * perp[usable]
    scaled = live & ~usable
    out[scaled] = unit[scaled] * top
    return out_like(out, grads)
