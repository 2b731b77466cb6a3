"""Exceptions the retriever client raises, so callers never handle raw ``grpc.RpcError``.

``RetrieverRequestError`` (a ``ValueError``): the server rejected the request
(INVALID_ARGUMENT); retrying cannot help. ``RetrieverUnavailable``: the service could not be
reached or answered in time within the retry budget. ``RetrieverServerError``: any other
failure status (a server bug, an unimplemented RPC).
"""

from __future__ import annotations


class RetrieverError(Exception):
    """Base class of every retriever-client error."""


class RetrieverRequestError(RetrieverError, ValueError):
    """The server rejected the request as malformed; ``str(err)`` names the field."""

    def __init__(self, target: str, method: str, details: str) -> None:
        super().__init__(f"{method} on {target}: {details}")
        self.target = target
        self.method = method
        self.details = details


class RetrieverUnavailable(RetrieverError):
    """No answer within the retry budget (connection refused, deadlines, overload)."""

    def __init__(
        self, target: str, method: str, attempts: int, last_status: str, details: str = ""
    ) -> None:
        super().__init__(
            f"retriever at {target} unavailable: {method} failed {attempts} time(s), "
            f"last status {last_status}" + (f" ({details})" if details else "")
        )
        self.target = target
        self.method = method
        self.attempts = attempts
        self.last_status = last_status
        self.details = details


class RetrieverServerError(RetrieverError):
    """The server failed the call with a non-retryable status other than INVALID_ARGUMENT."""

    def __init__(self, target: str, method: str, status: str, details: str) -> None:
        super().__init__(f"{method} on {target} failed with {status}: {details}")
        self.target = target
        self.method = method
        self.status = status
        self.details = details
