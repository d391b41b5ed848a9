"""Write a ready-to-run set of node configs and keys into a folder (used by ``vfl demo``).

Everything a node needs lives in the folder with relative paths, so the folder can be copied to other hosts: give
each host its own ``.toml``, its own ``.key_secret`` and the partners' ``.key`` files, and change ``endpoint``.
"""

from __future__ import annotations

import socket
from pathlib import Path

from ..files import atomic_write_text
from ..node.keys import generate_keypair
from ..protocol.chain import Chain, Segment
from ..train.specs import fingerprint

LABEL_HOLDER = "bank"


def model_name(prefix: str, tables: dict, widths: dict[str, int], segments: dict[str, dict] | None = None) -> str:
    """A session's ``model`` for generated configs: ``prefix-`` and a fingerprint of every party's tables (a segment
    holder's too) and, in a chain, the topology, so nodes prepared for different networks are refused at HELLO
    instead of training a mismatch. Without segments it is the fingerprint two-tier configs always had."""
    shape = {"tables": tables, "widths": widths, **({"segments": segments} if segments else {})}
    return f"{prefix}-" + fingerprint(shape)[:16]


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


# One line above each key, for configs a user reads and edits (``vfl init``). Above the key, not after it: a line
# ``key = value`` stays exactly that, so editing it (by hand or with a script) is a plain text replacement.
COMMENTS = {
    "role": "label_holder: holds the labels and binds the endpoint; data_holder: holds features and connects",
    "party": "this node's party id, as its partners list it under [keys.partners]",
    "run": "the run id: the same at every node of this run",
    "endpoint": "the label holder binds here, data holders connect here (on other hosts: the label holder's address)",
    "bind": "segment holder: its inputs connect here (on other hosts: an address they can reach)",
    "keys": "CurveZMQ: every message is encrypted and only the listed partners' keys may connect",
    "keys.secret": "this node's secret key (paths are relative to this file); keep it on this node only",
    "keys.insecure": "no encryption, no authentication: debugging on one machine only",
    "keys.partners": "public keys: the label holder lists every data holder's, a data holder the label holder's",
    "keys.partners.*": "this partner's public key file (the NAME.key it gave you)",
    "session": "must be identical at every node, or the label holder refuses the data holder, listing the differences",
    "session.batch_size": "rows per micro-batch",
    "session.window": "micro-batches a data holder may have in flight: 1 is synchronous SGD and gives the same\n"
                      "result every run; more is faster, but the result then varies a little from run to run",
    "session.model": "a name for the architecture every party agreed on",
    "session.psi": "align the rows first with a private set intersection of the ID columns",
    "session.train": "then train the split network on the aligned rows",
    "session.cut_widths": "each data holder's cut-layer width: the last width of its [model].bottom",
    "session.cut_widths.*": "this data holder's cut-layer width",
    "data": "this party's own table; it never leaves this node",
    "data.path": "CSV (header row), Parquet or .npz; relative to this file",
    "data.id_column": "the column with the IDs the parties share (text or integers, one row per ID)",
    "data.label_column": "the label column (label holder only)",
    "data.features": "feature columns; [] for none (default when left out: every column but the ID and label)",
    "data.standardize": "centre and scale each feature on this party's training rows (saved with the model)",
    "psi": "private set intersection",
    "psi.workers": "processes for the PSI's elliptic-curve work; 0 = every core",
    "psi.output": "this party's shared IDs in the agreed order (written at every run)",
    "model": "this party's part of the split network",
    "model.bottom": "this party's bottom MLP: hidden widths, then the cut width; its output goes to the label holder",
    "model.segment": "a segment holder's MLP on its inputs' combined cut layers; its last width is its output",
    "model.top": "the label holder's top MLP on the combined cut layers; its last width is the number of outputs",
    "model.seed": "seed of this segment's initial weights",
    "train": "training: the label holder sets the task and schedule, every party its own optimizer",
    "train.task": "binary, multiclass or regression",
    "train.epochs": "passes over the training rows",
    "train.validation_fraction": "share of the aligned rows held out for validation metrics",
    "train.seed": "seed of the train/validation split and every epoch's order",
    "train.optimizer": "this party's optimizer (adam: lr, betas, eps, weight_decay; sgd: lr, momentum, ...)",
    "train.output": "folder for this party's trained segment, checkpoints/ and (label holder) metrics.jsonl",
    "privacy": "the training's label-leakage defence: the same at every node (it is in the session config)",
    "privacy.defence": "none, max_norm, marvell (binary), label_dp or gradient_noise; see PRIVACY.md",
    "privacy.sumkl": "marvell's privacy budget: smaller is more private (more noise)",
    "privacy.epsilon": "label_dp: randomized response at this epsilon (smaller flips more labels)",
    "privacy.clip": "gradient_noise: each row's gradient is clipped to this L2 norm",
    "privacy.sigma": "gradient_noise: Gaussian noise of standard deviation sigma * clip is added",
    "privacy.audit": "label holder: measure each epoch what every data holder could infer from its gradients",
    "link_check": "ECHO round trips after joining",
    "link_check.rounds": "0 = skip the check",
}


