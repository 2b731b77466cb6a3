"""The FastAPI application: routes, API-key check, error handlers, metrics endpoint.

``build_app(service, model_name, api_keys)`` returns an ASGI app serving

- ``POST /v1/completions``, ``POST /v1/chat/completions`` (``handlers.OpenAIHandlers``),
- ``GET /v1/models`` (the one served model),
- ``GET /health`` (always open) and ``GET /metrics`` (Prometheus text, default registry:
  the ``ralmspec_*`` metrics, the retriever service's counters fetched for each scrape, and
  vLLM's own ``vllm:*`` ones),
- ``POST /reset_prefix_cache`` (admin, for benchmarks): empties vLLM's prefix cache and the
  document-token cache (``RaLMService.reset_prefix_cache``); answers ``{"reset": bool}``,
  vLLM's verdict (false while requests still hold KV blocks: retry once they finished).

With API keys, every ``/v1/*`` and ``/reset_prefix_cache`` request needs
``Authorization: Bearer <key>``; others get an OpenAI-style 401. The app is run by uvicorn
(``entrypoints/serve.py``, or the tests).
"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.types import ASGIApp, Receive, Scope, Send

from ralmspec_vllm.auth import KeyCheck
from ralmspec_vllm.entrypoints.openai import protocol as p
from ralmspec_vllm.entrypoints.openai.errors import install_error_handlers, unauthorized
from ralmspec_vllm.entrypoints.openai.handlers import OpenAIHandlers
from ralmspec_vllm.service import RaLMService

GUARDED_PREFIXES = ("/v1", "/reset_prefix_cache")


class APIKeyMiddleware:
    """Pure ASGI middleware: ``GUARDED_PREFIXES`` need one of ``keys`` as a Bearer token."""

    def __init__(self, app: ASGIApp, keys: Sequence[str]) -> None:
        self.app = app
        self._check = KeyCheck(keys)

    def _authorized(self, scope: Scope) -> bool:
        header = b""
        for name, value in scope.get("headers", ()):
            if name.lower() == b"authorization":
                header = value
        return self._check.bearer(header.decode("latin-1"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope.get("method") != "OPTIONS"
            and scope["path"].removeprefix(scope.get("root_path", "")).startswith(GUARDED_PREFIXES)
            and not self._authorized(scope)
        ):
            await unauthorized().response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


def build_app(service: RaLMService, model_name: str, api_keys: Sequence[str] = ()) -> FastAPI:
    app = FastAPI(title="ralmspec-vllm", docs_url=None, redoc_url=None, openapi_url=None)
    handlers = OpenAIHandlers(service, model_name)
    app.state.service = service
    app.state.handlers = handlers

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handlers.completions(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await handlers.chat(request)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        card = p.ModelCard(
            id=model_name,
            owned_by="ralmspec-vllm",
            root=model_name,
            max_model_len=service.max_model_len,
        )
        return JSONResponse(p.ModelList(data=[card]).model_dump(mode="json"))

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        await service.refresh_retriever_stats()
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> JSONResponse:
        return JSONResponse({"reset": await service.reset_prefix_cache()})

    install_error_handlers(app)
    if api_keys:
        app.add_middleware(APIKeyMiddleware, keys=list(api_keys))
    return app
