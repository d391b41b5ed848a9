"""Training privacy: what a data holder can learn about the labels from the gradients it receives, measured in every
run (:mod:`vfl.privacy.audit`), and the defences against it, one pure numpy function per module.

- :mod:`vfl.privacy.spec`: ``PrivacySpec`` (the ``[privacy]`` table / the session config's ``privacy`` map) and
  ``PrivacyError``; no numpy, because the protocol layer imports it.
- :mod:`vfl.privacy.max_norm`, :mod:`vfl.privacy.marvell`, :mod:`vfl.privacy.gradient_noise`: per-step defences on a
  gradient batch ``(grads [b, w], labels [b], rng) -> grads``; :mod:`vfl.privacy.defences` dispatches on a spec.
- :mod:`vfl.privacy.label_dp`: randomized response on the training labels, once per run.
- :mod:`vfl.privacy.audit`: the norm, direction and cluster attacks and the per-epoch ``LeakAudit``.

Only the spec loads with the package; the rest loads on first use (``vfl.privacy.LeakAudit`` works too).
"""

from .spec import DEFENCES, PARAMETERS, PrivacyError, PrivacySpec

# the functions named like their module (max_norm, marvell, gradient_noise) are not re-exported: once the submodule
# is imported, the package attribute of that name is the module, so import them from their modules
_LAZY = {
    "marvell": ("MarvellNoise", "marvell_noise", "sum_kl"),
    "label_dp": ("flip_probability", "randomize_labels"),
    "defences": ("defend",),
    "audit": ("LeakAudit", "cluster_attack_accuracy", "direction_leak_auc", "norm_leak_auc"),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}

__all__ = ["DEFENCES", "PARAMETERS", "PrivacyError", "PrivacySpec", *_WHERE]


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'vfl.privacy' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
