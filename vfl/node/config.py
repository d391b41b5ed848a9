"""Node configuration: one TOML file per node, checked completely before any network activity.

Every problem is one line naming the file and the key (``node.toml: [session].batch_size must be an integer >= 1``),
so a user fixes it without reading a traceback. Relative paths are relative to the config file's folder, so a run
folder can be moved or copied to another host as a whole.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..protocol import DTYPES, Limits, SessionConfig
from ..errors import SetupError
from ..privacy.spec import PrivacyError, PrivacySpec
from ..protocol.label_holder import DEFAULT_MAX_REJOINS
from ..protocol.chain import segments_from_wire
from ..protocol.messages import is_party_id
from ..protocol.psi_phase import DEFAULT_MAX_PSI_ITEMS
from ..psi.buckets import AUTO as AUTO_BUCKETS
from ..psi.buckets import MAX_BUCKETS, capacity_for

#: [psi].memory_mb when [psi].buckets = "auto" names no budget
DEFAULT_PSI_MEMORY_MB = 1024
from ..protocol.session import DEFAULT_MAX_WINDOW
from ..psi.cluster import check_cluster_address
from ..train.specs import OptimizerSpec

ROLES = ("label_holder", "data_holder", "segment_holder")
ENDPOINT = re.compile(r"tcp://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5}|\*)")


class ConfigError(SetupError):
    """A node config is wrong. ``str(exc)`` is one line meant for the user; the CLI exits 2 with it."""


class TrainingSetupError(SetupError):
    """This party's data and model settings do not fit together. One line for the user.

    Defined here, not in ``training``, so that catching it does not import torch (``vfl psi`` never needs it)."""


@dataclass(frozen=True)
class Timeouts:
    heartbeat: float = 1.0
    peer: float = 30.0
    handshake: float = 60.0
    join: float = 600.0
    progress: float = 600.0
    rejoin: float = 120.0


@dataclass(frozen=True)
class DataSource:
    path: Path
    id_column: str
    features: tuple[str, ...] | None = None  # None: every column but the ID and label columns
    label_column: str | None = None  # label holder only
    standardize: bool = False


@dataclass(frozen=True)
class TrainSettings:
    """[model] and [train]: this party's segment, its optimizer, and (label holder) the task and schedule."""

    bottom: dict | None = None  # MLP spec {widths, activation, dropout} or {factory = "module:function"}
    top: dict | None = None  # label holder only
    segment: dict | None = None  # segment holder only (v1.10): its model segment, the same form as a bottom
    combine: str = "concat"
    seed: int = 0
    task: str | None = None  # label holder: multiclass, binary, regression
    epochs: int = 1
    validation_fraction: float = 0.2
    schedule_seed: int = 0
    optimizer: dict = field(default_factory=lambda: {"kind": "adam", "lr": 0.001})
    threads: int = 1
    output: Path = Path("model")  # load_config resolves it next to the config file
    checkpoint_dir: Path = Path("model/checkpoints")
    checkpoint_every: int = 0  # label holder: steps between checkpoints inside an epoch (0: each epoch's start)
    predictions: Path | None = None  # vfl predict: where the label holder writes predictions.csv
    max_rejoins: int = DEFAULT_MAX_REJOINS  # label holder: rejoins per session (each rolls everyone back)
    keep: str = "last"  # label holder: "best" saves the weights after the epoch with the lowest validation loss
    patience: int = 0  # label holder: stop after this many epochs without a lower validation loss (0: never)


@dataclass(frozen=True)
class PsiSettings:
    chunk_size: int = 65536
    dedupe: bool = False
    min_rows: int = 1
    workers: int = 0  # 0: every core this process may use
    output: Path | None = None
    max_items: int = DEFAULT_MAX_PSI_ITEMS  # the most items a peer may announce for the PSI
    cluster: str | None = None  # a Dask scheduler of this party's own (tcp:// or tls://): None = a local process pool
    #: 1 (one exchange over all items), a fixed bucket count K, or "auto" (K from the set sizes and memory_mb); the
    #: session config carries it as psi_buckets, so every party must say the same
    buckets: int | str = 1
    #: the budget, in MiB, for the items of one open bucket (own + the peer's); 0: none. Setting it means "auto"
    memory_mb: int = 0
    #: where the bucketed PSI spills each bucket's items (0600 files, removed when the PSI is done)
    spill_dir: Path | None = None

    @property
    def capacity(self) -> int | None:
        """The most items (own + the peer's) one bucket may hold, from memory_mb; None without a budget."""
        return capacity_for(self.memory_mb) if self.memory_mb else None


@dataclass(frozen=True)
class LinkCheck:
    rounds: int = 3
    shape: tuple[int, ...] = (128, 256)
    dtype: str = "float32"
    hold: float = 0.0


