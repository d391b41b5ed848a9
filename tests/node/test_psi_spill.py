"""The node's bucket source: each bucket's items in their own 0600 file, one bucket in memory at a time, and the
finished buckets' results, which a restarted party of the same PSI resumes after (PROTOCOL.md [P19]-[P22])."""

from __future__ import annotations

import json
import stat

import numpy as np
import pytest

from vfl.node.spill import SpillBuckets, items_digest
from vfl.psi import PsiEngine, encode_ids
from vfl.psi.items import ItemStore
from vfl.psi.buckets import (
    BucketedReceiver,
    BucketedSender,
    FinishedBucket,
    MemoryBuckets,
    bucket_key,
    run_bucketed_in_memory,
)


BINDING = {"run": "r", "party": "dh1", "peer": "", "nonce": "00" * 16, "items": "x"}
DONE = FinishedBucket(own_items=2, peer_items=3, digest=bytes(range(32)))


def test_spilled_buckets_come_back_as_they_went_and_results_are_kept_for_a_resume(tmp_path):
    items = encode_ids([f"id-{i}" for i in range(500)] + ["Zoë", "x" * 300])
    spill = SpillBuckets(items, tmp_path / "pair", binding=BINDING)
    ref = MemoryBuckets(items)
    key = bucket_key("run", bytes(16))
    assert np.array_equal(spill.partition(key, 7, peer_n_items=40), ref.partition(key, 7))
    files = sorted(p.name for p in (tmp_path / "pair").iterdir())
    assert files == [f"bucket-{b:05d}.npz" for b in range(7)] + ["state.json"]
    for p in (tmp_path / "pair").iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600  # raw IDs: the owner's only
    assert spill.grouping is None  # the partition lives in the files, not in memory
    for b in range(7):
        got, want = spill.bucket(b), ref.bucket(b)
        assert got[0] == want[0] and np.array_equal(got[1], want[1])
    spill.commit(0, np.array([5, 1], dtype=np.int64), DONE)
    spill.commit(1, np.array([7], dtype=np.int64), DONE)
    spill.commit(3, np.array([2], dtype=np.int64), DONE)
    assert not (tmp_path / "pair" / "bucket-00003.npz").exists()  # a committed bucket's items are gone
    assert spill.result(0).tolist() == [5, 1]
    spill.close()
    assert (tmp_path / "pair" / "result-00000.npz").exists()  # kept until the rows are aligned

    # a restarted party of the same PSI finds the contiguous finished buckets (0 and 1; 3 is not after a gap)
    again = SpillBuckets(items, tmp_path / "pair", binding=BINDING)
    earlier = again.earlier()
    assert earlier.k == 7 and earlier.peer_n_items == 40 and earlier.finished == (DONE, DONE)
    again.partition(key, 7, keep=2, peer_n_items=40)
    names = sorted(p.name for p in (tmp_path / "pair").iterdir())
    assert names == ["bucket-00002.npz", "bucket-00003.npz", "bucket-00004.npz", "bucket-00005.npz",
                     "bucket-00006.npz", "result-00000.npz", "result-00001.npz", "state.json"]
    assert again.result(1).tolist() == [7]
    # another binding (run, nonce, peer, ID set) sees nothing to resume
    for key_, value in BINDING.items():
        assert SpillBuckets(items, tmp_path / "pair", binding={**BINDING, key_: value + "0"}).earlier() is None


def test_the_items_digest_changes_with_any_change_to_the_id_file():
    items = encode_ids([f"id-{i}" for i in range(1000)])
    d = items_digest(items, False)
    assert d == items_digest(list(items), False) and d != items_digest(items, True)
    assert d == items_digest(ItemStore.from_items(items), False)  # the node's compact store hashes the same
    big = encode_ids(range(70_000))  # across the digest's batches
    assert items_digest(ItemStore.from_items(big), True) == items_digest(big, True)
    assert d != items_digest(items[:-1], False) and d != items_digest(items[1:] + items[:1], False)
    assert items_digest([b"ab", b"c"], False) != items_digest([b"a", b"bc"], False)


