"""One entry point for the per-step defences: what the label holder applies to a data holder's gradient just before
BACKWARD. ``label_dp`` acts once on the labels instead (:func:`vfl.privacy.label_dp.randomize_labels`), so here it,
like ``none``, leaves the gradient as it is."""

from __future__ import annotations

import numpy as np

from .gradient_noise import gradient_noise
from .marvell import marvell
from .max_norm import max_norm
from .spec import PrivacySpec

__all__ = ["defend"]


def defend(spec: PrivacySpec, grads: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``grads`` ``[b, w]`` after ``spec``'s defence (the same array for ``none`` and ``label_dp``); ``labels`` are
    the labels the loss was computed from; ``rng`` is the step's and party's seeded generator."""
    if spec.defence == "max_norm":
        return max_norm(grads, labels, rng)
    if spec.defence == "marvell":
        return marvell(grads, labels, rng, sumkl=spec.params["sumkl"])
    if spec.defence == "gradient_noise":
        return gradient_noise(grads, labels, rng, clip=spec.params["clip"], sigma=spec.params["sigma"])
    return grads