@dataclass(frozen=True)
class NodeConfig:
    path: Path
    role: str
    party: str
    run: str
    endpoint: str
    secret_key: Path | None
    partners: dict[str, Path]
    insecure: bool
    session: SessionConfig
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    queue_bytes: int = 512 * 2**20
    link_check: LinkCheck = field(default_factory=LinkCheck)
    data: DataSource | None = None
    psi: PsiSettings = field(default_factory=PsiSettings)
    train: TrainSettings | None = None
    #: [privacy].audit (label holder): measure each epoch what every data holder could infer about the labels from
    #: the gradients it was sent (``vfl.privacy.audit``); the defence itself is in ``session.privacy``
    audit: bool = True
    #: segment holder (v1.10): where it binds for its inputs (its ``endpoint`` is its downstream's address)
    bind: str | None = None

    @property
    def is_label_holder(self) -> bool:
        return self.role == "label_holder"

    @property
    def is_segment_holder(self) -> bool:
        return self.role == "segment_holder"

    @property
    def downstream(self) -> str | None:
        """The segment holder this node's FORWARDs go to (None: the label holder), from the session's chain."""
        return None if self.is_label_holder else self.session.chain.downstream(self.party)

    @property
    def server_partner(self) -> str | None:
        """The partner whose CURVE server key this node's DEALER pins: its downstream segment holder, else the
        label holder (the one partner that is no party of the session)."""
        if self.is_label_holder:
            return None
        return self.downstream if self.downstream is not None else self.label_holder_partner

    @property
    def label_holder_partner(self) -> str | None:
        """The label holder's name among [keys.partners]: the one partner that is no party of the session."""
        others = [p for p in self.partners if p not in self.session.parties]
        return others[0] if len(others) == 1 else None


# (type, required, default) per key, per table. The top level and each table reject keys not listed here.
_SCHEMA: dict[str, dict[str, tuple[type | tuple[type, ...], bool, Any]]] = {
    "": {
        "role": (str, True, None),
        "party": (str, True, None),
        "run": (str, True, None),
        "endpoint": (str, True, None),
        "keys": (dict, False, {}),
        "session": (dict, True, None),
        "timeouts": (dict, False, {}),
        "limits": (dict, False, {}),
        "link_check": (dict, False, {}),
        "data": (dict, False, None),
        "psi": (dict, False, {}),
        "model": (dict, False, None),
        "train": (dict, False, None),
        "privacy": (dict, False, None),
        "bind": (str, False, None),
    },
    "data": {
        "path": (str, True, None),
        "id_column": (str, True, None),
        "features": (list, False, None),
        "label_column": (str, False, None),
        "standardize": (bool, False, False),
    },
    "model": {
        "bottom": (dict, False, None),
        "top": (dict, False, None),
        "segment": (dict, False, None),
        "combine": (str, False, "concat"),
        "seed": (int, False, 0),
    },
    "train": {
        "task": (str, False, None),
        "epochs": (int, False, 1),
        "validation_fraction": ((int, float), False, 0.2),
        "seed": (int, False, 0),
        "optimizer": (dict, False, None),
        "threads": (int, False, 1),
        "output": (str, False, "model"),
        "checkpoint_dir": (str, False, None),
        "checkpoint_every": (int, False, 0),
        "max_rejoins": (int, False, DEFAULT_MAX_REJOINS),
        "keep": (str, False, "last"),
        "patience": (int, False, 0),
    },
    "psi": {
        "chunk_size": (int, False, PsiSettings.chunk_size),
        "dedupe": (bool, False, PsiSettings.dedupe),
        "min_rows": (int, False, PsiSettings.min_rows),
        "workers": (int, False, PsiSettings.workers),
        "output": (str, False, None),
        "max_items": (int, False, DEFAULT_MAX_PSI_ITEMS),
        "cluster": (str, False, None),
        "buckets": ((int, str), False, None),
        "memory_mb": (int, False, 0),
    },
    "keys": {"secret": (str, False, None), "partners": (dict, False, {}), "insecure": (bool, False, False)},
    "session": {
        "cut_widths": (dict, True, None),
        "batch_size": (int, True, None),
        "window": ((int, str), True, None),
        "max_window": (int, False, DEFAULT_MAX_WINDOW),
        "model": (str, True, None),
        "psi": (bool, False, False),
        "train": (bool, False, False),
        "activation_precision": (str, False, "float32"),  # v1.6: the cut layer's wire precision, each direction
        "gradient_precision": (str, False, "float32"),
        "segments": (dict, False, None),  # v1.10: segment holders, [session.segments.NAME] inputs/width/combine
    },
    "timeouts": {
        "heartbeat": ((int, float), False, Timeouts.heartbeat),
        "peer": ((int, float), False, Timeouts.peer),
        "handshake": ((int, float), False, Timeouts.handshake),
        "join": ((int, float), False, Timeouts.join),
        "progress": ((int, float), False, Timeouts.progress),
        "rejoin": ((int, float), False, Timeouts.rejoin),
    },
    "limits": {
        "max_header_bytes": (int, False, Limits.max_header_bytes),
        "max_tensors": (int, False, Limits.max_tensors),
        "max_tensor_bytes": (int, False, Limits.max_tensor_bytes),
        "queue_bytes": (int, False, 512 * 2**20),
    },
    "link_check": {
        "rounds": (int, False, LinkCheck.rounds),
        "shape": (list, False, list(LinkCheck.shape)),
        "dtype": (str, False, LinkCheck.dtype),
        "hold": ((int, float), False, LinkCheck.hold),
    },
}

