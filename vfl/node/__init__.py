"""The node process: configuration, keys, ZeroMQ transport and the loop that drives the protocol machines."""

from .config import ConfigError, NodeConfig, load_config
from .keys import KeyFileError, generate_keypair, load_public_key, load_secret_key
from .runner import NodeRunner

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