#: the lines that say something else in a chain (a session with segment holders); the rest are :data:`COMMENTS`
CHAIN_COMMENTS = {
    **COMMENTS,
    "role": "label_holder: holds the labels and binds the endpoint; data_holder: holds features; segment_holder:\n"
            "holds a model segment only, binds for its inputs; each non-label holder connects to its downstream",
    "endpoint": "the label holder binds here; any other node connects here to its downstream: the segment holder it\n"
                "feeds ([session.segments]: its bind) or the label holder (on other hosts: that node's address)",
    "keys.partners": "public keys: the label holder lists every party's; a segment holder its inputs', its\n"
                     "downstream's and the label holder's; a data holder its downstream's and the label holder's",
    "session.segments.*": "a segment holder: its inputs, its output width and how it combines its inputs",
    "model.bottom": "this party's bottom MLP: hidden widths, then the cut width; its output goes to its downstream",
    "session.segments.*.inputs": "the parties feeding this segment holder; their cut layers are combined in this order",
    "session.segments.*.width": "this segment holder's output width: the last width of its [model].segment",
    "session.segments.*.combine": "concat (widths add up) or sum (equal widths)",
}


def _table(name: str, values: dict, comments: bool = False, notes: dict = COMMENTS) -> str:
    """A TOML table; with ``comments``, each key (and the table) gets its line of ``notes`` above it (a key of
    ``[a.b.NAME]`` the line of ``a.b.*.key``, as the tables of every segment holder share theirs)."""

    def note(key: str) -> str:
        return _comment(key, notes) if comments else ""

    parts = name.split(".")
    wild = ".".join([*parts[:2], "*"]) if len(parts) == 3 else None  # a.b.NAME -> a.b.*

    def key_note(k: str) -> str:
        return next((c for c in (f"{name}.{k}", f"{wild}.{k}") if c in notes), f"{name}.*")

    head = name if name in notes or wild not in notes else wild
    return ("\n" if comments and "." not in name else "") + note(head) + f"[{name}]\n" + "".join(
        note(key_note(k)) + f"{k} = {_toml_value(v)}\n" for k, v in values.items()
    )