_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", dict: "a table", list: "a list"}

# What to write for a required key that is missing: the user should not need the README to fix it.
_REQUIRED = {
    "role": 'role = "label_holder" (binds, holds the labels), "data_holder" (connects) or "segment_holder"',
    "party": 'party = "NAME", this node\'s party id (as its partners list it under [keys.partners])',
    "run": 'run = "NAME", the same at every node of the run',
    "endpoint": 'endpoint = "tcp://HOST:PORT", the label holder\'s address (it binds there, data holders connect)',
    "session": "a [session] table with batch_size, window, model and [session.cut_widths], the same at every node",
    "session.cut_widths": "a [session.cut_widths] table with each data holder's cut-layer width, e.g. dh1 = 16",
    "session.batch_size": "batch_size = 64 (rows per micro-batch), the same at every node",
    "session.window": "window = 1 (synchronous SGD; more pipelines), the same at every node",
    "session.model": 'model = "NAME", a name for the agreed architecture, the same at every node',
    "data.path": 'path = "FILE.csv", this party\'s table (CSV, Parquet or .npz; relative to this config)',
    "data.id_column": 'id_column = "COLUMN", the column holding the IDs the parties share',
}


class _Problems:
    """Every problem found in one config file: a user who left out four keys fixes all four after one start, not
    after four. Each problem is one line naming its table and key; :meth:`check` raises them as one ConfigError."""

    def __init__(self, where: str):
        self.where = where
        self.found: list[str] = []

    def add(self, problem: str) -> None:
        self.found.append(problem)

    def check(self) -> None:
        if len(self.found) == 1:
            raise ConfigError(f"{self.where}: {self.found[0]}")
        if self.found:
            lines = "".join(f"\n  - {p}" for p in self.found)
            raise ConfigError(f"{self.where}: {len(self.found)} problems (fix them all, then start again):{lines}")

    def table(self, raw: dict, name: str) -> dict[str, Any]:
        """The table's keys with defaults filled in; each unknown, missing or mistyped key is a problem, and a key
        that is missing or mistyped is left out of the result (so checks that need it are skipped)."""
        schema = _SCHEMA[name]
        label = f"[{name}]." if name else ""
        for key in raw:
            if key not in schema:
                self.add(f"unknown key {label}{key} (known keys: {', '.join(sorted(schema))})")
        out = {}
        for key, (typ, required, default) in schema.items():
            if key not in raw:
                if required:
                    what = "table" if typ is dict else "key"
                    shown = f"[{name}.{key}]" if typ is dict and name else f"[{key}]" if typ is dict else label + key
                    self.add(f"missing {what} {shown}: add {_REQUIRED[f'{name}.{key}' if name else key]}")
                else:
                    out[key] = default
                continue
            value = raw[key]
            types = typ if isinstance(typ, tuple) else (typ,)
            if isinstance(value, bool) and bool not in types or not isinstance(value, types):
                expected = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
                self.add(f"{label}{key} must be {expected}, got {value!r}")
                continue
            out[key] = value
        return out


