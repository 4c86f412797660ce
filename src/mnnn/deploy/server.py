"""``mnnn serve``: a stateful inference server (FastAPI + uvicorn) with Prometheus monitoring.

Endpoints::

    POST   /v1/generate          {prompt | prompt_ids, max_new_tokens, temperature, top_k, top_p, seed,
                                  session_id, stream} -> {text, token_ids, ...}; stream: server-sent events
    POST   /v1/sessions          -> 201 {session_id}: a conversation whose model state is kept
    GET    /v1/sessions/{id}     -> {session_id, tokens_seen}
    DELETE /v1/sessions/{id}     -> 204
    GET    /metrics              Prometheus text format
    GET    /healthz              {status: ok, ...}

A session keeps the model's recurrent state (and with it the episodic memory) between requests, so a
follow-up costs only its own tokens; past ``max_sessions`` the least recently used one is dropped.
Bad requests get a 4xx JSON body ``{"error": ..., "field": ...}``; an error inside the model a 500
whose body says only that (the traceback goes to the server log).
"""


import json
import logging
import time
import uuid
from typing import Any

from mnnn.deploy.engine import InferenceEngine, Session, SessionStore

log = logging.getLogger("mnnn.serve")

MAX_PROMPT_TOKENS = 8192


def _require_serving():
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise ImportError(f"mnnn serve needs the serving extra: pip install 'mnnn[serve]' ({err})") from err


class _BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 before anything parses it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _send_json(send, 413, {"error": f"request body over {self.limit} bytes", "field": "body"})
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _send_json(send, 413, {"error": f"request body over {self.limit} bytes", "field": "body"})


