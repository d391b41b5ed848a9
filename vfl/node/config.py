"""Node configuration: one TOML file per node, checked completely before any network activity.

Every problem is one line naming the file and the key (``node.toml: [session].batch_size must be an integer >= 1``),
so a user fixes it without reading a traceback. Relative paths are relative to the config file's folder, so a run
folder can be moved or copied to another host as a whole.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..protocol import DTYPES, Limits, SessionConfig
from ..protocol.label_holder import DEFAULT_MAX_REJOINS
from ..protocol.messages import is_party_id
from ..protocol.psi_phase import DEFAULT_MAX_PSI_ITEMS
from ..train.specs import OptimizerSpec

ROLES = ("label_holder", "data_holder")
ENDPOINT = re.compile(r"tcp://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5}|\*)")


class ConfigError(Exception):
    """A node config is wrong. ``str(exc)`` is one line meant for the user; the CLI exits 2 with it."""


class TrainingSetupError(Exception):
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


@dataclass(frozen=True)
class PsiSettings:
    chunk_size: int = 65536
    dedupe: bool = False
    min_rows: int = 1
    workers: int = 0  # 0: every core this process may use
    output: Path | None = None
    max_items: int = DEFAULT_MAX_PSI_ITEMS  # the most items a peer may announce for the PSI


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

    @property
    def is_label_holder(self) -> bool:
        return self.role == "label_holder"


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
    },
    "psi": {
        "chunk_size": (int, False, PsiSettings.chunk_size),
        "dedupe": (bool, False, PsiSettings.dedupe),
        "min_rows": (int, False, PsiSettings.min_rows),
        "workers": (int, False, PsiSettings.workers),
        "output": (str, False, None),
        "max_items": (int, False, DEFAULT_MAX_PSI_ITEMS),
    },
    "keys": {"secret": (str, False, None), "partners": (dict, False, {}), "insecure": (bool, False, False)},
    "session": {
        "cut_widths": (dict, True, None),
        "batch_size": (int, True, None),
        "window": (int, True, None),
        "model": (str, True, None),
        "psi": (bool, False, False),
        "train": (bool, False, False),
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


def _table(raw: dict, name: str, where: str) -> dict[str, Any]:
    schema = _SCHEMA[name]
    label = f"[{name}]." if name else ""
    for key in raw:
        if key not in schema:
            known = ", ".join(sorted(schema))
            raise ConfigError(f"{where}: unknown key {label}{key} (known keys: {known})")
    out = {}
    for key, (typ, required, default) in schema.items():
        if key not in raw:
            if required:
                raise ConfigError(f"{where}: missing key {label}{key}")
            out[key] = default
            continue
        value = raw[key]
        types = typ if isinstance(typ, tuple) else (typ,)
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            expected = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
            raise ConfigError(f"{where}: {label}{key} must be {expected}, got {value!r}")
        out[key] = value
    return out


def _positive(value: float, key: str, where: str) -> float:
    if not value > 0:
        raise ConfigError(f"{where}: {key} must be > 0, got {value!r}")
    return float(value)


def _key_file(base: Path, value: str, key: str, where: str) -> Path:
    path = (base / value).resolve()
    if not path.is_file():
        raise ConfigError(f"{where}: {key} = {value!r}: no such file ({path}); create keys with `vfl keys generate`")
    return path


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


def _partner_keys(partners: dict[str, Path], where: str) -> None:
    """Two partner names with one public key (one file, or two files holding the same key) would merge two parties
    into one allow-list entry: whoever holds that key could act as either. Refused, naming both."""
    from .keys import KeyFileError, load_public_key  # zmq: only when keys are configured

    seen: dict[bytes, str] = {}
    by_file: dict[Path, str] = {}
    for name, file in partners.items():
        if file in by_file:
            raise ConfigError(
                f"{where}: [keys.partners].{by_file[file]} and .{name} name the same key file {file}: every partner "
                "needs its own key (create one per party with `vfl keys generate`)"
            )
        by_file[file] = name
        try:
            key = load_public_key(file)
        except KeyFileError as exc:
            raise ConfigError(f"{where}: [keys.partners].{name}: {exc}") from None
        if key in seen:
            raise ConfigError(
                f"{where}: [keys.partners].{seen[key]} and .{name} hold the same public key ({partners[seen[key]]}, "
                f"{file}): every partner needs its own key (create one per party with `vfl keys generate`)"
            )
        seen[key] = name


def load_config(path: str | Path, *, allow_insecure_remote: bool = False) -> NodeConfig:
    """Read and check a node config. Raises ``ConfigError`` with one line naming the file and key.

    ``allow_insecure_remote`` (``vfl node --insecure``): accept ``[keys].insecure = true`` on an endpoint that is not
    loopback. Without it insecure mode is for one machine only: traffic anyone on the network could read or forge."""
    path = Path(path)
    where = str(path)
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    top = _table(raw, "", where)
    base = path.resolve().parent

    role = top["role"]
    if role not in ROLES:
        raise ConfigError(f"{where}: role must be one of {', '.join(ROLES)}, got {role!r}")
    for key in ("party", "run"):
        if not is_party_id(top[key]):
            raise ConfigError(f"{where}: {key} {top[key]!r} must be 1-64 of A-Z a-z 0-9 _ . - starting with a letter or digit")
    if not ENDPOINT.fullmatch(top["endpoint"]):
        raise ConfigError(f"{where}: endpoint must look like tcp://HOST:PORT, got {top['endpoint']!r}")
    if role == "data_holder" and top["endpoint"].endswith(":*"):
        raise ConfigError(f"{where}: a data holder's endpoint needs the label holder's real port, not '*'")

    keys = _table(top["keys"], "keys", where)
    insecure = keys["insecure"]
    if insecure and not allow_insecure_remote and not is_loopback(top["endpoint"]):
        raise ConfigError(
            f"{where}: [keys].insecure = true (no encryption, no authentication) is allowed only on a loopback "
            f"endpoint (127.0.0.1, ::1, localhost), not {top['endpoint']}; use CurveZMQ keys, or start the node with "
            "`vfl node --insecure` to accept unprotected traffic on this network"
        )
    secret = None
    partners: dict[str, Path] = {}
    if not insecure:
        if keys["secret"] is None:
            raise ConfigError(f"{where}: missing key [keys].secret (or set [keys].insecure = true for debugging)")
        secret = _key_file(base, keys["secret"], "[keys].secret", where)
        if not keys["partners"]:
            raise ConfigError(f"{where}: [keys.partners] must name the public key file of every partner")
        for name, value in keys["partners"].items():
            if not is_party_id(name) or not isinstance(value, str):
                raise ConfigError(f"{where}: [keys.partners].{name} must be a party id = \"path/to/party.key\"")
            partners[name] = _key_file(base, value, f"[keys.partners].{name}", where)
        _partner_keys(partners, where)

    s = _table(top["session"], "session", where)
    try:
        session = SessionConfig(
            cut_widths=s["cut_widths"],
            batch_size=s["batch_size"],
            window=s["window"],
            model=s["model"],
            psi=s["psi"],
            train=s["train"],
        )
    except ValueError as exc:
        raise ConfigError(f"{where}: [session] {exc}") from None
    if role == "data_holder" and top["party"] not in session.cut_widths:
        raise ConfigError(f"{where}: [session.cut_widths] has no entry for this data holder {top['party']!r}")
    if role == "label_holder" and not insecure:
        missing = sorted(set(session.cut_widths) - set(partners))
        if missing:
            raise ConfigError(f"{where}: [keys.partners] has no public key for data holder(s) {', '.join(missing)}")
    if role == "data_holder" and not insecure and len(partners) != 1:
        raise ConfigError(f"{where}: a data holder's [keys.partners] names exactly one key: the label holder's")

    t = _table(top["timeouts"], "timeouts", where)
    timeouts = Timeouts(**{k: _positive(v, f"[timeouts].{k}", where) for k, v in t.items()})
    if timeouts.peer <= timeouts.heartbeat:
        raise ConfigError(f"{where}: [timeouts].peer must be longer than [timeouts].heartbeat")

    lim = _table(top["limits"], "limits", where)
    for k, v in lim.items():
        if v < 1:
            raise ConfigError(f"{where}: [limits].{k} must be >= 1, got {v}")
    limits = Limits(
        max_header_bytes=lim["max_header_bytes"], max_tensors=lim["max_tensors"], max_tensor_bytes=lim["max_tensor_bytes"]
    )

    lc = _table(top["link_check"], "link_check", where)
    if lc["dtype"] not in DTYPES:
        raise ConfigError(f"{where}: [link_check].dtype must be one of {', '.join(DTYPES)}")
    shape = lc["shape"]
    if not (0 < len(shape) <= 8 and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise ConfigError(f"{where}: [link_check].shape must be a list of 1-8 integers >= 0")
    if lc["rounds"] < 0 or lc["hold"] < 0:
        raise ConfigError(f"{where}: [link_check].rounds and .hold must be >= 0")
    link = LinkCheck(rounds=lc["rounds"], shape=tuple(shape), dtype=lc["dtype"], hold=float(lc["hold"]))
    nbytes = int(np.prod(link.shape)) * DTYPES[link.dtype].itemsize
    if nbytes > limits.max_tensor_bytes:
        raise ConfigError(f"{where}: [link_check].shape is {nbytes} bytes > [limits].max_tensor_bytes")

    data = None
    if top["data"] is not None:
        d = _table(top["data"], "data", where)
        data_path = (base / d["path"]).resolve()
        if not data_path.is_file():
            raise ConfigError(f"{where}: [data].path = {d['path']!r}: no such file ({data_path})")
        features = d["features"]
        if features is not None and not all(isinstance(c, str) for c in features):
            raise ConfigError(f"{where}: [data].features must be a list of column names")
        if d["label_column"] is not None and role != "label_holder":
            raise ConfigError(f"{where}: [data].label_column belongs in the label holder's config only")
        data = DataSource(
            path=data_path,
            id_column=d["id_column"],
            features=tuple(features) if features is not None else None,
            label_column=d["label_column"],
            standardize=d["standardize"],
        )
    if session.psi and data is None:
        raise ConfigError(f"{where}: [session].psi = true needs a [data] table with path and id_column")
    p = _table(top["psi"], "psi", where)
    if not 1 <= p["chunk_size"] <= 1 << 20:
        raise ConfigError(f"{where}: [psi].chunk_size must be in 1..1048576")
    if p["min_rows"] < 0 or p["workers"] < 0:
        raise ConfigError(f"{where}: [psi].min_rows and [psi].workers must be >= 0")
    if p["max_items"] < 1:
        raise ConfigError(f"{where}: [psi].max_items must be >= 1, got {p['max_items']}")
    if p["chunk_size"] * 32 > limits.max_tensor_bytes:
        raise ConfigError(f"{where}: [psi].chunk_size * 32 bytes exceeds [limits].max_tensor_bytes")
    psi = PsiSettings(
        chunk_size=p["chunk_size"],
        dedupe=p["dedupe"],
        min_rows=p["min_rows"],
        workers=p["workers"],
        output=(base / p["output"]).resolve() if p["output"] else None,
        max_items=p["max_items"],
    )

    train = _train_settings(top, role, session, data, base, where) if session.train else None
    for section in ("model", "train"):
        if top[section] is not None and not session.train:
            raise ConfigError(f"{where}: [{section}] is set but [session].train is not true")

    return NodeConfig(
        path=path,
        role=role,
        party=top["party"],
        run=top["run"],
        endpoint=top["endpoint"],
        secret_key=secret,
        partners=partners,
        insecure=insecure,
        session=session,
        timeouts=timeouts,
        limits=limits,
        queue_bytes=lim["queue_bytes"],
        link_check=link,
        data=data,
        psi=psi,
        train=train,
    )


TASKS = ("multiclass", "binary", "regression")


def _train_settings(top: dict, role: str, session: SessionConfig, data, base: Path, where: str) -> TrainSettings:
    """[model] and [train] of a training session, checked against the role and the session config."""
    m = _table(top["model"] or {}, "model", where)
    t = _table(top["train"] or {}, "train", where)
    is_lh = role == "label_holder"
    if m["bottom"] is None and not is_lh:
        raise ConfigError(f"{where}: [model].bottom is required: the data holder's bottom model")
    if is_lh and m["top"] is None:
        raise ConfigError(f"{where}: [model].top is required at the label holder")
    if not is_lh and m["top"] is not None:
        raise ConfigError(f"{where}: [model].top belongs in the label holder's config only")
    if m["combine"] not in ("concat", "sum"):
        raise ConfigError(f"{where}: [model].combine must be 'concat' or 'sum'")
    for key in ("bottom", "top"):
        spec = m[key]
        if spec is None:
            continue
        if "factory" in spec:
            if set(spec) != {"factory"} or not isinstance(spec["factory"], str):
                raise ConfigError(f"{where}: [model].{key} = {{factory = \"module:function\"}} takes nothing else")
        elif not isinstance(spec.get("widths"), list) or not spec["widths"]:
            raise ConfigError(f"{where}: [model].{key} needs widths = [..] (layer widths) or factory = \"module:fn\"")
    if not is_lh:
        spec = m["bottom"]
        width = session.cut_widths.get(top["party"])
        if "widths" in spec and spec["widths"][-1] != width:
            raise ConfigError(
                f"{where}: [model].bottom ends with width {spec['widths'][-1]} but [session.cut_widths] says {width}"
            )
    if is_lh:
        if t["task"] not in TASKS:
            raise ConfigError(f"{where}: [train].task must be one of {', '.join(TASKS)}")
        if data is None or data.label_column is None:
            raise ConfigError(f"{where}: the label holder needs [data].label_column")
        if t["epochs"] < 1:
            raise ConfigError(f"{where}: [train].epochs must be >= 1")
        if not 0 <= t["validation_fraction"] < 1:
            raise ConfigError(f"{where}: [train].validation_fraction must be in [0, 1)")
    elif t["task"] is not None or "epochs" in (top["train"] or {}):
        raise ConfigError(f"{where}: [train].task and .epochs are the label holder's to set")
    if t["threads"] < 1:
        raise ConfigError(f"{where}: [train].threads must be >= 1")
    if t["checkpoint_every"] < 0:
        raise ConfigError(f"{where}: [train].checkpoint_every must be >= 0")
    if t["checkpoint_every"] and not is_lh:
        raise ConfigError(f"{where}: [train].checkpoint_every is the label holder's to set")
    if t["max_rejoins"] < 0:
        raise ConfigError(f"{where}: [train].max_rejoins must be >= 0, got {t['max_rejoins']}")
    if "max_rejoins" in (top["train"] or {}) and not is_lh:
        raise ConfigError(f"{where}: [train].max_rejoins is the label holder's to set (it admits the rejoins)")
    output = (base / t["output"]).resolve()  # default model/: a run never discards what it trained
    if t["checkpoint_dir"] is not None:
        checkpoint_dir = (base / t["checkpoint_dir"]).resolve()
    else:
        checkpoint_dir = output / "checkpoints"
    optimizer = t["optimizer"] or {"kind": "adam", "lr": 0.001}
    try:
        OptimizerSpec.from_dict(optimizer)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: [train].optimizer: {exc}") from None
    return TrainSettings(
        bottom=m["bottom"],
        top=m["top"],
        combine=m["combine"],
        seed=m["seed"],
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
    )