def _read_toml(path: Path, where: str) -> dict:
    """The file's TOML; a file that cannot be read or parsed is the one problem reported (nothing else is known)."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None


def is_loopback(endpoint: str) -> bool:
    """Whether a ``tcp://HOST:PORT`` endpoint's host is loopback: 127.0.0.0/8, ::1 (or ::ffff:127.x) or localhost.

    Names other than ``localhost`` are not resolved: a name is not loopback (DNS could say anything)."""
    match = ENDPOINT.fullmatch(endpoint)
    if match is None:
        return False
    host = match.group(1).strip("[]")
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def load_config(path: str | Path, *, allow_insecure_remote: bool = False) -> NodeConfig:
    """Read and check a node config. Raises one ``ConfigError`` listing every problem, each naming its key.

    ``allow_insecure_remote`` (``vfl node --insecure``): accept ``[keys].insecure = true`` on an endpoint that is not
    loopback. Without it insecure mode is for one machine only: traffic anyone on the network could read or forge.

    One function per table. A table whose own keys are wrong yields None and the checks of other tables that need
    it are skipped (they would only repeat the problem), so every line of the error is a separate thing to fix."""
    path = Path(path)
    where = str(path)
    problems = _Problems(where)
    top = problems.table(_read_toml(path, where), "")
    base = path.resolve().parent
    _identity(top, problems)
    role = top.get("role")
    keys = _keys(top, base, allow_insecure_remote, problems) if "keys" in top else None
    session = _session(top, keys, problems) if "session" in top else None
    timeouts = _timeouts(top["timeouts"], problems) if "timeouts" in top else None
    limits, queue_bytes = _limits(top["limits"], problems) if "limits" in top else (None, None)
    link = _link_check(top["link_check"], limits, problems) if "link_check" in top else None
    data = _data(top["data"], role, base, problems) if top.get("data") is not None else None
    if role == "segment_holder" and top.get("data") is not None:
        problems.add("[data] is a data holder's or the label holder's; a segment holder holds no data")
    if session is not None and session.psi and "data" in top and top["data"] is None and role != "segment_holder":
        problems.add("[session].psi = true needs a [data] table with path and id_column")
    psi = _psi(top["psi"], limits, base, problems) if "psi" in top else None
    if session is not None and psi is not None and psi.buckets != 1:  # the session config carries the bucketing
        if not session.psi:
            problems.add("[psi].buckets / memory_mb ask for a bucketed PSI but [session].psi is not true")
        else:
            session = dataclasses.replace(session, psi_buckets=psi.buckets)
    privacy, audit = _privacy(top, session, problems)
    if session is not None and privacy is not None:
        session = dataclasses.replace(session, privacy=privacy)
    train = None
    training = session.train if session is not None else _raw_flag(top.get("session"), "train")
    if training and role in ROLES:
        train = _train_settings(top, session, base, problems)
    elif session is not None and not session.train:
        for section in ("model", "train"):
            if top.get(section) is not None:
                problems.add(f"[{section}] is set but [session].train is not true")
    problems.check()
    return NodeConfig(
        path=path,
        bind=top.get("bind"),
        role=role,
        party=top["party"],
        run=top["run"],
        endpoint=top["endpoint"],
        secret_key=keys[1],
        partners=keys[2],
        insecure=keys[0],
        session=session,
        timeouts=timeouts,
        limits=limits,
        queue_bytes=queue_bytes,
        link_check=link,
        data=data,
        psi=psi,
        train=train,
        audit=audit,
    )


def _raw_flag(table: object, key: str) -> bool:
    """A true/false key of a table that did not pass its checks: true only if it is literally true."""
    return isinstance(table, dict) and table.get(key) is True


def _identity(top: dict, problems: _Problems) -> None:
    """role, party, run and endpoint. A wrong one is reported and dropped from ``top``."""
    if "role" in top and top["role"] not in ROLES:
        problems.add(f"role must be one of {', '.join(ROLES)}, got {top.pop('role')!r}")
    for key in ("party", "run"):
        if key in top and not is_party_id(top[key]):
            problems.add(f"{key} {top.pop(key)!r} must be 1-64 of A-Z a-z 0-9 _ . - starting with a letter or digit")
    if "endpoint" in top:
        if not ENDPOINT.fullmatch(top["endpoint"]):
            problems.add(f"endpoint must look like tcp://HOST:PORT, got {top.pop('endpoint')!r}")
        elif top.get("role") in ("data_holder", "segment_holder") and top["endpoint"].endswith(":*"):
            problems.add(f"a {top['role'].replace('_', ' ')}'s endpoint needs its downstream's real port, not '*'")
    if top.get("role") == "segment_holder":
        if not isinstance(top.get("bind"), str) or not ENDPOINT.fullmatch(top["bind"]):
            problems.add('a segment holder needs bind = "tcp://HOST:PORT", where its inputs connect')
            top.pop("bind", None)
    elif top.get("bind") is not None:
        problems.add("bind is a segment holder's key (where its inputs connect); a "
                     f"{str(top.get('role', 'node')).replace('_', ' ')} has endpoint only")


def _key_file(base: Path, value: str, key: str, problems: _Problems) -> Path | None:
    path = (base / value).resolve()
    if not path.is_file():
        problems.add(f"{key} = {value!r}: no such file ({path}); create keys with `vfl keys generate`")
        return None
    return path


def _keys(top: dict, base: Path, allow_insecure_remote: bool, problems: _Problems):
    """[keys]: (insecure, secret key file, {partner: public key file}), or None if it has a problem."""
    keys = problems.table(top["keys"], "keys")
    if not {"secret", "partners", "insecure"} <= keys.keys():
        return None
    endpoint = top.get("endpoint")
    insecure = keys["insecure"]
    if insecure:
        if endpoint is not None and not allow_insecure_remote and not is_loopback(endpoint):
            problems.add(
                f"[keys].insecure = true (no encryption, no authentication) is allowed only on a loopback endpoint "
                f"(127.0.0.1, ::1, localhost), not {endpoint}; use CurveZMQ keys, or start the node with "
                "`vfl node --insecure` to accept unprotected traffic on this network"
            )
            return None
        return True, None, {}
    ok = True
    secret = None
    if keys["secret"] is None:
        problems.add("missing key [keys].secret (or set [keys].insecure = true for debugging)")
        ok = False
    else:
        secret = _key_file(base, keys["secret"], "[keys].secret", problems)
        ok = secret is not None
    partners: dict[str, Path] = {}
    if not keys["partners"]:
        problems.add("[keys.partners] must name the public key file of every partner")
        return None
    for name, value in keys["partners"].items():
        if not is_party_id(name) or not isinstance(value, str):
            problems.add(f"[keys.partners].{name} must be a party id = \"path/to/party.key\"")
            ok = False
            continue
        file = _key_file(base, value, f"[keys.partners].{name}", problems)
        if file is None:
            ok = False
        else:
            partners[name] = file
    if ok and not _partner_keys(partners, problems):
        ok = False
    return (False, secret, partners) if ok else None


def _partner_keys(partners: dict[str, Path], problems: _Problems) -> bool:
    """Two partner names with one public key (one file, or two files holding the same key) would merge two parties
    into one allow-list entry: whoever holds that key could act as either. Refused, naming both."""
    from .keys import KeyFileError, load_public_key  # zmq: only when keys are configured

    seen: dict[bytes, str] = {}
    by_file: dict[Path, str] = {}
    ok = True
    for name, file in partners.items():
        if file in by_file:
            problems.add(
                f"[keys.partners].{by_file[file]} and .{name} name the same key file {file}: every partner needs its "
                "own key (create one per party with `vfl keys generate`)"
            )
            ok = False
            continue
        by_file[file] = name
        try:
            key = load_public_key(file)
        except KeyFileError as exc:
            problems.add(f"[keys.partners].{name}: {exc}")
            ok = False
            continue
        if key in seen:
            problems.add(
                f"[keys.partners].{seen[key]} and .{name} hold the same public key ({partners[seen[key]]}, {file}): "
                "every partner needs its own key (create one per party with `vfl keys generate`)"
            )
            ok = False
        seen[key] = name
    return ok


def _session(top: dict, keys, problems: _Problems) -> SessionConfig | None:
    """[session], and whether it fits this node: its data holder entry, the label holder's partner keys."""
    s = problems.table(top["session"], "session")
    if len(s) != len(_SCHEMA["session"]):
        return None
    if "max_window" in top["session"] and s["window"] != "auto":
        problems.add('[session].max_window is set but window is not "auto": set window = "auto", or drop max_window')
        return None
    segments = s.pop("segments")
    if segments is not None:
        try:
            s["segments"] = segments_from_wire(
                {name: {"combine": "concat", **spec} if isinstance(spec, dict) else spec
                 for name, spec in segments.items()})
        except ValueError as exc:
            problems.add(f"[session.{exc}")
            return None
    try:
        session = SessionConfig(**s)
    except ValueError as exc:
        problems.add(f"[session] {exc}")
        return None
    role, party = top.get("role"), top.get("party")
    if role == "data_holder" and party is not None and party not in session.cut_widths:
        problems.add(f"[session.cut_widths] has no entry for this data holder {party!r}")
    if role == "segment_holder" and party is not None and party not in session.segments:
        problems.add(f"[session.segments] has no entry for this segment holder {party!r}")
    if role == "label_holder" and keys is not None and not keys[0]:
        missing = sorted(set(session.parties) - set(keys[2]))
        if missing:
            problems.add(f"[keys.partners] has no public key for party(ies) {', '.join(missing)}")
    if role in ("data_holder", "segment_holder") and party in session.parties and keys is not None and not keys[0]:
        _chain_keys(session, party, keys[2], problems)
    return session