class _TooLarge(Exception):
    pass


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def create_app(engine: InferenceEngine, max_sessions: int = 64, max_new_tokens: int = 256,
               max_body_bytes: int = 1 << 20, model_name: str = "mnnn", max_prompt_tokens: int = MAX_PROMPT_TOKENS):
    """The FastAPI application around ``engine``. ``max_new_tokens`` is the largest a request may
    ask for; ``max_prompt_tokens`` the longest prompt; ``max_body_bytes`` the largest request body."""
    _require_serving()
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, \
        ProcessCollector, generate_latest
    from pydantic import BaseModel, ConfigDict, Field

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    sessions = SessionStore(max_sessions)

    registry = CollectorRegistry()
    ProcessCollector(registry=registry)  # process_resident_memory_bytes, cpu seconds, open fds
    latency = Histogram("mnnn_request_latency_seconds", "Whole-request latency of /v1/generate", ["stream"],
                        registry=registry, buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
    ttft = Histogram("mnnn_time_to_first_token_seconds", "From request start to the first generated token",
                     registry=registry, buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
    requests = Counter("mnnn_requests", "Requests by endpoint and status code", ["endpoint", "code"],
                       registry=registry)
    gen_tokens = Counter("mnnn_generated_tokens", "Tokens generated", registry=registry)
    prompt_tokens = Counter("mnnn_prompt_tokens", "Prompt tokens read", registry=registry)
    rate = Gauge("mnnn_tokens_per_second", "Generation rate of the last finished request", registry=registry)
    Gauge("mnnn_active_sessions", "Sessions held", registry=registry).set_function(lambda: len(sessions))
    evicted = Gauge("mnnn_evicted_sessions", "Sessions dropped as least recently used since start",
                    registry=registry)
    evicted.set_function(lambda: sessions.evictions)
    for key, doc in (("spike_rate", "Mean spike rate of the model's spiking layers since start"),
                     ("memory_hit_rate", "Prompt positions whose memory read held the true next token (recall@k)"),
                     ("memory_hit_rate_chance", "memory_hit_rate of k entries drawn at random from the same store"),
                     ("prompt_perplexity", "Perplexity of the prompt tokens the model predicted, since start")):
        Gauge(f"mnnn_{key}", doc, registry=registry).set_function(
            lambda key=key: engine.stats().get(key, float("nan")))

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        prompt: str | None = Field(None, max_length=1 << 18, description="text to continue")
        prompt_ids: list[int] | None = Field(None, max_length=max_prompt_tokens, description="token ids instead of text")
        max_new_tokens: int | None = Field(None, description="tokens to generate (default: min(32, the server's limit))")
        temperature: float = Field(1.0, ge=0, description="0 = greedy")
        top_k: int | None = Field(None, ge=1)
        top_p: float | None = Field(None, gt=0, le=1)
        seed: int | None = None
        session_id: str | None = Field(None, max_length=128, description="keep the state in this session")
        stream: bool = False

    app = FastAPI(title="mnnn", description="Memory-native language model server", version="1")
    app.state.engine, app.state.sessions = engine, sessions

    def error(status: int, message: str, field: str | None = None, endpoint: str = "generate") -> JSONResponse:
        requests.labels(endpoint, str(status)).inc()
        return JSONResponse({"error": message, "field": field}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        field = ".".join(loc) or "body"
        return error(422, f"{field}: {first.get('msg', 'invalid request')}", field)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("error while serving %s", request.url.path)
        return error(500, "internal error in the model; see the server log", None)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "sessions": len(sessions), "stateful": engine.stateful}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/sessions", status_code=201)
    def new_session() -> dict[str, str]:
        session_id = uuid.uuid4().hex
        sessions.get_or_create(session_id)
        requests.labels("sessions", "201").inc()
        return {"session_id": session_id}

    @app.get("/v1/sessions/{session_id}")
    def get_session(session_id: str):
        session = sessions.get(session_id)
        if session is None:
            return error(404, f"unknown session {session_id!r}", "session_id", "sessions")
        return {"session_id": session_id, "tokens_seen": session.tokens_seen}

    @app.delete("/v1/sessions/{session_id}", status_code=204)
    def delete_session(session_id: str):
        if not sessions.delete(session_id):
            return error(404, f"unknown session {session_id!r}", "session_id", "sessions")
        requests.labels("sessions", "204").inc()
        return Response(status_code=204)

    @app.post("/v1/generate")
    def generate(req: GenerateRequest):
        start = time.perf_counter()
        if req.prompt is not None and req.prompt_ids is not None:
            return error(422, "give prompt or prompt_ids, not both", "prompt")
        if req.max_new_tokens is None:
            req.max_new_tokens = min(32, max_new_tokens)
        if not 1 <= req.max_new_tokens <= max_new_tokens:
            return error(422, f"max_new_tokens must be in [1, {max_new_tokens}], got {req.max_new_tokens}",
                         "max_new_tokens")
        try:
            ids = engine.encode(req.prompt) if req.prompt is not None else engine.check_ids(req.prompt_ids or [])
        except (TypeError, ValueError) as err:
            return error(422, str(err), "prompt_ids" if req.prompt is None else "prompt")
        if len(ids) > max_prompt_tokens:
            return error(422, f"the prompt has {len(ids)} tokens, more than {max_prompt_tokens}", "prompt")
        if req.session_id is not None:
            session = sessions.get(req.session_id)
            if session is None:
                return error(404, f"unknown session {req.session_id!r} (create one with POST /v1/sessions)",
                             "session_id")
        else:
            session = Session()
        if not ids and session.logits is None:
            return error(422, "the prompt is empty (and the session has nothing to continue)", "prompt")
        if not session.lock.acquire(blocking=False):
            return error(409, f"session {req.session_id!r} is busy with another request", "session_id")
        try:
            engine.read(session, ids)
            prompt_tokens.inc(len(ids))
            tokens = engine.generate(session, req.max_new_tokens, req.temperature, req.top_k, req.top_p, req.seed,
                                     keep_state=req.session_id is not None)
        except BaseException:
            session.lock.release()
            raise

        def finish(out: list[int], first: float | None) -> dict[str, Any]:
            elapsed = time.perf_counter() - start
            latency.labels(str(req.stream).lower()).observe(elapsed)
            gen_tokens.inc(len(out))
            if first is not None and elapsed > first:
                rate.set(len(out) / max(elapsed - first, 1e-9))
            requests.labels("generate", "200").inc()
            return {"text": engine.decode(out), "token_ids": out, "prompt_tokens": len(ids),
                    "session_id": req.session_id, "tokens_seen": session.tokens_seen,
                    "time_to_first_token_s": first, "latency_s": elapsed}

        if not req.stream:
            try:
                out, first = [], None
                for token in tokens:
                    if first is None:
                        first = time.perf_counter() - start
                        ttft.observe(first)
                    out.append(token)
                return finish(out, first)
            finally:
                session.lock.release()

        def events():
            out, first = [], None
            try:
                for token in tokens:
                    if first is None:
                        first = time.perf_counter() - start
                        ttft.observe(first)
                    out.append(token)
                    yield f"data: {json.dumps({'token_id': token, 'text': engine.decode([token])})}\n\n"
                yield f"data: {json.dumps(dict(finish(out, first), done=True))}\n\n"
            except Exception:  # the status line is sent already: report in-band, never the traceback
                log.exception("error while streaming")
                requests.labels("generate", "500").inc()
                yield f"data: {json.dumps({'error': 'internal error in the model; see the server log'})}\n\n"
            finally:
                session.lock.release()

        return StreamingResponse(events(), media_type="text/event-stream")

    return _BodyLimit(app, max_body_bytes) if max_body_bytes else app


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, max_sessions: int = 64,
          max_new_tokens: int = 256, log_level: str = "info") -> None:
    """Load a training checkpoint (with the BERT-uncased tokenizer from ``MNNN_DATA_DIR`` when
    there) and serve it until SIGINT/SIGTERM (uvicorn finishes the requests in flight first)."""
    _require_serving()
    import uvicorn

    from mnnn.lm import load_checkpoint_model

    model, meta = load_checkpoint_model(checkpoint)
    tokenizer = None
    try:
        from mnnn.data.wikitext import load_tokenizer

        tokenizer = load_tokenizer()
    except FileNotFoundError:
        log.warning("no tokenizer (MNNN_DATA_DIR not set): the server takes prompt_ids only")
    name = meta.get("config", {}).get("model", {}).get("name", "mnnn")
    app = create_app(InferenceEngine(model, tokenizer), max_sessions=max_sessions, max_new_tokens=max_new_tokens,
                     model_name=name)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)


class running:
    """Context manager: serve ``app`` with uvicorn in a background thread on 127.0.0.1 and a free
    port; yields the base URL; stops the server (graceful) on exit. For tests and ``bench serve``."""

    def __init__(self, app, timeout_s: float = 30.0):
        self.app, self.timeout_s = app, timeout_s

    def __enter__(self) -> str:
        import socket
        import threading

        import uvicorn

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        port = self._sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(self.timeout_s)
        self._sock.close()
