"""Synthetic cut-layer gradients for the privacy tests, shaped like a real binary split network's.

For a binary top model with logit ``z = a . w + b`` on the cut activation ``a``, the gradient a data holder receives
is ``dL/da = (sigmoid(z) - y) * w``: one direction per step, signed by the label, with a norm that is large for the
rows the model gets wrong (with rare positives: the positives). ``leaky_binary`` draws such batches.
"""

import numpy as np


def leaky_binary(rng: np.random.Generator, *, batches: int = 20, batch: int = 64, width: int = 16,
                 positive_rate: float = 0.1, noise: float = 0.01):
    """``(grads [n, width] float32, labels [n] int64, batch_ids [n])`` of ``batches`` steps."""
    grads, labels, ids = [], [], []
    for step in range(batches):
        w = rng.standard_normal(width)
        y = (rng.random(batch) < positive_rate).astype(np.int64)
        # a model that has learnt the base rate: logits near logit(rate), a little spread
        z = np.log(positive_rate / (1 - positive_rate)) + 0.5 * rng.standard_normal(batch)
        g = (1 / (1 + np.exp(-z)) - y)[:, None] * w[None, :] + noise * rng.standard_normal((batch, width))
        grads.append(g.astype(np.float32))
        labels.append(y)
        ids.append(np.full(batch, step))
    return np.concatenate(grads), np.concatenate(labels), np.concatenate(ids)


def batches_of(grads, labels, batch_ids):
    """The (grads, labels) of each batch, in order."""
    for step in np.unique(batch_ids):
        rows = batch_ids == step
        yield grads[rows], labels[rows]
