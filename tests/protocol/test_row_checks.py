"""vfl.arrays: the row checks a node runs on 10M-row epoch orders and schedules give the plain numpy answers."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from tests.fuzz_budget import examples
from vfl.arrays import has_repeats, positions_except

rows = st.integers(1, 300).flatmap(lambda n: st.tuples(st.just(n), st.lists(st.integers(0, n - 1), max_size=2 * n)))


@settings(max_examples=examples(200), deadline=None)
@given(rows)
def test_has_repeats_with_a_bound_answers_as_the_sort_does(case):
    n, values = case
    arr = np.array(values, dtype=np.int64)
    expected = len(set(values)) != len(values)
    assert has_repeats(arr) is expected
    assert has_repeats(arr, bound=n) is expected


@settings(max_examples=examples(200), deadline=None)
@given(rows)
def test_positions_except_is_setdiff1d_of_the_range(case):
    n, values = case
    got = positions_except(n, np.array(values, dtype=np.int64))
    assert got.tolist() == np.setdiff1d(np.arange(n), values).tolist()
