"""The compact item store: it is the list of items it was made from, and every PSI result over it is the list's."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfl.psi import PsiEngine, PsiKey
from vfl.psi.buckets import BucketedReceiver, BucketedSender, MemoryBuckets, run_bucketed_in_memory
from vfl.psi.engine import encode_ids
from vfl.psi.errors import DuplicateIdError
from vfl.psi.exchange import PsiReceiver, PsiSender, prepare_items, run_in_memory
from vfl.psi.items import ItemStore, decode_ids, distinct_rows, encode_id_array, take_items

ITEMS = st.lists(st.binary(max_size=12), max_size=60)
#: few distinct values, so that repeats are common
REPEATING = st.lists(st.sampled_from([b"", b"a", b"b", b"ab", b"\x00", b"s:1"]), max_size=40)
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=8)  # no lone surrogates: Arrow holds UTF-8
INT64 = st.integers(-(2**63), 2**63 - 1)


@settings(max_examples=200, deadline=None)
@given(ITEMS, st.data())
def test_a_store_is_the_list_it_was_made_from(items, data):
    store = ItemStore.from_items(items)
    assert len(store) == len(items) and store == items and list(store) == items
    assert [store[i] for i in range(-len(items), len(items))] == items + items if items else True
    lo, hi = data.draw(st.integers(-70, 70)), data.draw(st.integers(-70, 70))
    step = data.draw(st.sampled_from([None, 1, 2, -1, 3]))
    assert store[lo:hi:step] == items[lo:hi:step]
    rows = data.draw(st.lists(st.integers(0, max(0, len(items) - 1)), max_size=30)) if items else []
    assert store.take(np.array(rows, dtype=np.int64)) == [items[r] for r in rows]
    assert take_items(items, np.array(rows, dtype=np.int64)) == [items[r] for r in rows]
    assert ItemStore.from_arrow(store.to_arrow()) == store
    assert ItemStore.from_arrow(pa.chunked_array([pa.array(items, pa.binary())], pa.binary())) == items


def test_a_store_refuses_what_is_not_one():
    with pytest.raises(ValueError):
        ItemStore(np.zeros(3, np.uint8), np.array([0, 4]))
    with pytest.raises(ValueError):
        ItemStore(np.zeros(3, np.uint8), np.array([0, 2, 1, 3]))
    store = ItemStore.from_items([b"a", b"bc"])
    with pytest.raises(IndexError):
        store[2]
    with pytest.raises(IndexError):
        store.take(np.array([0, 2]))


@settings(max_examples=200, deadline=None)
@given(REPEATING, st.booleans())
def test_the_duplicate_check_of_a_store_is_that_of_the_list(items, dedupe):
    store = ItemStore.from_items(items)
    try:
        want = prepare_items(items, dedupe=dedupe)
    except DuplicateIdError as exc:
        with pytest.raises(DuplicateIdError) as got:
            prepare_items(store, dedupe=dedupe)
        assert (got.value.count, got.value.example, str(got.value)) == (exc.count, exc.example, str(exc))
        return
    got = prepare_items(store, dedupe=dedupe)
    assert got.dtype == np.int64 and got.tolist() == want.tolist()
    first, repeat = distinct_rows(store)
    assert first.tolist() == sorted({it: i for i, it in reversed(list(enumerate(items)))}.values())
    assert (repeat is None) == (len(set(items)) == len(items))


@settings(max_examples=200, deadline=None)
@given(st.lists(TEXT, max_size=30))
def test_text_ids_encode_as_encode_ids_and_decode_back(ids):
    store = encode_id_array(pa.array(ids, pa.string()), "str")
    assert store == encode_ids(ids)
    assert decode_ids(store).to_pylist() == ids if ids else len(decode_ids(store)) == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(INT64, max_size=30))
def test_integer_ids_encode_as_encode_ids_and_decode_back(ids):
    want = encode_ids(ids)
    assert encode_id_array(pa.array(ids, pa.int64()), "int") == want
    assert encode_id_array(pa.array([str(v) for v in ids], pa.string()), "int") == want  # a CSV's canonical text
    if ids:
        assert decode_ids(ItemStore.from_items(want)).to_pylist() == ids


def test_decoding_refuses_mixed_or_oversized_items():
    with pytest.raises(ValueError):
        decode_ids(ItemStore.from_items(encode_ids([1, "a"])))
    with pytest.raises(ValueError):
        decode_ids(ItemStore.from_items(encode_ids([2**64])))
    with pytest.raises(ValueError):
        decode_ids(ItemStore.from_items([b"x"]))


@settings(max_examples=10, deadline=None)
@given(st.sets(st.integers(0, 300), max_size=80), st.sets(st.integers(0, 300), max_size=80),
       st.sampled_from([1, 2, 7]))
def test_a_psi_over_stores_gives_the_rows_and_order_of_one_over_lists(a, b, k):
    a, b = encode_ids(sorted(a)), encode_ids(sorted(b))
    kd, kl = PsiKey.generate(), PsiKey.generate()
    with PsiEngine(workers=1) as engine:
        results = []
        for wrap in (list, ItemStore.from_items):
            pair = run_in_memory(
                PsiSender(wrap(a), engine=engine, run_id="r", nonce=bytes(16), chunk_size=16, key=kd),
                PsiReceiver(wrap(b), engine=engine, run_id="r", nonce=bytes(16), chunk_size=16, key=kl),
            )
            bucketed = run_bucketed_in_memory(
                BucketedSender(MemoryBuckets(wrap(a)), engine=engine, run_id="r", nonce=bytes(16), chunk_size=16,
                               buckets=k, key=kd),
                BucketedReceiver(MemoryBuckets(wrap(b)), engine=engine, run_id="r", nonce=bytes(16), chunk_size=16,
                                 buckets=k, key=kl),
            )
            results.append([r.tolist() for r in (*pair, *bucketed)])
    assert results[0] == results[1]
    want = {x for x in a} & {y for y in b}
    assert {a[r] for r in results[0][0]} == want


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=40), st.booleans())
def test_items_that_share_a_fingerprint_are_compared_byte_by_byte(items, with_repeats):
    """Every item collides (fingerprint = its length, or a constant): the result is still the exact one."""
    if with_repeats and items:
        items = items + items[: len(items) // 2]
    store = ItemStore.from_items(items)
    want = sorted({it: i for i, it in reversed(list(enumerate(items)))}.values())
    repeats = [i for i in range(len(items)) if items[i] in items[:i]]
    for fp in (lambda s: np.diff(s.offsets).astype(np.uint64), lambda s: np.zeros(len(s), np.uint64), None):
        first, repeat = distinct_rows(store, fingerprint=fp)
        assert first.tolist() == want
        assert repeat == (repeats[0] if repeats else None)


@pytest.mark.parametrize("block", [1, 3, 64])
def test_block_boundaries_change_nothing(monkeypatch, block):
    """Encoding and fingerprinting go a block of items at a time: any block size gives the same items and rows."""
    import vfl.psi.items as items_mod

    ids = [f"id-{i % 37}" for i in range(200)] + ["", "x" * 100, "Zoë"]
    want_items = encode_ids(ids)
    want_rows = sorted({it: i for i, it in reversed(list(enumerate(want_items)))}.values())
    monkeypatch.setattr(items_mod, "_BLOCK", block)
    store = encode_id_array(pa.array(ids, pa.string()), "str")
    assert store == want_items
    assert encode_id_array(pa.array(list(range(-50, 50)), pa.int64()), "int") == encode_ids(range(-50, 50))
    first, repeat = distinct_rows(store)
    assert first.tolist() == want_rows and repeat == 37
