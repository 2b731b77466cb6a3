"""OpenAI-style errors: ``APIError`` and the JSON body every failure is answered with.

Handlers raise ``APIError`` (or let pydantic's ``ValidationError`` / FastAPI's
``RequestValidationError`` escape); ``install_error_handlers`` turns them into

    {"error": {"message": "...", "type": "invalid_request_error", "param": "...", "code": ...}}

with the right HTTP status, the shape the official ``openai`` client parses into
``BadRequestError`` / ``AuthenticationError`` / ``NotFoundError`` / ``InternalServerError``.
Retriever failures: 503 when it stays unreachable through the client's retries, 502 for any
other retriever error; anything unexpected: 500.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ralmspec_vllm.retrieval.errors import RetrieverError, RetrieverUnavailable

logger = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"


class APIError(Exception):
    """A failure the client is told about, with its HTTP status and OpenAI error fields."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(message, status=400, param=param)


def unauthorized() -> APIError:
    return APIError(
        "Incorrect or missing API key: send it as 'Authorization: Bearer <key>'.",
        status=401,
        code="invalid_api_key",
    )


_TYPE_TAGS = frozenset({"int", "str", "bool", "float", "list", "dict", "none", "json-or-python"})


def _param(loc: Any) -> str | None:
    """``ralm.speculation_stride`` from a pydantic loc, without union-member / validator tags
    (``constrained-int``, ``literal['auto']``, ``function-after[...]``) or the ``body`` root."""
    parts = []
    for part in loc or ():
        if isinstance(part, int):
            parts.append(str(part))
        elif (
            isinstance(part, str)
            and part != "body"
            and part.isidentifier()
            and part.lower() not in _TYPE_TAGS
        ):
            parts.append(part)
    return ".".join(parts) or None


def from_validation_errors(errors: list[Any]) -> APIError:
    """One 400 naming every invalid field (``ralm.speculation_stride: ...``); a union's
    members' complaints are joined with "or"."""
    messages: dict[str | None, list[str]] = {}
    for err in errors:
        param = _param(err.get("loc"))
        # vLLM's own validators raise VLLMValidationError naming the parameter.
        param = param or getattr(err.get("ctx", {}).get("error"), "parameter", None)
        message = str(err.get("msg", "invalid value"))
        if message not in messages.setdefault(param, []):
            messages[param].append(message)
    first = next(iter(messages), None)
    text = "; ".join(
        f"{param}: {', or '.join(msgs)}" if param else ", or ".join(msgs)
        for param, msgs in messages.items()
    )
    return bad_request(f"Invalid request: {text}" if text else "Invalid request.", first)


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError | ValidationError)
    return from_validation_errors(list(exc.errors())).response()


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    kind = INVALID_REQUEST if status < 500 else "server_error"
    message = str(exc.detail) if exc.detail else HTTPStatus(status).phrase
    return APIError(message, status=status, type=kind).response()


async def _retriever_error(_: Request, exc: Exception) -> JSONResponse:
    # The retriever client already retried; the request may succeed later (503), or the
    # retriever rejected what the server sent it (a server-side bug: 502).
    status = 503 if isinstance(exc, RetrieverUnavailable) else 502
    logger.warning("retriever failure answered with %d: %s", status, exc)
    return APIError(f"Retriever error: {exc}", status=status, type="server_error").response()


async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("internal error while serving a request", exc_info=exc)
    message = f"Internal server error: {type(exc).__name__}: {exc}"
    return APIError(message, status=500, type="server_error").response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RetrieverError, _retriever_error)
    app.add_exception_handler(Exception, _internal_error)
