"""Diffie-Hellman private set intersection (sans-I/O): hash-to-curve, commutative cipher, batch engine, exchange.

See :mod:`vfl.psi.exchange` for the protocol and :mod:`vfl.psi.multiparty` for several data holders.

The engine, the exchange and the multiparty names are imported on first use (PEP 562): the engine's worker processes
import :mod:`vfl.psi._worker`, and so this package, and need only the cipher (cryptography, about 18 MiB), not
numpy and the rest (the whole package made each worker about 45 MiB).
"""

import importlib

from .cipher import PsiKey
from .curve import hash_domain, hash_to_curve, validate_point
from .errors import (
    ChunkOrderError,
    DuplicateIdError,
    EmptyIntersectionError,
    InvalidIdError,
    InvalidPointError,
    InvalidResultError,
    LimitExceededError,
    LowOrderPointError,
    MalformedMessageError,
    PsiError,
    PsiLocalError,
    PsiRemoteError,
    PsiStateError,
    TruncatedStreamError,
)

__all__ = [
    "PsiKey",
    "hash_domain",
    "hash_to_curve",
    "validate_point",
    "PsiEngine",
    "encode_ids",
    "PsiError",
    "PsiLocalError",
    "PsiRemoteError",
    "PsiStateError",
    "DuplicateIdError",
    "InvalidIdError",
    "MalformedMessageError",
    "ChunkOrderError",
    "TruncatedStreamError",
    "LimitExceededError",
    "InvalidPointError",
    "LowOrderPointError",
    "InvalidResultError",
    "EmptyIntersectionError",
    "PsiStart",
    "BlindedChunk",
    "ReplyChunk",
    "ResultChunk",
    "PsiSender",
    "PsiReceiver",
    "run_in_memory",
    "PairwiseResult",
    "MultipartyPlan",
    "RowsChunk",
    "combine",
    "rows_chunks",
    "FinalRowsReceiver",
]

#: name -> submodule, for the names imported on first use
_LAZY = {
    "PsiEngine": "engine",
    "encode_ids": "engine",
    **dict.fromkeys(["BlindedChunk", "PsiReceiver", "PsiSender", "PsiStart", "ReplyChunk", "ResultChunk",
                     "run_in_memory"], "exchange"),
    **dict.fromkeys(["FinalRowsReceiver", "MultipartyPlan", "PairwiseResult", "RowsChunk", "combine", "rows_chunks"],
                    "multiparty"),
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
