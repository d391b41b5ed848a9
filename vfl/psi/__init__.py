"""Diffie-Hellman private set intersection (sans-I/O): hash-to-curve, commutative cipher, batch engine, exchange.

See :mod:`vfl.psi.exchange` for the protocol and :mod:`vfl.psi.multiparty` for several data holders.
"""

from .cipher import PsiKey
from .curve import hash_domain, hash_to_curve, validate_point
from .engine import PsiEngine, encode_ids
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
from .exchange import (
    BlindedChunk,
    PsiReceiver,
    PsiSender,
    PsiStart,
    ReplyChunk,
    ResultChunk,
    run_in_memory,
)
from .multiparty import FinalRowsReceiver, MultipartyPlan, PairwiseResult, RowsChunk, combine, rows_chunks

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