def test_a_bucketed_psi_through_spill_files_equals_the_in_memory_one(tmp_path):
    a = encode_ids(range(0, 700))
    b = encode_ids(range(350, 1000))
    with PsiEngine(workers=1) as engine:
        d = BucketedSender(SpillBuckets(a, tmp_path / "d", binding=BINDING), engine=engine, run_id="r",
                           nonce=bytes(16), chunk_size=64, buckets=5)
        lh = BucketedReceiver(SpillBuckets(b, tmp_path / "l", binding=BINDING), engine=engine, run_id="r",
                              nonce=bytes(16), chunk_size=64, buckets=5)
        d_rows, l_rows = run_bucketed_in_memory(d, lh)
    assert [a[i] for i in d_rows] == [b[i] for i in l_rows]
    assert set(a[i] for i in d_rows) == set(a) & set(b)
    for side in ("d", "l"):  # no item file is left, only the finished buckets' results
        assert sorted(p.name for p in (tmp_path / side).iterdir()) == [f"result-{i:05d}.npz" for i in range(5)] + [
            "state.json"]


def _result(path, **arrays):
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


GOOD = {"rows": np.array([1], dtype=np.int64), "meta": np.array([2, 3], dtype=np.int64),
        "digest": np.zeros(32, dtype=np.uint8)}
DAMAGE = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:40]),
    "empty": lambda p: p.write_bytes(b""),
    "garbage": lambda p: p.write_bytes(b"not an npz" * 9),
    "a folder": lambda p: (p.unlink(), p.mkdir()),
    "meta 2-d": lambda p: _result(p, **{**GOOD, "meta": np.array([[2, 3], [4, 5]], dtype=np.int64)}),
    "meta floats": lambda p: _result(p, **{**GOOD, "meta": np.array([2.0, 3e30])}),
    "meta negative": lambda p: _result(p, **{**GOOD, "meta": np.array([-2, 3], dtype=np.int64)}),
    "more peer items than the peer has": lambda p: _result(p, **{**GOOD, "meta": np.array([2, 41], dtype=np.int64)}),
    "short digest": lambda p: _result(p, **{**GOOD, "digest": np.zeros(3, dtype=np.uint8)}),
    "no digest": lambda p: _result(p, rows=GOOD["rows"], meta=GOOD["meta"]),
    "a row out of range": lambda p: _result(p, **{**GOOD, "rows": np.array([50], dtype=np.int64)}),
    "a negative row": lambda p: _result(p, **{**GOOD, "rows": np.array([-1], dtype=np.int64)}),
    "more rows than items": lambda p: _result(p, **{**GOOD, "rows": np.arange(3, dtype=np.int64)}),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_result_file_is_not_a_finished_bucket(tmp_path, damage):
    """A result file a restarted node cannot trust ends the finished prefix there (that bucket is exchanged again):
    no crash, and never rows the node did not compute."""
    items = encode_ids([f"id-{i}" for i in range(50)])
    spill = SpillBuckets(items, tmp_path / "pair", binding=BINDING)
    spill.partition(bucket_key("run", bytes(16)), 4, peer_n_items=40)
    for b in range(3):
        spill.commit(b, np.array([b], dtype=np.int64), DONE)
    DAMAGE[damage](tmp_path / "pair" / "result-00001.npz")
    earlier = SpillBuckets(items, tmp_path / "pair", binding=BINDING).earlier()
    assert earlier is not None and earlier.finished == (DONE,)


@pytest.mark.parametrize("field, value", [("k", 2**70), ("k", 65_537), ("k", 0), ("k", True), ("k", "4"),
                                          ("peer_n_items", 2**70), ("peer_n_items", -1), ("peer_n_items", 1.5)])
def test_a_state_file_out_of_range_is_no_earlier_run(tmp_path, field, value):
    items = encode_ids([f"id-{i}" for i in range(50)])
    spill = SpillBuckets(items, tmp_path / "pair", binding=BINDING)
    spill.partition(bucket_key("run", bytes(16)), 4, peer_n_items=40)
    spill.commit(0, np.array([0], dtype=np.int64), DONE)
    state = tmp_path / "pair" / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), field: value}))
    assert SpillBuckets(items, tmp_path / "pair", binding=BINDING).earlier() is None
    state.write_bytes(b"\xff{not json")
    assert SpillBuckets(items, tmp_path / "pair", binding=BINDING).earlier() is None


