"""Cross-check against an independent implementation: openmined-psi (C++, P-256), when installed."""

from __future__ import annotations

import random

import pytest

from vfl.psi.engine import encode_ids
from vfl.psi.exchange import PsiReceiver, PsiSender, run_in_memory

psi = pytest.importorskip("private_set_intersection.python")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_same_intersection_as_openmined(engine, seed):
    rnd = random.Random(seed)
    universe = [f"id-{rnd.getrandbits(40)}" for _ in range(300)] + ["é", "🦜", "x" * 500, ""]
    universe = list(dict.fromkeys(universe))
    client_ids = [u for u in universe if rnd.random() < 0.6]
    server_ids = [u for u in universe if rnd.random() < 0.5]

    client = psi.client.CreateWithNewKey(True)
    server = psi.server.CreateWithNewKey(True)
    setup = server.CreateSetupMessage(1e-9, len(client_ids), server_ids, psi.DataStructure.RAW)
    response = server.ProcessRequest(client.CreateRequest(client_ids))
    theirs = {client_ids[i] for i in client.GetIntersection(setup, response)}

    s = PsiSender(encode_ids(client_ids), engine=engine, run_id="om", nonce=b"x", chunk_size=64)
    r = PsiReceiver(encode_ids(server_ids), engine=engine, run_id="om", nonce=b"x", chunk_size=50)
    run_in_memory(s, r)
    ours = [client_ids[i] for i in s.rows.tolist()]
    assert set(ours) == theirs == set(client_ids) & set(server_ids)
    assert [server_ids[i] for i in r.rows.tolist()] == ours
