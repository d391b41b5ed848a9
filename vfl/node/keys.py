"""CurveZMQ key pairs on disk: pyzmq's certificate format, written atomically, secrets readable by the owner only.

``vfl keys generate`` makes ``NAME.key`` (public: give it to partners) and ``NAME.key_secret`` (keep it). We reuse
``zmq.auth``'s writer and reader so the files interoperate with other ZeroMQ tools; we only add what it lacks: an
atomic rename (a crash never leaves half a key) and mode 0600 on the secret. A secret key file that group or others
may read is refused when loaded, as ssh refuses such a private key: whoever can read it can be this party.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import zmq
import zmq.auth

from ..errors import SetupError


class KeyFileError(SetupError):
    """A key file is missing or unreadable. The message names the file and what to do."""


def generate_keypair(out_dir: str | Path, name: str, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``out_dir/name.key`` and ``out_dir/name.key_secret``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    public, secret = out / f"{name}.key", out / f"{name}.key_secret"
    if not overwrite:
        for path in (public, secret):
            if path.exists():
                raise KeyFileError(f"{path} exists; pass --overwrite to replace it (partners must then get the new .key)")
    with tempfile.TemporaryDirectory(dir=out, prefix=".keygen-") as tmp:
        tmp_public, tmp_secret = (Path(p) for p in zmq.auth.create_certificates(tmp, name))
        os.chmod(tmp_secret, 0o600)
        os.chmod(tmp_public, 0o644)
        for src in (tmp_secret, tmp_public):
            with open(src, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp_secret, secret)
        os.replace(tmp_public, public)
    return public, secret


def _load(path: Path) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"{path}: not a readable key file ({exc}); create one with `vfl keys generate`") from None
    for what, key in (("public", public), ("secret", secret)):
        if key is not None and len(key) != 40:
            raise KeyFileError(f"{path}: the {what} key must be 40 Z85 characters, got {len(key)}")
    return public, secret


def load_public_key(path: str | Path) -> bytes:
    """The Z85 public key in a ``.key`` (or ``.key_secret``) file."""
    return _load(Path(path))[0]


def load_secret_key(path: str | Path) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a ``.key_secret`` file."""
    public, secret = _load(Path(path))
    if secret is None:
        raise KeyFileError(f"{path}: holds no secret key; [keys].secret must name the .key_secret file")
    check_private(path)
    return public, secret


def check_private(path: str | Path) -> None:
    """Refuse a secret key file that group or others may read or write (the file itself, symlinks followed).

    POSIX only: elsewhere the mode bits do not describe who may read the file."""
    if os.name != "posix":
        return
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot check its permissions: {exc.strerror or exc}") from None
    if mode & 0o077:
        raise KeyFileError(
            f"{path}: permissions {mode:04o} are too open: a secret key must be readable by its owner only; "
            f"run `chmod 600 {path}`"
        )


def _raw(z85_key: bytes) -> bytes:
    from zmq.utils import z85

    return z85.decode(z85_key)


def label_holder_relay_keys(cfg) -> dict[str, bytes]:
    """The label holder's relay key ([C3], PROTOCOL.md section 13) for every party behind a segment holder: from its
    own CURVE secret and that party's public key. Insecure mode: the public insecure key (no authenticity)."""
    from ..protocol.relay import INSECURE_RELAY_KEY, relay_key

    relayed = [p for p in cfg.session.parties if cfg.session.chain.relayed(p)]
    if cfg.insecure:
        return {p: INSECURE_RELAY_KEY for p in relayed}
    _, secret = load_secret_key(cfg.secret_key)
    return {p: relay_key(_raw(secret), _raw(load_public_key(cfg.partners[p])), p, cfg.party, cfg.run)
            for p in relayed if p in cfg.partners}


def own_relay_key(cfg) -> bytes | None:
    """A party behind a segment holder: the key of its relayed session with the label holder (None: it feeds the
    label holder directly). The label holder is the partner that is no party of the session."""
    from ..protocol.relay import INSECURE_RELAY_KEY, relay_key

    if not cfg.session.chain.relayed(cfg.party):
        return None
    if cfg.insecure:
        return INSECURE_RELAY_KEY
    lh = cfg.label_holder_partner
    _, secret = load_secret_key(cfg.secret_key)
    return relay_key(_raw(secret), _raw(load_public_key(cfg.partners[lh])), cfg.party, lh, cfg.run)
