"""Write a ready-to-run set of node configs and keys into a folder (used by ``vfl demo``).

Everything a node needs lives in the folder with relative paths, so the folder can be copied to other hosts: give
each host its own ``.toml``, its own ``.key_secret`` and the partners' ``.key`` files, and change ``endpoint``.
"""

from __future__ import annotations

import socket
from pathlib import Path

from ..files import atomic_write_text
from ..node.keys import generate_keypair

LABEL_HOLDER = "bank"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host`` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _table(name: str, values: dict) -> str:
    return f"[{name}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items())


def prepare_session(
    out: Path,
    *,
    data_holders: list[str],
    run: str = "demo",
    port: int | None = None,
    cut_width: int = 16,
    batch_size: int = 64,
    window: int = 2,
    model: str = "demo-mlp-v1",
    timeouts: dict | None = None,
    link_check: dict | None = None,
    data: dict[str, dict] | None = None,
    psi: dict | None = None,
    limits: dict | None = None,
    insecure: bool = False,
    tables: dict[str, dict[str, dict]] | None = None,
    cut_widths: dict[str, int] | None = None,
) -> dict[str, Path]:
    """Keys in ``out/keys`` and one ``NAME.toml`` per node; returns {party: config path}, label holder first.

    ``data`` maps a party to its ``[data]`` table (path relative to ``out``, id_column); giving it turns PSI on.
    ``psi`` and ``limits`` are ``[psi]`` and ``[limits]`` tables written for every node. ``tables`` adds per-party
    tables ({party: {"model": {...}, "train": {...}}}); a ``train`` table anywhere turns training on. ``data`` entries
    may carry more ``[data]`` keys (features, label_column, standardize).
    """
    out.mkdir(parents=True, exist_ok=True)
    keys = out / "keys"
    for name in [LABEL_HOLDER, *data_holders]:
        if not (keys / f"{name}.key_secret").exists():
            generate_keypair(keys, name)
    endpoint = f"tcp://127.0.0.1:{port or free_port()}"
    session_fields = {"batch_size": batch_size, "window": window, "model": model}
    if data:
        session_fields["psi"] = True
    if tables and any("train" in t for t in tables.values()):
        session_fields["train"] = True
    session = _table("session", session_fields)
    widths = cut_widths or {name: cut_width for name in data_holders}
    session += _table("session.cut_widths", {name: widths[name] for name in data_holders})
    common = session + (_table("timeouts", timeouts) if timeouts else "")
    common += _table("limits", limits) if limits else ""
    configs: dict[str, Path] = {}

    def node(name: str, role: str, partners: list[str], extra: str) -> None:
        head = "".join(
            f"{k} = {_toml_value(v)}\n" for k, v in {"role": role, "party": name, "run": run, "endpoint": endpoint}.items()
        )
        text = (
            f"# vfl node config for {role.replace('_', ' ')} {name!r}; run it with: vfl node --config {name}.toml\n"
            + head
            + "\n"
            + _table("keys", {"secret": f"keys/{name}.key_secret", **({"insecure": True} if insecure else {})})
            + _table("keys.partners", {p: f"keys/{p}.key" for p in partners})
            + "\n"
            + common
            + (_table("data", data[name]) if data else "")
            + (_table("psi", {**(psi or {}), "output": f"{name}-aligned.csv"}) if data else "")
            + "".join(_table(section, values) for section, values in ((tables or {}).get(name) or {}).items())
            + extra
        )
        path = out / f"{name}.toml"
        atomic_write_text(path, text)
        configs[name] = path

    node(LABEL_HOLDER, "label_holder", data_holders, "")
    for name in data_holders:
        node(name, "data_holder", [LABEL_HOLDER], _table("link_check", link_check) if link_check else "")
    return configs