def _chain_keys(session: SessionConfig, party: str, partners: dict, problems: _Problems) -> None:
    """The partners a data holder or segment holder needs: its downstream's key (the CURVE server it connects to),
    the label holder's when that is another node (its relayed session is authenticated end to end, [C3]), and a
    segment holder's inputs (its allow-list)."""
    chain = session.chain
    want = set(chain.inputs(party)) if party in session.segments else set()
    downstream = chain.downstream(party)
    if downstream is not None:
        want.add(downstream)
    missing = sorted(want - set(partners))
    if missing:
        problems.add(f"[keys.partners] has no public key for {', '.join(missing)}")
    extra = [p for p in partners if p not in want]
    if len(extra) != 1 or extra[0] in session.parties:
        what = ", ".join(sorted(want))
        problems.add(
            "[keys.partners] must name the label holder's key" + (f" and those of {what}" if what else "")
            + f", nothing else (it names {', '.join(sorted(partners)) or 'none'})"
        )


def _timeouts(raw: dict, problems: _Problems) -> Timeouts | None:
    t = problems.table(raw, "timeouts")
    bad = [k for k, v in t.items() if not v > 0]
    for k in bad:
        problems.add(f"[timeouts].{k} must be > 0, got {t[k]!r}")
    if bad or len(t) != len(_SCHEMA["timeouts"]):
        return None
    timeouts = Timeouts(**{k: float(v) for k, v in t.items()})
    if timeouts.peer <= timeouts.heartbeat:
        problems.add("[timeouts].peer must be longer than [timeouts].heartbeat")
        return None
    return timeouts


