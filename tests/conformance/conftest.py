"""Fixtures of the conformance kit: the node under test (bundled or external) and per-test raw peers."""

from __future__ import annotations

import time

import pytest
import zmq

from .kit import Kit
from .peer import Peer, config_digest, routing_id
from .target import (
    Target,
    build_external,
    build_local,
    node_command,
    start_node,
    start_own_node,
    stop_node,
    wait_ready,
)


@pytest.fixture(scope="session")
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def _sigterm_check(target: Target, ctx: zmq.Context) -> list[str]:
    """Stop the bundled node with SIGTERM: a READY peer gets BYE {ok: false, reason}, and the node exits 0."""
    problems = []
    proc = target.proc
    if proc.poll() is not None:
        return [f"the node had already exited with {proc.returncode} before the kit stopped it\n{target.log_tail()}"]
    key = target.key("probe")
    p = Peer(ctx, target.address, server_public=target.server_public, public=key.public, secret=key.secret,
             routing_id=routing_id(key.name), limits=target.limits, label="sigterm-probe")
    try:
        p.send("HELLO", {"version": [1, 0], "role": "data_holder", "party": key.name, "run": target.run,
                         "config": target.session, "digest": config_digest(target.session)})
        w = p.recv_app(5.0)
        if w is None or w.type != "WELCOME":
            problems.append(f"no WELCOME before SIGTERM: {w and w.summary()}")
        rc = stop_node(proc, grace=10.0)
        bye = p.recv_app(1.0)
        if bye is None or bye.type != "BYE" or bye.get("ok") is not False or type(bye.get("reason")) is not str:
            problems.append(f"on SIGTERM a READY data holder must get BYE {{ok: false, reason}}; got "
                            f"{bye.summary() if bye else 'nothing'}")
        if rc is None:
            problems.append("the node did not exit within 10 s of SIGTERM (killed)")
        elif rc != 0:
            problems.append(f"the node exited with {rc} on SIGTERM, expected 0\n{target.log_tail()}")
        problems.extend(p.violations)
    finally:
        p.close()
    return problems


@pytest.fixture(scope="session")
def target(request, tmp_path_factory, ctx):
    opts = request.config.option
    if opts.target:
        t = build_external(opts)
        try:
            wait_ready(t, ctx, timeout=10.0)
        except RuntimeError as exc:
            pytest.exit(f"the --target does not complete a handshake: {exc}", returncode=3)
        yield t
        return
    workdir = tmp_path_factory.mktemp("vfl-node")
    last_error = None
    for _attempt in range(3):  # the free port may be taken between choosing and binding it
        t = build_local(workdir, opts.node_cmd)
        t.proc = start_node(node_command(opts.node_cmd, workdir / "node.toml"), t.log_path, workdir)
        try:
            wait_ready(t, ctx)
            break
        except RuntimeError as exc:
            last_error = exc
            stop_node(t.proc, grace=2.0)
    else:
        pytest.exit(f"could not start the bundled node: {last_error}", returncode=3)
    try:
        yield t
    finally:
        if t.proc.poll() is None:
            problems = _sigterm_check(t, ctx)
        else:
            problems = [f"the node had exited with {t.proc.returncode} before the end of the kit\n{t.log_tail()}"]
        if problems:
            pytest.fail("at the end of the kit (SIGTERM of the bundled node):\n  " + "\n  ".join(problems),
                        pytrace=False)


@pytest.fixture
def local_target(target):
    if target.external:
        pytest.skip("needs the node's process (only with the bundled node, not with --target)")
    return target


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    setattr(item, f"_kit_rep_{rep.when}", rep)
    return rep


@pytest.fixture
def kit(request, target, ctx):
    """Per test: raw peers (BYE'd and closed afterwards), a check of every message the node sent, and, if the test
    passed, a final health check ([R1]: the node is alive and a valid peer completes HELLO/WELCOME + ECHO)."""
    k = Kit(target, ctx, answer_timeout=request.config.option.kit_timeout)
    yield k
    violations = k.finish()
    assert not violations, "the node sent messages that break PROTOCOL.md:\n  " + "\n  ".join(violations)
    rep = getattr(request.node, "_kit_rep_call", None)
    if rep is not None and rep.passed:
        try:
            k.assert_healthy(f"after {request.node.name}")
        finally:
            assert not k.finish()


@pytest.fixture
def own_node(request, tmp_path, ctx, target):
    """Factory: ``own_node(data_holders=[...], ...)`` starts a label holder of the test's own (target.start_own_node)
    and returns a Kit for it; the node is stopped and its peers closed at the end of the test. Needs the node's
    command: the bundled node, or --node-cmd."""
    opts = request.config.option
    if target.external and not opts.node_cmd:
        pytest.skip("starts a label holder of its own: give --node-cmd to test another implementation")
    kits: list[Kit] = []

    def start(**kw) -> Kit:
        t = start_own_node(tmp_path / f"node{len(kits)}", opts.node_cmd, ctx, **kw)
        k = Kit(t, ctx, answer_timeout=opts.kit_timeout)
        kits.append(k)
        return k

    yield start
    for k in kits:
        for p in k.peers:
            p.close()
        stop_node(k.target.proc, grace=5.0)


@pytest.fixture
def seed(request):
    return request.config.option.kit_seed


def pytest_report_header(config):
    if config.option.target:
        return f"vfl conformance kit: external target {config.option.target}"
    return "vfl conformance kit: bundled label holder (python -m vfl node)"


@pytest.fixture(autouse=True)
def _node_alive_after(request, target, ctx):
    """Every test leaves the node alive ([R1]). If the bundled node died, the test fails with its exit code and
    log, and the kit restarts the node (same config) so that the remaining tests still tell something."""
    dead = target.alive() or target.dead_reason
    if dead:
        pytest.fail(f"the node is dead before {request.node.name} (and the kit cannot restart it): {dead}",
                    pytrace=False)
    yield
    if target.external:
        rep = getattr(request.node, "_kit_rep_call", None)
        if rep is not None and rep.failed:
            try:  # an external node that crashed would make every further test wait for its timeouts
                wait_ready(target, ctx, timeout=3.0)
            except RuntimeError:
                target.dead_reason = f"the target stopped answering a valid HELLO after {request.node.name}"
                pytest.fail(f"[R1] {target.dead_reason}", pytrace=False)
        return
    if target.proc is not None and target.proc.poll() is None:
        time.sleep(0.01)
    dead = target.alive()
    if dead:
        rc = target.proc.returncode
        log_tail = target.log_tail(15)
        with open(target.log_path, "ab") as f:
            f.write(f"\n===== conformance kit: node exited with {rc} during {request.node.name}; restarting =====\n"
                    .encode())
        target.proc = start_node(node_command(request.config.option.node_cmd, target.workdir / "node.toml"),
                                 target.log_path, target.workdir)
        try:
            wait_ready(target, ctx, timeout=30.0)
        except RuntimeError as exc:
            pytest.fail(f"[R1] the node died during {request.node.name} (exit code {rc}) and did not restart: {exc}",
                        pytrace=False)
        pytest.fail(f"[R1] the node died during {request.node.name} (exit code {rc}); the kit restarted it. "
                    f"Log tail:\n{log_tail}", pytrace=False)
