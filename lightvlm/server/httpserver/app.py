"""The httpserver room: an aiohttp app on uvloop serving the native and OpenAI APIs.

Every error is JSON: `{"message": ...}` on native routes and `{"error": {...}}` on /v1 routes. The
handler of a client that disconnects is cancelled, which aborts its request in every room.
"""

import asyncio

import uvloop
from aiohttp import web

import lightvlm
from lightvlm.common.logging import get_logger
from lightvlm.common.process import run_room
from lightvlm.config import ServerConfig
from lightvlm.server.httpserver.http_utils import BODY_TIMEOUT
from lightvlm.server.httpserver.lifecycle import Lifecycle
from lightvlm.server.httpserver.manager import ClientError, HttpServerManager, RequestFailed
from lightvlm.server.httpserver.native_api import NativeAPI
from lightvlm.server.httpserver.openai_api import OpenAIAPI
from lightvlm.server.httpserver.openapi import openapi_document
from lightvlm.server.httpserver.slow_clients import GuardedSite

logger = get_logger(__name__)


OPENAI_SHAPED = ("/v1/", "/tokenize", "/detokenize")  # routes that answer errors as OpenAI does


def error_response(request: web.Request, status: int, message: str) -> web.Response:
    if request.path.startswith(OPENAI_SHAPED):
        kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                408: "invalid_request_error", 413: "invalid_request_error",
                503: "service_unavailable"}.get(status, "server_error")
        body = {"error": {"message": message, "type": kind, "code": status}}
    else:
        body = {"message": message}
    return web.json_response(body, status=status)


def http_error_message(request: web.Request, error: web.HTTPException) -> str:
    """aiohttp's own plain-text errors (unknown path, wrong method, ...) as a message that says what to fix."""
    if isinstance(error, web.HTTPNotFound):
        return f"no route for {request.method} {request.path}"
    if isinstance(error, web.HTTPMethodNotAllowed):
        return f"{request.path} does not take {request.method}; use {', '.join(sorted(error.allowed_methods))}"
    text = error.text if error.text is not None else ""
    return text.removeprefix(f"{error.status}: ") or error.reason


@web.middleware
async def errors_as_json(request: web.Request, handler):
    try:
        return await handler(request)
    except ClientError as e:
        return error_response(request, e.status, str(e))
    except RequestFailed as e:
        return error_response(request, e.status, str(e))
    except web.HTTPRequestEntityTooLarge:
        limit = request.app._client_max_size  # noqa: SLF001 (aiohttp keeps the limit only here)
        return error_response(request, 413, f"the request body is larger than the limit of {limit} bytes "
                                            f"(--max_body_size)")
    except web.HTTPException as e:
        if e.status < 400 or e.content_type == "application/json":
            raise
        return error_response(request, e.status, http_error_message(request, e))
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as e:  # noqa: BLE001 (a bug: report it, keep serving)
        logger.exception("unhandled error on %s", request.path)
        return error_response(request, 500, f"internal error in the httpserver: {type(e).__name__}: {e}")


OPEN_PATHS = ("/health", "/liveness", "/readiness", "/metrics", "/openapi.json")  # probes answer without the API key


def api_key_check(api_key: str):
    expected = f"Bearer {api_key}"

    @web.middleware
    async def check(request: web.Request, handler):
        if request.method != "OPTIONS" and request.path not in OPEN_PATHS and \
                request.headers.get("Authorization") != expected:
            return error_response(request, 401, "missing or wrong API key: send 'Authorization: Bearer <key>'")
        return await handler(request)

    return check


def cors(origins: tuple[str, ...]):
    @web.middleware
    async def allow(request: web.Request, handler):
        origin = request.headers.get("Origin")
        allowed = origin is not None and ("*" in origins or origin in origins)
        if request.method == "OPTIONS" and allowed:
            response = web.Response(status=204)
        else:
            response = await handler(request)
        if allowed:
            response.headers["Access-Control-Allow-Origin"] = "*" if "*" in origins else origin
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = request.headers.get(
                "Access-Control-Request-Headers", "Authorization, Content-Type")
            response.headers["Vary"] = "Origin"
        return response

    return allow


def build_app(manager: HttpServerManager, lifecycle: Lifecycle | None = None) -> web.Application:
    config = manager.config
    middlewares = [cors(config.http.allow_origins)] if config.http.allow_origins else []
    middlewares.append(errors_as_json)
    if lifecycle is not None:
        middlewares.append(lifecycle.middleware)
    if config.http.api_key:
        middlewares.append(api_key_check(config.http.api_key))
    app = web.Application(client_max_size=config.http.max_body_size, middlewares=middlewares)
    app[BODY_TIMEOUT] = config.http.body_timeout
    NativeAPI(manager).add_routes(app)
    OpenAIAPI(manager).add_routes(app)

    async def health(request):
        stopping = lifecycle.health() if lifecycle is not None else None
        if stopping is not None:
            return web.json_response({"message": stopping}, status=503)
        down = manager.unhealthy_rooms()
        if down:
            return web.json_response({"message": f"not answering: {', '.join(down)}"}, status=503)
        return web.json_response({"message": "Ok"})

    async def liveness(request):
        return web.json_response({"status": "ok"})

    async def metrics(request):
        return web.Response(body=manager.metrics.render(), content_type="text/plain", charset="utf-8")

    app.router.add_get("/health", health)
    app.router.add_get("/readiness", health)
    app.router.add_get("/liveness", liveness)
    app.router.add_get("/metrics", metrics)
    document = openapi_document("lightvlm", lightvlm.__version__)
    app.router.add_get("/openapi.json", lambda request: web.json_response(document))
    manager.metrics.watch_rooms(lambda: manager.room_reports)

    async def on_startup(app):
        await manager.start()

    async def on_cleanup(app):
        await manager.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def start_httpserver_process(config: ServerConfig, pipe) -> None:
    def start():
        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        manager = HttpServerManager(config)
        lifecycle = Lifecycle(manager, config.graceful_shutdown_timeout, config.runtime.ipc_dir, error_response)
        lifecycle.install(loop)
        runner = web.AppRunner(build_app(manager, lifecycle), handler_cancellation=True, access_log=None,
                               keepalive_timeout=config.http.keep_alive_timeout)
        loop.run_until_complete(runner.setup())
        site = GuardedSite(runner, config.http.host, config.http.port, header_timeout=config.http.header_timeout,
                           max_connections=config.http.max_connections)
        loop.run_until_complete(site.start())
        logger.info("listening on http://%s:%d", config.http.host, config.http.port)

        def serve():
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(runner.cleanup())

        return serve

    run_room("httpserver", pipe, config.log_level, start)
