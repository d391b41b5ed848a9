"""Training building blocks of the split network, free of networking and tested in memory.

- :mod:`vfl.train.data`: a party's table (CSV / Parquet / .npz) -> IDs, float32 features, labels; label encoding;
  standardisation.
- :mod:`vfl.train.readers`: the CSV / Parquet / .npz column readers behind ``load_table``.
- :mod:`vfl.train.feature_file`: the float32 feature matrix as a ``.npy`` file, written atomically and read a batch
  of rows at a time (a node's features out of RAM: ``load_table(spec, features_to=PATH)``).
- :mod:`vfl.train.models`: built-in MLP segments or ``"module:factory"`` models, the architecture fingerprint, and
  the ``Combiner`` at the cut layer.
- :mod:`vfl.train.metrics`: losses, accuracy, exact ROC AUC, RMSE (numpy).
- :mod:`vfl.train.specs`: the torch-free ``OptimizerSpec`` and architecture ``fingerprint`` (config checks use them).
- :mod:`vfl.train.optim`: SGD and Adam with torch's single-tensor arithmetic, without ``torch.optim``'s start-up.
- :mod:`vfl.train.central`: the explicit batch schedule, ``split_step`` (one step as the nodes run it) and
  ``train_central``, the centralised reference a ``W = 1`` distributed run must match.
- :mod:`vfl.train.segments`: the torch segments the protocol machines drive (a data holder's bottom, a segment
  holder's middle segment in a chain, the label holder's top); imported on its own, not from here.
"""

from .data import TASKS, DataError, LabelEncoding, PartyTable, Standardizer, TableSpec, encode_labels, load_table
from .metrics import (
    accuracy,
    binary_cross_entropy_with_logits,
    cross_entropy,
    evaluate,
    mean_squared_error,
    rmse,
    roc_auc,
)
from .specs import OptimizerSpec, canonical_json, fingerprint

# torch-backed parts load on first use: `vfl psi` reads tables through vfl.train.data and must not pay for torch
_LAZY = {
    "central": (
        "CentralResult", "ComposedModel", "Schedule", "ScheduleError", "StepResult", "as_targets",
        "make_schedule", "predict", "pullback", "split_step", "task_loss", "train_central",
    ),
    "models": (
        "ACTIVATIONS", "COMBINE_MODES", "Combiner", "MlpSpec", "ModelError", "ModelSpec", "architecture", "build_mlp",
        "build_model", "describe", "resolve_factory", "spec_from_config",
    ),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'vfl.train' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = sorted(
    [name for name in dir() if not name.startswith("_") and name not in {"data", "metrics", "specs", "annotations"}] + list(_WHERE)
)