@pytest.mark.parametrize("role", ["label_holder", "data_holder"])
def test_a_spill_folder_that_cannot_be_written_ends_the_pair_at_once(tmp_path, role):
    """A bucket source that fails on the disk (here a file where the pair's folder goes) is no peer's fault and no
    bug to answer and carry on from: the pair ends with ERROR INTERNAL naming the cause, so both nodes exit at once
    instead of waiting for a PSI that cannot go on (or for the progress timeout)."""
    from vfl.protocol import PsiStart
    from vfl.protocol.errors import ErrorCode, RemoteProtocolError
    from vfl.protocol.psi_phase import PairwisePsi, PsiPlan

    (tmp_path / "blocked").write_text("in the way")
    items = encode_ids(range(100))
    with PsiEngine(workers=1) as engine:
        plan = PsiPlan(items=items, engine=engine, chunk_size=16, buckets=4,
                       source=lambda nonce, peer: SpillBuckets(items, tmp_path / "blocked" / "pair", binding=BINDING))
        psi = PairwisePsi(plan, run="r", nonce="00" * 16, role=role)
        start = PsiStart(n_items=100, chunk_size=16, buckets=4) if role == "data_holder" else PsiStart(
            n_items=100, chunk_size=16)
        if role == "data_holder":
            psi.start()
        with pytest.raises(RemoteProtocolError, match="cannot write or read its PSI spill files") as exc:
            psi.receive(start)
    assert exc.value.code is ErrorCode.INTERNAL and str(tmp_path) not in str(exc.value)  # the path stays local


def _bank_config(tmp_path):
    from vfl.node.config import load_config

    from .test_psi_nodes import psi_session

    configs = psi_session(tmp_path, {"bank": ["a", "b"], "dh1": ["b"]}, psi={"buckets": 4})
    return load_config(configs["bank"])


def test_a_spill_folder_touches_only_its_own_pair_folders_never_what_a_link_points_at(tmp_path):
    """The node deletes and writes files in its spill folder, so it must not reach outside it: a pair folder that is
    a symbolic link goes as a link (what it points at stays), a folder not named like a pair is no pair (the scans
    leave it), and a party folder the user linked to another disk loses only the node's pair folders."""
    from vfl.node.spill import pair_tag, remove_spill, scan_spill, spill_folder, spill_source

    cfg = _bank_config(tmp_path)
    items = encode_ids(range(50))
    digest = items_digest(items, False)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "notes").mkdir(parents=True)
    (elsewhere / "keep.txt").write_text("mine")
    base = spill_folder(cfg)
    base.mkdir(parents=True)
    (base / "my-folder").mkdir()
    (base / pair_tag("11" * 16)).symlink_to(elsewhere)  # a pair folder that is a link: the link goes, not its target
    assert scan_spill(cfg, digest) == {}
    assert (base / "my-folder").is_dir() and not (base / pair_tag("11" * 16)).exists()
    (base / pair_tag("22" * 16)).symlink_to(elsewhere)
    spill = spill_source(cfg, items, digest, unique_rows=None)("22" * 16, "dh1")
    assert spill.earlier() is None  # nothing is resumed from a link
    spill.partition(bucket_key("run", bytes(16)), 4, peer_n_items=10)
    assert not spill.folder.is_symlink() and (elsewhere / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep.txt", "notes"]

    # the party folder itself on another disk, by a link: the alignment removes the pair folders there, nothing else
    remove_spill(cfg)
    base.parent.mkdir(exist_ok=True)
    base.symlink_to(elsewhere)
    spill = spill_source(cfg, items, digest, unique_rows=None)("33" * 16, "dh1")
    spill.partition(bucket_key("run", bytes(16)), 4, peer_n_items=10)
    assert (elsewhere / pair_tag("33" * 16) / "state.json").exists()
    remove_spill(cfg)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep.txt", "notes"]
