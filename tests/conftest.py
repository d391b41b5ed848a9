"""Command-line options shared by the test suites (the conformance kit uses them to pick its target)."""


def pytest_addoption(parser):
    g = parser.getgroup("vfl conformance kit", "run tests/conformance against a label holder")
    g.addoption("--target", default=None, metavar="tcp://HOST:PORT",
                help="test an already running label holder at this endpoint instead of starting the bundled node")
    g.addoption("--target-key", default=None, metavar="SERVER.key",
                help="the target label holder's public key file (zmq.auth certificate)")
    g.addoption("--client-key", action="append", default=[], metavar="PARTY.key_secret",
                help="secret key file of a data holder allow-listed at the target (repeatable, pairs with --party)")
    g.addoption("--party", action="append", default=[], metavar="NAME",
                help="party id of the matching --client-key (repeatable)")
    g.addoption("--session", default=None, metavar="SESSION.toml",
                help="the target's session config: a node config file (run, party, [session], [limits], "
                     "[timeouts]) or a bare [session] table plus a top-level run")
    g.addoption("--run", default=None, help="the target's run id, if the --session file has none")
    g.addoption("--node-cmd", default=None, metavar="CMD",
                help="command that starts a label holder from a config file, '{config}' is replaced by its path "
                     "(default: python -m vfl node --config {config})")
    g.addoption("--kit-seed", type=int, default=20240611, help="seed of the conformance flood generator")
    g.addoption("--kit-timeout", type=float, default=3.0,
                help="seconds to wait for an answer that the spec says must come")
