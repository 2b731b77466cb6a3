"""API keys: ``Authorization: Bearer <key>`` checked in constant time.

One check for both servers: the OpenAI-compatible HTTP server (``--api-key`` or
``RALMSPEC_API_KEY``) and the gRPC retriever service (``--api-key`` of ``retriever serve``
or ``RALMSPEC_RETRIEVER_API_KEY``). Only SHA-256 digests of the keys are kept, and every key
is compared on every check, so neither the keys' number nor a prefix match shows in timing.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Sequence

API_KEY_ENV = "RALMSPEC_API_KEY"
"""The HTTP server's key when ``serve --api-key`` is not given."""
RETRIEVER_KEY_ENV = "RALMSPEC_RETRIEVER_API_KEY"
"""The retriever service's key: read by ``retriever serve`` and by ``serve`` (its client)."""


class KeyCheck:
    """Accepts a bearer token that equals one of ``keys``; with no keys, accepts nothing
    (callers skip the check when ``not check``)."""

    def __init__(self, keys: Sequence[str]) -> None:
        if any(not key for key in keys):
            raise ValueError("an API key must not be empty")
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def bearer(self, header: str) -> bool:
        """Whether an ``Authorization`` header value carries a known key."""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        digest = hashlib.sha256(token.strip().encode()).digest()
        ok = False
        for known in self._digests:  # no early exit: constant time in the number of keys
            ok |= hmac.compare_digest(digest, known)
        return ok


def keys(flags: Sequence[str] | None, env: str) -> list[str]:
    """The keys given as flags, else the one in the environment variable ``env``."""
    if flags:
        return list(flags)
    value = os.environ.get(env)
    return [value] if value else []
