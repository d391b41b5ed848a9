"""The torch side of training: a data holder's bottom segment, a segment holder's middle segment (a chain) and the
label holder's top segment.

They implement ``vfl.protocol.training_phase.BottomSegment`` / ``TopSegment``; the protocol machines decide when to
call them. A bottom (and a middle segment, ``TorchMiddle``, whose input is its inputs' combined cut layers) keeps,
per step in flight, the activations *and the weights they were computed with* (weight stashing, as in PipeDream):
with a window ``W > 1`` the optimizer updates the live weights while later steps are still in flight, and the
gradient of a step must be taken through the weights its forward used. With ``W = 1`` this is exactly ordinary
synchronous SGD: a chain bottoms -> middle -> top trains as ``train_central`` with the top
``nn.Sequential(middle, top)`` (tests/train/test_middle.py).

Randomness in training mode (dropout) draws from torch's default CPU generator, which each segment reseeds before
every training step with a seed derived from its ``dropout_seed`` (from ``[model].seed``) and the step number: a rerun
with the same seeds repeats every mask, whatever the window, and a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from ..privacy.audit import LeakAudit
from ..privacy.spec import PrivacySpec
from ..protocol.precision import as_received
from .central import as_targets, pullback, task_loss
from .metrics import evaluate
from .models import Combiner, ModelError, load_weights
from .optim import Optimizer


#: the key of a label holder's checkpoint that holds the epoch so far (``TorchTop._epoch_state``)
EPOCH_SO_FAR = "epoch_so_far"


def _index(rows: np.ndarray) -> torch.Tensor:
    """Row positions as a torch index (copied: received arrays are read-only views of the wire)."""
    return torch.tensor(np.asarray(rows, dtype=np.int64))


def _own_int64(rows: np.ndarray) -> np.ndarray:
    """``rows`` as a writable contiguous int64 array: the caller's own when it is one (the PSI's aligned rows, 8 bytes
    a row: a copy would be 80 MB more for the whole training of a 10M-row data holder), else a copy."""
    arr = np.ascontiguousarray(rows, dtype=np.int64).reshape(-1)
    return arr if arr.flags.writeable else arr.copy()


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A float32 torch tensor over a received (read-only) array; copied, because torch wants writable memory."""
    return torch.from_numpy(np.array(array, dtype=np.float32, copy=True))


def step_seed(base: int, step: int) -> int:
    """The seed of training step ``step`` of a segment whose dropout seed is ``base`` (63 bits)."""
    digest = hashlib.sha256(b"vfl step seed\0%d\0%d" % (base, step)).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def privacy_rng(seed: int, step: int, party: str) -> np.random.Generator:
    """The defence's generator for ``party``'s gradient of training step ``step``: from ``[model].seed``, the step
    and the party only, so a rerun (or a resumed run) perturbs every gradient exactly as before, whatever the window."""
    digest = hashlib.sha256(b"vfl privacy\0%d\0%d\0" % (seed, step) + party.encode("utf-8")).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "big"))


def label_dp_targets(spec: PrivacySpec, targets: np.ndarray, n_classes: int, seed: int) -> np.ndarray:
    """The labels a label_dp run trains on: ``targets`` (the label holder's whole table, in FILE order, which is the
    same in every run, unlike the PSI's aligned order) randomised once with randomized response at the spec's
    epsilon, from ``[model].seed``. Any other defence: ``targets`` unchanged."""
    if spec.defence != "label_dp":
        return targets
    from ..privacy.label_dp import randomize_labels

    digest = hashlib.sha256(b"vfl label_dp\0%d" % seed).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:16], "big"))
    flipped = randomize_labels(np.asarray(targets).astype(np.int64), n_classes, spec.params["epsilon"], rng)
    return np.asarray(flipped).astype(np.asarray(targets).dtype)


def _seed_step(base: int | None, step: int) -> None:
    if base is not None:  # about 2 us: the default generator alone (torch.manual_seed also visits every device)
        torch.default_generator.manual_seed(step_seed(base, step))


