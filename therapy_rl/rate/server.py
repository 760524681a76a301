"""The rating web app (Starlette + uvicorn): one page and a small JSON API over the rating store.

    GET  /?token=T      the page (it keeps the token in the tab and drops it from the address bar)
    GET  /api/queue     {rater, rated, rubric, samples: [...]}: replies of open batches this rater has not rated
    POST /api/ratings   {sample_id, score in [0, 1], rubric: {criterion: bool}, comment, unsafe} -> 201 {id}

Every request needs a rater token (`Authorization: Bearer T`; the page alone also takes `?token=T`): none or a
wrong one is 401. A bad field is 422, an unknown sample 404, a second rating of the same reply by the same rater
409, a body that is not JSON 400 and one over 64 KiB 413; a refused request writes nothing. The server binds
127.0.0.1 unless told otherwise, logs no request lines (the page's URL holds the token), and sends a strict
content-security policy: the page's only script and style carry a per-response nonce, and it writes model text
with textContent, never as HTML.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
from typing import Optional

from therapy_rl.rate import store as store_lib
from therapy_rl.rate.rubric import MAX_COMMENT_CHARS, RUBRIC

MAX_BODY_BYTES = 64 * 1024
QUEUE_LIMIT = 20
PAGE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "rate.html")
RATING_FIELDS = {"sample_id", "score", "rubric", "comment", "unsafe"}
_BASE_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                 "X-Frame-Options": "DENY"}


def _token(scope) -> Optional[str]:
    for name, value in scope.get("headers", ()):
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            return value[7:].decode("latin-1").strip()
    if scope.get("path") == "/" and scope.get("method") == "GET":
        from urllib.parse import parse_qs

        values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
        return values[0] if values else None
    return None


class RequireRater:
    """ASGI middleware: resolves the request's token to a rater (scope["state"]["rater"]) or answers 401."""

    def __init__(self, app, store: store_lib.RatingStore):
        self.app, self.store = app, store

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        import anyio.to_thread
        from starlette.responses import JSONResponse

        rater = await anyio.to_thread.run_sync(self.store.rater_for_token, _token(scope))
        if rater is None:
            response = JSONResponse({"error": "missing or invalid rater token (ask for one: "
                                              "python -m therapy_rl.rate add-rater NAME --workdir W)"},
                                    status_code=401, headers={**_BASE_HEADERS, "WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        scope.setdefault("state", {})["rater"] = rater
        return await self.app(scope, receive, send)


def _sample_json(s: store_lib.Sample) -> dict:
    return {"id": s.id, "batch_id": s.batch_id, "problem": s.problem, "user_text": s.user_text,
            "user_emotion": s.user_emotion, "reply": s.reply, "reply_emotion": s.reply_emotion,
            "guard": {"checked": s.guard_flag is not None, "flagged": bool(s.guard_flag),
                      "categories": list(s.guard_categories)}}


def make_app(store: store_lib.RatingStore, log=lambda line: print(line, flush=True)):
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    with open(PAGE_FILE, encoding="utf-8") as f:
        page = f.read()

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=_BASE_HEADERS)

    def index(request: Request):
        nonce = secrets.token_urlsafe(16)
        csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; "
               "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
        body = page.replace("{{NONCE}}", nonce).replace("{{MAX_COMMENT}}", str(MAX_COMMENT_CHARS))
        return HTMLResponse(body, headers={**_BASE_HEADERS, "Content-Security-Policy": csp})

    def queue(request: Request):
        rater = request.state.rater
        samples = store.queue_for(rater, QUEUE_LIMIT)
        return JSONResponse({"rater": rater.name, "rated": store.count_ratings(rater),
                             "rubric": [list(item) for item in RUBRIC],
                             "samples": [_sample_json(s) for s in samples]}, headers=_BASE_HEADERS)

    async def rate(request: Request):
        import anyio.to_thread

        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return error(415, "send the rating as application/json")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                return error(413, f"request body over {MAX_BODY_BYTES} bytes")
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return error(400, "the body is not valid JSON")
        if not isinstance(payload, dict):
            return error(422, "the body must be a JSON object")
        unknown = sorted(set(payload) - RATING_FIELDS)
        missing = sorted({"sample_id", "score"} - set(payload))
        if unknown or missing:
            return error(422, f"unknown fields {unknown}" if unknown else f"missing fields {missing}")
        rater = request.state.rater
        try:
            rating_id = await anyio.to_thread.run_sync(
                lambda: store.add_rating(rater, payload["sample_id"], payload["score"], payload.get("rubric"),
                                         payload.get("comment", ""), payload.get("unsafe", False)))
        except store_lib.RatingRejected as e:
            return error(e.status, e.message)
        log(f"[rate] {rater.name} rated sample {payload['sample_id']}: {float(payload['score']):.2f}"
            + (" (flagged unsafe)" if payload.get("unsafe") else ""))
        return JSONResponse({"id": rating_id}, status_code=201, headers=_BASE_HEADERS)

    app = Starlette(routes=[Route("/", index, methods=["GET"]), Route("/api/queue", queue, methods=["GET"]),
                            Route("/api/ratings", rate, methods=["POST"])])
    return RequireRater(app, store)


def serve(workdir: str, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serves `workdir`'s store until interrupted; prints the address once the socket is bound (port 0 = any)."""
    try:
        import uvicorn
    except ImportError as e:  # the web app's dependencies are the `rate` extra
        from therapy_rl.errors import ConfigError
        raise ConfigError("the rating app needs starlette and uvicorn: pip install -e '.[rate]'") from e

    store = store_lib.RatingStore.in_workdir(workdir)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)  # connections wait in the backlog until the event loop accepts them
    bound_port = sock.getsockname()[1]
    if host not in ("127.0.0.1", "::1", "localhost"):
        print(f"[rate] warning: listening on {host}, beyond this machine; tokens travel unencrypted unless a TLS "
              "proxy sits in front", flush=True)
    print(f"[rate] {len(store.raters())} rater(s), store {store.path}", flush=True)
    print(f"[rate] serving on http://{host}:{bound_port}/ (open /?token=YOUR_TOKEN)", flush=True)
    config = uvicorn.Config(make_app(store), log_level="warning", access_log=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])
