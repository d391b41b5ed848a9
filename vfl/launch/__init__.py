"""Local conveniences: write a session's configs and keys, and start several nodes on this machine."""

from .local import LaunchResult, launch
from .prepare import prepare_session

__all__ = ["LaunchResult", "launch", "prepare_session"]