class _StashingSegment:
    """What a bottom and a middle segment share: a model trained on gradients that arrive later, with weight
    stashing per step in flight, per-step dropout seeds, and checkpoints of the model and its optimizer.

    ``_train_forward`` runs the model on detached clones of its parameters (``functional_call``) and keeps them with the
    step's graph, so ``_train_backward`` takes the step's gradient through the weights its forward used, whatever the
    optimizer did to the live ones meanwhile (with one step in flight the clones equal the live weights: synchronous
    SGD exactly)."""

    def __init__(self, model: nn.Module, optimizer: Optimizer, checkpointer=None, dropout_seed: int | None = None):
        self.model = model
        self.dropout_seed = dropout_seed  # None: training-mode randomness comes from wherever the global RNG is
        self.optimizer = optimizer
        self.checkpointer = checkpointer
        self._names = [name for name, _ in model.named_parameters()]
        # step -> (activations, the stashed parameters, the inputs whose gradients backward returns)
        self._stash: dict[int, tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]] = {}

    def _eval_forward(self, x: torch.Tensor) -> np.ndarray:
        self.model.eval()
        with torch.no_grad():
            return self.model(x).numpy()

    def _train_forward(self, step: int, x: torch.Tensor, wanted: Sequence[torch.Tensor] = ()) -> np.ndarray:
        """The step's activations; keeps what ``_train_backward(step)`` needs. ``wanted``: leaf tensors behind ``x``
        (requiring grad) whose gradients ``_train_backward`` returns."""
        self.model.train()
        _seed_step(self.dropout_seed, step)
        stashed = [p.detach().clone().requires_grad_(True) for p in self.model.parameters()]
        params = dict(zip(self._names, stashed))
        acts = functional_call(self.model, (params, dict(self.model.named_buffers())), (x,))
        self._stash[step] = (acts, stashed, list(wanted))
        return acts.detach().numpy()

    def _train_backward(self, step: int, gradient: np.ndarray) -> list[torch.Tensor]:
        """Back-propagate ``gradient`` through step ``step``'s stashed weights, step the optimizer; returns the
        gradients of the step's ``wanted`` inputs (zeros for one the model does not use). A gradient of the wrong
        shape raises ``ValueError`` and leaves the step in flight."""
        acts, stashed, wanted = self._stash[step]
        total = pullback(acts, _tensor(gradient))
        del self._stash[step]
        grads = torch.autograd.grad(total, [*stashed, *wanted], allow_unused=True)
        self.optimizer.zero_grad(set_to_none=True)
        for p, g in zip(self.model.parameters(), grads):
            p.grad = torch.zeros_like(p) if g is None else g
        self.optimizer.step()
        return [torch.zeros_like(w) if g is None else g for w, g in zip(wanted, grads[len(stashed):])]

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state(self, state: dict, what: str = "the state") -> None:
        """Weights and optimizer state; ``ModelError`` (naming the layer and both shapes) if they do not fit."""
        load_weights(self.model, state, what, "model")
        self.optimizer.load_state_dict(state["optimizer"])

    def checkpoint(self, step: int, epoch: int, keep: bool = False) -> str:
        return self.checkpointer.save(self._checkpoint_state(), step, epoch, keep=keep)

    def _checkpoint_state(self) -> dict:
        return self.state()

    def restore(self, step: int, digest: str | None) -> None:
        self._stash.clear()
        self.checkpointer.restore(step, digest, self._restore_state)

    def _restore_state(self, state: dict, what: str) -> None:
        self.load_state(state, what)


