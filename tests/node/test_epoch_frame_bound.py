"""[B1] with E: a data holder's frame bound fits an EPOCH over its own rows. Before, libzmq dropped the connection
of a data holder of more than 4.2M rows at its first EPOCH (its order: 8 bytes per training row, one tensor), and
the data holder rejoined and ran its PSI again. Real libzmq sockets on 127.0.0.1 with the node's options."""

from __future__ import annotations

import numpy as np
import zmq

from vfl.node import load_config
from vfl.node.transport import FRAME_LIMIT_FLOOR, frame_limit, socket_options
from vfl.protocol import Epoch, Tensor, decode, encode

from .test_training_nodes import training_session

ROWS = 5_000_000  # an EPOCH of 40 MB: over the 32 MiB bound of a session with PSI


def configs(tmp_path):
    paths, _ = training_session(tmp_path, window=1)
    return {name: load_config(path) for name, path in paths.items()}


def test_B1_a_training_data_holders_frame_bound_fits_an_epoch_over_its_own_rows(tmp_path):
    cfg = configs(tmp_path)
    header = cfg["dh1"].limits.max_header_bytes
    assert frame_limit(cfg["dh1"], ROWS) == 8 * ROWS + header
    assert frame_limit(cfg["dh1"], 1000) == frame_limit(cfg["dh1"]) >= FRAME_LIMIT_FLOOR  # small tables: as before
    assert frame_limit(cfg["bank"], ROWS) == frame_limit(cfg["bank"])  # a label holder receives no EPOCH
    huge = 10**9  # never above what [limits] allows
    assert frame_limit(cfg["dh1"], huge) == cfg["dh1"].limits.max_frame_bytes


def send_epoch(options: dict[str, int], order: np.ndarray, wait_s: float = 10.0) -> list | None:
    """One EPOCH from a ROUTER (the label holder's side) to a DEALER with ``options``; what arrives in ``wait_s``."""
    ctx = zmq.Context()
    try:
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer = ctx.socket(zmq.DEALER)
        for name, value in options.items():
            dealer.setsockopt(getattr(zmq, name), value)
        dealer.setsockopt(zmq.ROUTING_ID, b"dh1")
        dealer.connect(f"tcp://127.0.0.1:{port}")
        dealer.send(b"hi")
        assert router.poll(10_000), "no connection"
        route, _ = router.recv_multipart()
        router.send_multipart([route, *encode(Epoch(epoch=0, first_step=0, tensors=(Tensor("order", order),)))],
                              copy=False)
        if not dealer.poll(int(wait_s * 1000)):
            return None
        return dealer.recv_multipart()
    finally:
        ctx.destroy(linger=0)


def test_B1_an_epoch_of_5M_rows_reaches_a_data_holder_of_5M_rows(tmp_path):
    cfg = configs(tmp_path)["dh1"]
    order = np.random.default_rng(0).permutation(ROWS).astype(np.int64)
    got = send_epoch(socket_options(cfg, ROWS), order)
    assert got is not None
    msg = decode(got, cfg.limits)
    assert isinstance(msg, Epoch) and np.array_equal(msg.tensors[0].array, order)
    assert send_epoch(socket_options(cfg), order, wait_s=3.0) is None  # the old bound: libzmq drops the connection instead