def _comment(key: str, notes: dict = COMMENTS) -> str:
    """The ``notes`` line(s) of ``key`` as TOML comments (``\\n`` in a comment starts another line)."""
    return "".join(f"# {line}\n" for line in notes[key].split("\n")) if key in notes else ""


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
    label_holder: str = LABEL_HOLDER,
    comments: bool = False,
    privacy: dict | None = None,
    audit: bool | None = None,
    segments: dict[str, dict] | None = None,
) -> dict[str, Path]:
    """Keys in ``out/keys`` and one ``NAME.toml`` per node; returns {party: config path}, label holder first.

    ``data`` maps a party to its ``[data]`` table (path relative to ``out``, id_column); giving it turns PSI on.
    ``psi`` and ``limits`` are ``[psi]`` and ``[limits]`` tables written for every node. ``tables`` adds per-party
    tables ({party: {"model": {...}, "train": {...}}}); a ``train`` table anywhere turns training on. ``data`` entries
    may carry more ``[data]`` keys (features, label_column, standardize). ``comments``: a line above every key
    saying what it does (``vfl init``, for configs a user reads). ``privacy``: the ``[privacy]`` table (defence and
    its parameters), written into EVERY node's config, since it is part of the session config every party must
    agree on; ``audit``: the label holder's ``[privacy].audit`` (left out: the default, on).

    ``segments`` (a chain, PROTOCOL.md section 13): {segment holder: {"inputs": [...], "width": N, "combine":
    "concat"}}. Every node's session config gets the ``[session.segments.NAME]`` tables; each segment holder its own
    ``bind`` port, and every data holder and segment holder the address of its downstream as ``endpoint``. The
    result lists the label holder, then the segment holders nearest to it first, then the data holders: the order
    to start them in.
    """
    out.mkdir(parents=True, exist_ok=True)
    segments = {name: {"inputs": list(spec["inputs"]), "width": spec["width"], "combine": spec.get("combine", "concat")}
                for name, spec in (segments or {}).items()}
    keys = out / "keys"
    for name in [label_holder, *segments, *data_holders]:
        if not (keys / f"{name}.key_secret").exists():
            generate_keypair(keys, name)
    address = _addresses(label_holder, segments, port)
    endpoint = address[label_holder]
    notes = CHAIN_COMMENTS if segments else COMMENTS
    session_fields = {"batch_size": batch_size, "window": window, "model": model}
    if data:
        session_fields["psi"] = True
    if tables and any("train" in t for t in tables.values()):
        session_fields["train"] = True
    session = _table("session", session_fields, comments, notes)
    widths = cut_widths or {name: cut_width for name in data_holders}
    session += _table("session.cut_widths", {name: widths[name] for name in data_holders}, comments, notes)
    if segments:
        session += "".join(_table(f"session.segments.{name}", spec, comments, notes) for name, spec in segments.items())
    chain = Chain(widths, {name: Segment(tuple(spec["inputs"]), spec["width"], spec["combine"])
                           for name, spec in segments.items()})
    common = session + (_table("timeouts", timeouts, comments, notes) if timeouts else "")
    common += _table("limits", limits, comments, notes) if limits else ""
    configs: dict[str, Path] = {}

    def privacy_table(is_label_holder: bool) -> str:
        values = dict(privacy or {})
        if is_label_holder and audit is not None:
            values["audit"] = audit
        return _table("privacy", values, comments, notes) if values else ""

    def node(name: str, role: str, partners: list[str], extra: str) -> None:
        where = {"endpoint": endpoint if role == "label_holder" else address[chain.downstream(name) or label_holder]}
        if role == "segment_holder":
            where["bind"] = address[name]
        head = "".join(
            (_comment(k, notes) if comments else "") + f"{k} = {_toml_value(v)}\n"
            for k, v in {"role": role, "party": name, "run": run, **where}.items()
        )
        keys = {"secret": f"keys/{name}.key_secret", **({"insecure": True} if insecure else {})}
        text = (
            f"# vfl node config for {role.replace('_', ' ')} {name!r}; run it with: vfl node --config {name}.toml\n"
            + head
            + ("" if comments else "\n")  # a commented table starts with its own blank line
            + _table("keys", keys, comments, notes)
            + _table("keys.partners", {p: f"keys/{p}.key" for p in partners}, comments, notes)
            + ("" if comments else "\n")
            + common
            + (_table("data", data[name], comments, notes) if data and role != "segment_holder" else "")
            + (_table("psi", {**(psi or {}), "output": f"{name}-aligned.csv"}, comments, notes)
               if data and role != "segment_holder" else "")
            + "".join(_table(section, values, comments, notes)
                      for section, values in ((tables or {}).get(name) or {}).items())
            + privacy_table(role == "label_holder")
            + extra
        )
        path = out / f"{name}.toml"
        atomic_write_text(path, text)
        configs[name] = path

    link = _table("link_check", link_check, comments, notes) if link_check else ""
    node(label_holder, "label_holder", [*data_holders, *segments], "")
    for name in sorted(segments, key=lambda s: (chain.depth(s), list(segments).index(s))):
        node(name, "segment_holder", _partners(chain, name, label_holder), link)
    for name in data_holders:
        node(name, "data_holder", _partners(chain, name, label_holder), link)
    return configs


def _addresses(label_holder: str, segments: dict, port: int | None) -> dict[str, str]:
    """Where each binding node listens: the label holder on ``port`` (else a free one), each segment holder on a
    free port of its own (distinct: the OS may hand out a port it just handed out, once that socket is closed)."""
    ports = [port or free_port()]
    while len(ports) < 1 + len(segments):
        candidate = free_port()
        if candidate not in ports:
            ports.append(candidate)
    return {name: f"tcp://127.0.0.1:{p}" for name, p in zip([label_holder, *segments], ports)}


def _partners(chain: Chain, party: str, label_holder: str) -> list[str]:
    """The public keys a data holder or segment holder lists: a segment holder's inputs (its allow-list), its
    downstream segment holder (the CURVE server it connects to), and the label holder (its session's end, the key
    that authenticates a relayed session end to end), in that order."""
    inputs = list(chain.inputs(party)) if party in chain.segments else []
    downstream = chain.downstream(party)
    return [*inputs, *([downstream] if downstream is not None else []), label_holder]