class TorchBottom(_StashingSegment):
    """A data holder's bottom model over its features.

    ``features`` are the party's rows as they are in its file (not copied) and ``rows[i]`` the file row of aligned
    row ``i``; without ``rows`` the features are already in the aligned order. ``features`` is an array in RAM or
    anything with ``shape`` and ``take(file_rows) -> float32 array``, such as the node's
    :class:`~vfl.train.feature_file.FeatureFile`: then each batch's rows are read from it when the batch comes.
    ``scaler`` (set by the node; anything with ``transform``) is applied to every batch as it is read, so the
    standardised table never exists as a whole; elementwise, so a batch gets exactly the numbers it would get as
    rows of a standardised matrix."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        features: np.ndarray,
        checkpointer=None,
        dropout_seed: int | None = None,
        rows: np.ndarray | None = None,
    ):
        super().__init__(model, optimizer, checkpointer, dropout_seed)
        self.rows = None if rows is None else torch.from_numpy(_own_int64(rows))
        self.features = (features if hasattr(features, "take") and not isinstance(features, np.ndarray)
                         else torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)))
        self.scaler = None

    def inputs(self, rows: np.ndarray) -> torch.Tensor:
        """The features of aligned rows ``rows``."""
        index = _index(rows)
        file_rows = index if self.rows is None else self.rows[index]
        if isinstance(self.features, torch.Tensor):
            x = self.features[file_rows]
        else:
            x = torch.from_numpy(self.features.take(file_rows.numpy()))
        if self.scaler is not None:
            x = torch.from_numpy(self.scaler.transform(x.numpy()))
        return x

    def forward(self, step: int, rows: np.ndarray, train: bool) -> np.ndarray:
        x = self.inputs(rows)
        return self._train_forward(step, x) if train else self._eval_forward(x)

    def backward(self, step: int, gradient: np.ndarray) -> None:
        self._train_backward(step, gradient)


class TorchMiddle(_StashingSegment):
    """A segment holder's model segment in a chain: its input is its inputs' cut-layer activations, combined.

    ``inputs`` maps each input party (a data holder or another segment holder) to its cut width, in the order of
    concatenation; ``combine`` is ``"concat"`` (the model sees ``sum(widths)`` features) or ``"sum"`` (equal widths,
    the model sees that width): :class:`~vfl.train.models.Combiner`, whose ``split`` gives each input its part of the
    gradient. The model is built on ``in_features`` (e.g. ``build_model(middle_in_features(inputs, combine), spec)``).

    ``forward(step, activations, train)`` -> this segment's activations, float32 ``[n, out_width]``;
    ``backward(step, gradient)`` -> d loss / d each input's activations, float32 ``[n, width]`` C-contiguous, taken
    through the weights step ``step``'s forward used (weight stashing, as a bottom). In sum mode the inputs'
    gradients share one buffer (the same numbers). Checkpoints hold ``{"model", "optimizer"}``, as a bottom's."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        inputs: Mapping[str, int],
        combine: str = "concat",
        checkpointer=None,
        dropout_seed: int | None = None,
    ):
        super().__init__(model, optimizer, checkpointer, dropout_seed)
        if not isinstance(inputs, Mapping) or not inputs:
            raise ModelError("a middle segment needs at least one input party")
        for party, width in inputs.items():
            if not isinstance(party, str) or isinstance(width, bool) or not isinstance(width, int) or width < 1:
                raise ModelError(f"a middle segment's inputs map party ids to positive widths, got "
                                 f"{party!r}: {width!r}")
        self.order = list(inputs)
        self.combiner = Combiner([inputs[p] for p in self.order], combine)
        self.widths = {p: inputs[p] for p in self.order}

    @property
    def in_features(self) -> int:
        """The width of the model's input: the combined cut layers."""
        return self.combiner.out_features

    def _combined(self, activations: Mapping[str, np.ndarray]) -> torch.Tensor:
        """The inputs' activations, checked (a backstop: the protocol checks every FORWARD before), copied into torch
        and combined."""
        if not isinstance(activations, Mapping) or set(activations) != set(self.order):
            got = sorted(map(str, activations)) if isinstance(activations, Mapping) else type(activations).__name__
            raise ValueError(f"a middle segment combines the activations of {self.order}, got {got}")
        n = None
        for party in self.order:
            a, width = activations[party], self.widths[party]
            if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.ndim != 2 or a.shape[1] != width:
                shape = f"{a.dtype} {list(a.shape)}" if isinstance(a, np.ndarray) else f"a {type(a).__name__}"
                raise ValueError(f"activations of {party!r} must be float32 [n, {width}], got {shape}")
            if n is None:
                n = a.shape[0]
            elif a.shape[0] != n:
                raise ValueError(f"activations of {party!r} have {a.shape[0]} rows, those of {self.order[0]!r} {n}")
        return self.combiner.combine([_tensor(activations[p]) for p in self.order])

    def forward(self, step: int, activations: Mapping[str, np.ndarray], train: bool) -> np.ndarray:
        x = self._combined(activations)
        if not train:
            return self._eval_forward(x)
        x.requires_grad_(True)  # a leaf: its gradient is what the inputs are sent, split by the combiner
        return self._train_forward(step, x, (x,))

    def backward(self, step: int, gradient: np.ndarray) -> dict[str, np.ndarray]:
        (grad,) = self._train_backward(step, gradient)
        return {p: np.ascontiguousarray(g.numpy(), dtype=np.float32)
                for p, g in zip(self.order, self.combiner.split(grad))}


