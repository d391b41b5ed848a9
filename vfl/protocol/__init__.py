"""The vfl wire protocol, sans-I/O: messages, codec, session config and the per-role state machines.

Nothing in this package opens a socket, reads a clock or imports torch; the node (``vfl.node``) moves frames between
sockets and these machines. PROTOCOL.md is the normative description of what this code does.
"""

from .codec import DEFAULT_LIMITS, DTYPES, PROTOCOL_VERSION, SIGNATURE, Limits, decode, encode
from .data_holder import DataHolderMachine, DataHolderState
from .errors import (
    ErrorCode,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    SessionFailed,
    VflError,
)
from .events import Aligned, Disconnect, EpochDone, Finished, LinkChecked, Log, Output, PeerLeft, PeerReady, Send
from .label_holder import LabelHolderMachine, PartyState
from .messages import (
    MESSAGE_TYPES,
    Bye,
    Echo,
    EchoReply,
    Error,
    Heartbeat,
    Hello,
    Message,
    PsiItems,
    PsiReply,
    PsiResult,
    PsiRows,
    PsiStart,
    Tensor,
    Welcome,
)
from .messages import Backward, Checkpoint, CheckpointDone, Epoch, EvalForward, Forward, Rollback, Schedule, TrainingDone
from .messages import PsiBucket, Relay, Window
from .session import SessionConfig, config_diff, describe_diff, digest_of

__all__ = [name for name in dir() if not name.startswith("_")]
