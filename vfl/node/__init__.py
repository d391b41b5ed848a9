"""The node process: configuration, keys, ZeroMQ transport and the loop that drives the protocol machines."""

from .config import ConfigError, NodeConfig, load_config
from .keys import KeyFileError, generate_keypair, load_public_key, load_secret_key

__all__ = [
    "ConfigError",
    "KeyFileError",
    "NodeConfig",
    "NodeRunner",
    "generate_keypair",
    "load_config",
    "load_public_key",
    "load_secret_key",
]


def __getattr__(name: str):
    """``NodeRunner`` loads on first use: importing the config or key helpers (``vfl demo``, ``vfl keys``) must not
    pull in the transport, the protocol machines, the PSI engine and pyarrow."""
    if name == "NodeRunner":
        from .runner import NodeRunner

        return NodeRunner
    raise AttributeError(f"module 'vfl.node' has no attribute {name!r}")