def middle_in_features(inputs: Mapping[str, int], combine: str = "concat") -> int:
    """The input width of a middle segment over ``inputs`` (party -> cut width): what its model is built on."""
    return Combiner(list(inputs.values()), combine).out_features


class TorchTop:
    """The label holder's top model, loss and metrics; optionally also its own bottom over its own features.

    ``privacy``: the session's defence, applied to each data holder's gradient as the last thing before it is
    returned (so before BACKWARD), with :func:`privacy_rng`. ``targets`` are what the loss trains on; with label_dp
    they are the randomised labels, and ``true_targets`` the real ones, which validation metrics and the audit use
    (default: ``targets``). ``audit``: a :class:`~vfl.privacy.audit.LeakAudit` sees exactly what each data holder is
    sent, and ``end_epoch`` reports its figures as ``leak_auc_norm`` etc., each a map party -> figure.
    """

    def __init__(
        self,
        *,
        top: nn.Module,
        optimizer: Optimizer,
        combiner: Combiner,
        order: Sequence[str],
        task: str,
        targets: np.ndarray,
        own: TorchBottom | None = None,
        own_name: str | None = None,
        checkpointer=None,
        dropout_seed: int | None = None,
        privacy: PrivacySpec = PrivacySpec(),
        audit: bool = False,
        true_targets: np.ndarray | None = None,
        privacy_seed: int = 0,
        n_classes: int | None = None,
        gradient_precision: str = "float32",
    ):
        self.checkpointer = checkpointer
        self.dropout_seed = dropout_seed  # the top's and the own bottom's dropout, reseeded every step
        self.privacy = privacy
        self.privacy_seed = privacy_seed
        #: the session's BACKWARD precision: the gradients returned (and audited) are what the data holders decode
        self.gradient_precision = gradient_precision
        self.top = top
        self.optimizer = optimizer
        self.combiner = combiner
        self.order = list(order)  # party order at the cut layer (the combiner's)
        self.task = task
        self.targets = as_targets(task, targets)
        self.true_targets = self.targets if true_targets is None else as_targets(task, true_targets)
        self._true_labels = self.true_targets.numpy()
        self.loss_fn = task_loss(task)
        if n_classes is None:
            n_classes = int(self._true_labels.max()) + 1 if task == "multiclass" and len(self._true_labels) else 2
        self.audit = LeakAudit(task, n_classes) if audit else None
        self._audited_step = -1  # the last step the audit saw: a step again means a rollback (``_audit``)
        self.own = own
        self.own_name = own_name
        self._deferred = None  # the rest of the last training step, done by ``settle``
        self._settle_seconds = 0.0  # how long settling took since the last step (``last_step_seconds`` counts it)
        self._train_out: list[np.ndarray] = []
        self._train_truth: list[np.ndarray] = []  # the true labels of the rows of ``_train_out``
        self._val_out: list[np.ndarray] = []
        self._val_truth: list[np.ndarray] = []

    def _combined(self, rows: np.ndarray, activations: Mapping[str, np.ndarray], train: bool):
        pieces, own_acts = [], None
        for name in self.order:
            if name == self.own_name:
                own_acts = self._own_forward(rows, train)
                pieces.append(own_acts.detach())
            else:
                pieces.append(_tensor(activations[name]))
        return self.combiner.combine(pieces), own_acts

    def _own_forward(self, rows: np.ndarray, train: bool) -> torch.Tensor:
        x = self.own.inputs(rows)
        self.own.model.train(train)
        if train:
            return self.own.model(x)
        with torch.no_grad():
            return self.own.model(x)

    def train_step(self, step: int, rows: np.ndarray, activations: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One step up to the gradients the data holders are sent; the rest of it (the optimizer steps and the
        step's bookkeeping) waits in ``settle`` until those are on their way. ``last_step_seconds`` is what a step
        takes here, the previous step's settling included (``window = "auto"`` sizes the window from it)."""
        self.settle()
        settled, self._settle_seconds = self._settle_seconds, 0.0
        started = time.perf_counter()
        sent = self._train_step(step, rows, activations)
        self.last_step_seconds = time.perf_counter() - started + settled
        return sent

    @property
    def unsettled(self) -> bool:
        """The last step's optimizer steps and bookkeeping are still to do (``settle``)."""
        return self._deferred is not None

    def settle(self) -> None:
        """Finish the last training step: the optimizer steps, its training outputs and its audit. The node calls
        this once the step's BACKWARDs have left, so a data holder is not kept waiting for them across a WAN; every
        method that reads or changes the model settles first, so the result is exactly that of finishing at once."""
        finish, self._deferred = self._deferred, None
        if finish is not None:
            started = time.perf_counter()
            finish()
            self._settle_seconds += time.perf_counter() - started

    def _train_step(self, step: int, rows: np.ndarray, activations: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.optimizer.zero_grad(set_to_none=True)
        if self.own is not None:
            self.own.optimizer.zero_grad(set_to_none=True)
        _seed_step(self.dropout_seed, step)
        combined, own_acts = self._combined(rows, activations, True)
        combined.requires_grad_(True)
        self.top.train()
        outputs = self.top(combined)
        loss = self.loss_fn(outputs, self.targets[_index(rows)])
        loss.backward()
        grads = dict(zip(self.order, self.combiner.split(combined.grad)))
        own_grad = grads.pop(self.own_name) if own_acts is not None else None
        self.last_loss = float(loss.detach())
        sent = {name: self._defended(step, name, rows, g) for name, g in grads.items()}
        if self.gradient_precision != "float32":  # the audit sees what each data holder decodes, not more
            sent = {name: as_received(g, self.gradient_precision) for name, g in sent.items()}

        def finish() -> None:  # nothing here changes what the data holders are sent for this step
            self.optimizer.step()
            if own_acts is not None:
                pullback(own_acts, own_grad).backward()
                self.own.optimizer.step()
            self._train_out.append(outputs.detach().numpy().copy())
            self._train_truth.append(self._true_labels[np.asarray(rows, dtype=np.int64)])
            self._audit(step, rows, sent)

        self._deferred = finish
        return sent

    def _defended(self, step: int, party: str, rows: np.ndarray, grad: torch.Tensor) -> np.ndarray:
        """What ``party`` is sent for ``step``: its gradient after the session's defence (none: unchanged)."""
        g = np.ascontiguousarray(grad.numpy(), dtype=np.float32)
        if self.privacy.defence == "none":
            return g
        from ..privacy.defences import defend  # once loaded, a dictionary look-up

        labels = self._train_labels(rows)
        out = defend(self.privacy, g, labels, privacy_rng(self.privacy_seed, step, party))
        return np.ascontiguousarray(out, dtype=np.float32)

    def _train_labels(self, rows: np.ndarray) -> np.ndarray:
        """The labels the step trained on (a defence knows only those: with label_dp, the randomised ones). A
        regression's targets are no class labels; the defences that take one (max_norm, gradient_noise) use none,
        so they get zeros."""
        if self.task == "regression":
            return np.zeros(len(rows), dtype=np.int64)
        return self._labels(self.targets.numpy(), rows)

    def _labels(self, labels: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """``labels`` of ``rows`` as the privacy functions take them: class ids (int64), or regression targets."""
        picked = labels[np.asarray(rows, dtype=np.int64)]
        return picked if self.task == "regression" else picked.astype(np.int64)

    def _audit(self, step: int, rows: np.ndarray, sent: Mapping[str, np.ndarray]) -> None:
        """Give the audit exactly what each data holder is sent, with the TRUE labels of the rows. A step at or before
        the last one audited is a rollback to a checkpoint (``restore`` also drops the epoch's training outputs):
        what the audit had of this epoch goes too, so no gradient is counted twice."""
        if self.audit is None:
            return
        if step <= self._audited_step:
            self.audit.result()  # discards (and resets) the epoch so far
        self._audited_step = step
        labels = self._labels(self._true_labels, rows)
        for party in sorted(sent):
            self.audit.add(party, sent[party], labels)

    def eval_batch(self, epoch: int, rows: np.ndarray, activations: Mapping[str, np.ndarray]) -> None:
        self.settle()
        combined, _ = self._combined(rows, activations, False)
        self.top.eval()
        with torch.no_grad():
            self._val_out.append(self.top(combined).numpy().copy())
        self._val_truth.append(self._true_labels[np.asarray(rows, dtype=np.int64)])

    def end_epoch(self, epoch: int) -> dict[str, float]:
        self.settle()
        metrics: dict[str, float] = {}
        for prefix, outs, truth in (("train", self._train_out, self._train_truth), ("val", self._val_out, self._val_truth)):
            if not outs:
                continue
            for key, value in evaluate(self.task, np.concatenate(outs), np.concatenate(truth)).items():
                metrics[f"{prefix}_{key}"] = float(value)
        self._train_out, self._train_truth, self._val_out, self._val_truth = [], [], [], []
        if self.audit is not None:
            for party, figures in sorted(self.audit.result().items()):  # party -> {figure: value}, nested the
                for key, value in figures.items():                        # other way round: figure -> {party: value}
                    metrics.setdefault(key, {})[party] = float(value)
        return metrics

    def predict(self, rows: np.ndarray, activations: Mapping[str, np.ndarray]) -> np.ndarray:
        self.settle()
        combined, _ = self._combined(rows, activations, False)
        self.top.eval()
        with torch.no_grad():
            return self.top(combined).numpy()

    def state(self) -> dict:
        self.settle()
        out = {"top": self.top.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.own is not None:
            out["own"] = self.own.state()
        encoding = getattr(self, "label_encoding", None)
        if encoding is not None:
            out["labels"] = encoding.to_dict()
        scaler = getattr(self, "own_scaler", None)
        if scaler is not None:
            out["own_scaler"] = scaler.to_dict()
        return out

    def checkpoint(self, step: int, epoch: int, keep: bool = False) -> str:
        """The segment (``state``) and the epoch so far (``_epoch_state``): this party's checkpoint at ``step``."""
        return self.checkpointer.save({**self.state(), EPOCH_SO_FAR: self._epoch_state()}, step, epoch, keep=keep)

    def _epoch_state(self) -> dict:
        """What the epoch's metrics and audit have gathered from its steps so far: the outputs of its training
        steps, the true labels of their rows and the audit's scores (labels, not row positions: a restarted label
        holder's PSI may agree on another row order). A run resumed from a checkpoint in the middle of an epoch goes on
        from them, so that epoch's training figures and leak figures cover all its steps, as in an uninterrupted
        run, not only those after the checkpoint. Empty at an epoch's start."""
        out = {"train_out": np.concatenate(self._train_out) if self._train_out else None,
               "train_truth": np.concatenate(self._train_truth) if self._train_truth else None}
        if self.audit is not None:
            out["audit"] = self.audit.state()
        return out

    def _load_epoch_state(self, state, step: int) -> None:
        """The epoch so far from a checkpoint's ``_epoch_state`` (none: an epoch start, or an older checkpoint)."""
        state = state if isinstance(state, Mapping) else {}

        def array(value):
            return None if value is None else np.asarray(value.numpy() if isinstance(value, torch.Tensor) else value)

        train_out, train_truth = array(state.get("train_out")), array(state.get("train_truth"))
        fits = train_out is not None and train_truth is not None and len(train_out) == len(train_truth) > 0
        self._train_out = [train_out] if fits else []
        self._train_truth = [train_truth] if fits else []
        self._val_out, self._val_truth = [], []
        if self.audit is not None:
            audit = state.get("audit") or {}
            self.audit.load_state({party: {k: array(v) if isinstance(v, torch.Tensor) else v for k, v in acc.items()}
                                   for party, acc in audit.items()})
            self._audited_step = step - 1  # the steps before the checkpoint are in the audit already

    def commit(self, step: int, epoch: int, digests: Mapping[str, str], best: dict | None = None) -> None:
        self.checkpointer.commit(step, epoch, dict(digests), best)

    def restore(self, step: int, digest: str | None = None) -> None:
        """Load the checkpoint at ``step``, checked against ``digest`` (default: the manifest's, if it names it)."""
        self.settle()
        if digest is None:
            manifest = self.checkpointer.latest() or {}
            digest = manifest.get("digests", {}).get("") if manifest.get("step") == step else None
        self.checkpointer.restore(step, digest, lambda state, what: self._restore_state(state, what, step))

    def _restore_state(self, state: dict, what: str, step: int) -> None:
        """Each part is checked against the model as it is loaded (``load_weights``): a misfit raises ``ModelError``,
        and the session ends before this segment trains or saves anything. Then the epoch so far
        (``_load_epoch_state``)."""
        load_weights(self.top, state, what, "top")
        if self.own is not None:
            load_weights(self.own.model, state, what, "own", "model")
            self.own.optimizer.load_state_dict(state["own"]["optimizer"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._load_epoch_state(state.get(EPOCH_SO_FAR), step)