def _limits(raw: dict, problems: _Problems) -> tuple[Limits | None, int | None]:
    """[limits]: the wire limits and the socket queue budget (queue_bytes)."""
    lim = problems.table(raw, "limits")
    bad = [k for k, v in lim.items() if v < 1]
    for k in bad:
        problems.add(f"[limits].{k} must be >= 1, got {lim[k]}")
    if bad or len(lim) != len(_SCHEMA["limits"]):
        return None, None
    limits = Limits(
        max_header_bytes=lim["max_header_bytes"],
        max_tensors=lim["max_tensors"],
        max_tensor_bytes=lim["max_tensor_bytes"],
    )
    return limits, lim["queue_bytes"]


def _link_check(raw: dict, limits: Limits | None, problems: _Problems) -> LinkCheck | None:
    lc = problems.table(raw, "link_check")
    if len(lc) != len(_SCHEMA["link_check"]):
        return None
    ok = True
    if lc["dtype"] not in DTYPES:
        problems.add(f"[link_check].dtype must be one of {', '.join(DTYPES)}")
        ok = False
    shape = lc["shape"]
    if not (0 < len(shape) <= 8 and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        problems.add("[link_check].shape must be a list of 1-8 integers >= 0")
        ok = False
    if lc["rounds"] < 0 or lc["hold"] < 0:
        problems.add("[link_check].rounds and .hold must be >= 0")
        ok = False
    if not ok:
        return None
    link = LinkCheck(rounds=lc["rounds"], shape=tuple(shape), dtype=lc["dtype"], hold=float(lc["hold"]))
    nbytes = int(np.prod(link.shape)) * DTYPES[link.dtype].itemsize
    if limits is not None and nbytes > limits.max_tensor_bytes:
        problems.add(f"[link_check].shape is {nbytes} bytes > [limits].max_tensor_bytes")
        return None
    return link


def _data(raw: dict, role: str | None, base: Path, problems: _Problems) -> DataSource | None:
    d = problems.table(raw, "data")
    ok = len(d) == len(_SCHEMA["data"])
    data_path = None
    if "path" in d:
        data_path = (base / d["path"]).resolve()
        if not data_path.is_file():
            problems.add(f"[data].path = {d['path']!r}: no such file ({data_path})")
            ok = False
    features = d.get("features")
    if features is not None and not all(isinstance(c, str) for c in features):
        problems.add("[data].features must be a list of column names")
        ok = False
    if d.get("label_column") is not None and role == "data_holder":
        problems.add("[data].label_column belongs in the label holder's config only")
        ok = False
    if not ok:
        return None
    return DataSource(
        path=data_path,
        id_column=d["id_column"],
        features=tuple(features) if features is not None else None,
        label_column=d["label_column"],
        standardize=d["standardize"],
    )


def _psi(raw: dict, limits: Limits | None, base: Path, problems: _Problems) -> PsiSettings | None:
    p = problems.table(raw, "psi")
    if len(p) != len(_SCHEMA["psi"]):
        return None
    found = len(problems.found)
    if not 1 <= p["chunk_size"] <= 1 << 20:
        problems.add("[psi].chunk_size must be in 1..1048576")
    if p["min_rows"] < 0 or p["workers"] < 0:
        problems.add("[psi].min_rows and [psi].workers must be >= 0")
    if p["max_items"] < 1:
        problems.add(f"[psi].max_items must be >= 1, got {p['max_items']}")
    if limits is not None and p["chunk_size"] * 32 > limits.max_tensor_bytes:
        problems.add("[psi].chunk_size * 32 bytes exceeds [limits].max_tensor_bytes")
    if p["cluster"] is not None and (bad := check_cluster_address(p["cluster"])) is not None:
        problems.add(f"[psi].cluster {bad}")
    buckets, memory_mb = p["buckets"], p["memory_mb"]
    if buckets is not None and buckets != AUTO_BUCKETS and not (type(buckets) is int and 1 <= buckets <= MAX_BUCKETS):
        problems.add(f'[psi].buckets must be "auto" or an integer in 1..{MAX_BUCKETS}, got {buckets!r}')
    if memory_mb < 0:
        problems.add(f"[psi].memory_mb must be >= 0 (0: no budget), got {memory_mb}")
    if len(problems.found) > found:
        return None
    if buckets is None:  # a memory budget alone asks for buckets chosen from it
        buckets = AUTO_BUCKETS if memory_mb else 1
    if buckets == AUTO_BUCKETS and not memory_mb:
        memory_mb = DEFAULT_PSI_MEMORY_MB
    out = (base / p["output"]).resolve() if p["output"] else None
    return PsiSettings(
        chunk_size=p["chunk_size"],
        dedupe=p["dedupe"],
        min_rows=p["min_rows"],
        workers=p["workers"],
        output=out,
        max_items=p["max_items"],
        cluster=p["cluster"],
        buckets=buckets,
        memory_mb=memory_mb,
        spill_dir=(out.parent if out is not None else base) / "psi-buckets",
    )


def _privacy(top: dict, session: SessionConfig | None, problems: _Problems) -> tuple[PrivacySpec | None, bool]:
    """[privacy]: the training defence (into the session config: every party must set the same one) and, at the
    label holder, ``audit``. Returns (spec or None if it has a problem, audit)."""
    raw = top.get("privacy")
    if raw is None:
        return PrivacySpec(), True
    table = dict(raw)
    audit = table.pop("audit", True)
    if not isinstance(audit, bool):
        problems.add(f"[privacy].audit must be true or false, got {audit!r}")
        audit = True
    elif "audit" in raw and top.get("role") == "data_holder":
        problems.add("[privacy].audit is the label holder's to set (it measures the leak; a data holder cannot)")
    try:
        spec = PrivacySpec.from_table(table)
    except PrivacyError as exc:
        problems.add(str(exc))
        return None, audit
    training = session.train if session is not None else _raw_flag(top.get("session"), "train")
    if spec.defence != "none" and not training:
        problems.add(f"[privacy].defence = {spec.defence!r} protects training, but [session].train is not true")
        return None, audit
    task = (top.get("train") or {}).get("task") if top.get("role") == "label_holder" else None
    if isinstance(task, str) and task in TASKS:
        try:
            spec.check_task(task)
        except PrivacyError as exc:
            problems.add(str(exc))
            return None, audit
    return spec, audit


TASKS = ("multiclass", "binary", "regression")


def _train_settings(top: dict, session: SessionConfig | None, base: Path, problems: _Problems) -> TrainSettings | None:
    """[model] and [train] of a training session, checked against the role and the session config."""
    m = _model(top.get("model") or {}, top["role"], top.get("party"), session, problems)
    t = _train(top.get("train") or {}, top["role"], top.get("data"), base, problems)
    if m is None or t is None:
        return None
    return TrainSettings(bottom=m["bottom"], top=m["top"], segment=m["segment"], combine=m["combine"], seed=m["seed"],
                         **t)


def _model(raw: dict, role: str, party: str | None, session: SessionConfig | None, problems: _Problems) -> dict | None:
    """[model]: this party's bottom (and, at the label holder, the top) model spec."""
    m = problems.table(raw, "model")
    if len(m) != len(_SCHEMA["model"]):
        return None
    found = len(problems.found)
    is_lh = role == "label_holder"
    if role == "segment_holder":
        return _segment_model(m, party, session, problems)
    if m["segment"] is not None:
        problems.add("[model].segment belongs in a segment holder's config only")
    if m["bottom"] is None and not is_lh:
        problems.add("[model].bottom is required: the data holder's bottom model, e.g. bottom = {widths = [16]}")
    if is_lh and m["top"] is None:
        problems.add("[model].top is required at the label holder, e.g. top = {widths = [32, 1]}")
    if not is_lh and m["top"] is not None:
        problems.add("[model].top belongs in the label holder's config only")
    if m["combine"] not in ("concat", "sum"):
        problems.add("[model].combine must be 'concat' or 'sum'")
    for key in ("bottom", "top"):
        spec = m[key]
        if spec is None:
            continue
        if "factory" in spec:
            if set(spec) != {"factory"} or not isinstance(spec["factory"], str):
                problems.add(f"[model].{key} = {{factory = \"module:function\"}} takes nothing else")
        elif not isinstance(spec.get("widths"), list) or not spec["widths"]:
            problems.add(f"[model].{key} needs widths = [..] (layer widths) or factory = \"module:fn\"")
        elif key == "bottom" and not is_lh and session is not None:
            width = session.cut_widths.get(party)
            if spec["widths"][-1] != width:
                problems.add(
                    f"[model].bottom ends with width {spec['widths'][-1]} but [session.cut_widths] says {width}"
                )
    return m if len(problems.found) == found else None


def _segment_model(m: dict, party: str | None, session: SessionConfig | None, problems: _Problems) -> dict | None:
    """[model] of a segment holder: its segment (an MLP spec or a factory), whose last width is its cut layer."""
    found = len(problems.found)
    if m["bottom"] is not None or m["top"] is not None:
        problems.add("[model].bottom and .top are a data holder's and the label holder's; a segment holder has "
                     "[model].segment")
    spec = m["segment"]
    if spec is None:
        problems.add("[model].segment is required: the segment holder's model, e.g. segment = {widths = [640]}")
    elif "factory" in spec:
        if set(spec) != {"factory"} or not isinstance(spec["factory"], str):
            problems.add("[model].segment = {factory = \"module:function\"} takes nothing else")
    elif not isinstance(spec.get("widths"), list) or not spec["widths"]:
        problems.add("[model].segment needs widths = [..] (layer widths) or factory = \"module:fn\"")
    elif session is not None and party in session.segments and spec["widths"][-1] != session.segments[party].width:
        problems.add(f"[model].segment ends with width {spec['widths'][-1]} but [session.segments.{party}].width "
                     f"says {session.segments[party].width}")
    return m if len(problems.found) == found else None


def _train(raw: dict, role: str, data: dict | None, base: Path, problems: _Problems) -> dict | None:
    """[train]: the schedule (label holder), this party's optimizer, threads and where results go; returns the
    TrainSettings fields it decides."""
    t = problems.table(raw, "train")
    if len(t) != len(_SCHEMA["train"]):
        return None
    found = len(problems.found)
    if role == "label_holder":
        if t["task"] not in TASKS:
            problems.add(f"[train].task must be one of {', '.join(TASKS)}")
        if not isinstance(data, dict) or data.get("label_column") is None:
            problems.add("the label holder needs [data].label_column, the column holding the labels")
        if t["epochs"] < 1:
            problems.add("[train].epochs must be >= 1")
        if not 0 <= t["validation_fraction"] < 1:
            problems.add("[train].validation_fraction must be in [0, 1)")
    elif t["task"] is not None or "epochs" in raw:
        problems.add("[train].task and .epochs are the label holder's to set")
    if t["threads"] < 1:
        problems.add("[train].threads must be >= 1")
    if t["checkpoint_every"] < 0:
        problems.add("[train].checkpoint_every must be >= 0")
    if t["checkpoint_every"] and role != "label_holder":
        problems.add("[train].checkpoint_every is the label holder's to set")
    if t["max_rejoins"] < 0:
        problems.add(f"[train].max_rejoins must be >= 0, got {t['max_rejoins']}")
    if "max_rejoins" in raw and role != "label_holder":
        problems.add("[train].max_rejoins is the label holder's to set (it admits the rejoins)")
    _early_stopping(t, raw, role, problems)
    optimizer = t["optimizer"] or {"kind": "adam", "lr": 0.001}
    _optimizer(optimizer, problems)
    if len(problems.found) > found:
        return None
    output = (base / t["output"]).resolve()  # default model/: a run never discards what it trained
    checkpoint_dir = output / "checkpoints"
    if t["checkpoint_dir"] is not None:
        checkpoint_dir = (base / t["checkpoint_dir"]).resolve()
    return dict(
        task=t["task"],
        epochs=t["epochs"],
        validation_fraction=float(t["validation_fraction"]),
        schedule_seed=t["seed"],
        optimizer=dict(optimizer),
        threads=t["threads"],
        output=output,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=t["checkpoint_every"],
        max_rejoins=t["max_rejoins"],
        keep=t["keep"],
        patience=t["patience"],
    )


KEEPS = ("last", "best")


def _early_stopping(t: dict, raw: dict, role: str, problems: _Problems) -> None:
    """[train].keep and .patience: the label holder's, judged by the validation loss, so they need validation rows."""
    for key in ("keep", "patience"):
        if key in raw and role != "label_holder":
            problems.add(f"[train].{key} is the label holder's to set (it alone sees the validation loss); the data "
                         "holders keep the epoch it names")
    if t["keep"] not in KEEPS:
        problems.add(f"[train].keep must be one of {', '.join(repr(k) for k in KEEPS)}, got {t['keep']!r}")
    if t["patience"] < 0:
        problems.add(f"[train].patience must be >= 0 (0: train every epoch), got {t['patience']}")
    if role == "label_holder" and (t["keep"] == "best" or t["patience"] > 0) and t["validation_fraction"] <= 0:
        problems.add("[train].keep = \"best\" and .patience judge epochs by the validation loss: set "
                     "[train].validation_fraction > 0 (e.g. 0.2)")


def _optimizer(optimizer: dict, problems: _Problems) -> None:
    """[train].optimizer: the spec checks it, and an unknown key is named with the keys its kind takes."""
    try:
        OptimizerSpec.from_dict(optimizer)
    except (TypeError, ValueError) as exc:
        problems.add(f"[train].optimizer: {exc}")
