"""OpenAI-style errors: ``APIError`` and the JSON body every failure is answered with.

Handlers raise ``APIError`` (or let pydantic's ``ValidationError`` / FastAPI's
``RequestValidationError`` escape); ``install_error_handlers`` turns them into

    {"error": {"message": "...", "type": "invalid_request_error", "param": "...", "code": ...}}

with the right HTTP status, exactly the shape the official ``openai`` client parses into
``BadRequestError`` / ``AuthenticationError`` / ``NotFoundError`` / ``InternalServerError``.
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


def from_validation_errors(errors: list[Any]) -> APIError:
    """One 400 naming every invalid field (``ralm.speculation_stride: ...``)."""
    parts: list[str] = []
    first_param: str | None = None
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
        # pydantic puts union-member and wrapper names in loc; keep field names and indices.
        loc = [p for p in loc if not any(c in p for c in "[]()") and p != "function-after"]
        param = ".".join(loc) or None
        first_param = first_param or param
        parts.append(f"{param}: {err.get('msg', 'invalid')}" if param else err.get("msg", ""))
    message = "Invalid request: " + "; ".join(parts) if parts else "Invalid request."
    return bad_request(message, first_param)


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


async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("internal error while serving a request", exc_info=exc)
    message = f"Internal server error: {type(exc).__name__}: {exc}"
    return APIError(message, status=500, type="server_error").response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
