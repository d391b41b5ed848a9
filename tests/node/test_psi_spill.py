"""The node's bucket source: each bucket's items in their own 0600 file, one bucket in memory at a time."""

from __future__ import annotations

import stat

import numpy as np

from vfl.node.alignment import SpillBuckets
from vfl.psi import PsiEngine, encode_ids
from vfl.psi.buckets import BucketedReceiver, BucketedSender, MemoryBuckets, bucket_key, run_bucketed_in_memory


def test_spilled_buckets_come_back_as_they_went_and_leave_nothing_behind(tmp_path):
    items = encode_ids([f"id-{i}" for i in range(500)] + ["Zoë", "x" * 300])
    spill = SpillBuckets(items, tmp_path / "pair")
    ref = MemoryBuckets(items)
    key = bucket_key("run", bytes(16))
    assert np.array_equal(spill.partition(key, 7), ref.partition(key, 7))
    files = sorted(p.name for p in (tmp_path / "pair").iterdir())
    assert files == [f"bucket-{b:05d}.npz" for b in range(7)]
    for p in (tmp_path / "pair").iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600  # raw IDs: the owner's only
    assert spill.grouping is None  # the partition lives in the files, not in memory
    for b in range(7):
        got, want = spill.bucket(b), ref.bucket(b)
        assert got[0] == want[0] and np.array_equal(got[1], want[1])
    spill.commit(3, np.array([5, 1], dtype=np.int64))
    assert not (tmp_path / "pair" / "bucket-00003.npz").exists()  # a committed bucket's items are gone
    assert np.load(tmp_path / "pair" / "result-00003.npy").tolist() == [5, 1]
    spill.close()
    assert not (tmp_path / "pair").exists()


def test_a_bucketed_psi_through_spill_files_equals_the_in_memory_one(tmp_path):
    a = encode_ids(range(0, 700))
    b = encode_ids(range(350, 1000))
    with PsiEngine(workers=1) as engine:
        d = BucketedSender(SpillBuckets(a, tmp_path / "d"), engine=engine, run_id="r", nonce=bytes(16),
                           chunk_size=64, buckets=5)
        lh = BucketedReceiver(SpillBuckets(b, tmp_path / "l"), engine=engine, run_id="r", nonce=bytes(16),
                              chunk_size=64, buckets=5)
        d_rows, l_rows = run_bucketed_in_memory(d, lh)
    assert [a[i] for i in d_rows] == [b[i] for i in l_rows]
    assert set(a[i] for i in d_rows) == set(a) & set(b)
    assert not (tmp_path / "d").exists() and not (tmp_path / "l").exists()
