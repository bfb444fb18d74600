"""cdcddp.methods layer: typed methods in one transaction per call, accounts, the write fence's
inputs (see ``registry.invoke``)."""

from cdcddp.methods.context import (
    CommitInfo,
    ConnectionInfo,
    LoginState,
    MethodContext,
    is_loopback_address,
)
from cdcddp.methods.registry import InvocationOutcome, MethodDefinition, Methods, invoke

__all__ = [
    "CommitInfo",
    "ConnectionInfo",
    "InvocationOutcome",
    "LoginState",
    "MethodContext",
    "MethodDefinition",
    "Methods",
    "invoke",
    "is_loopback_address",
]
