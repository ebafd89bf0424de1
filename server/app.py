"""The HTTP front end: OpenAI-style /v1/completions (JSON and SSE), models, tokenizer, health, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.config import ServerConfig
from engine.errors import ConfigError
from engine.outputs import RequestOutput
from engine.sampling import SamplingParams
from engine.tokenizer import Tokenizer, encode_prompt
from server.engine_client import EngineClient, EngineDeadError, ServerShuttingDownError
from server.metrics import CONTENT_TYPE, ServerMetrics
from server.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorBody,
    ErrorResponse,
    LogProbs,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    Usage,
)

logger = logging.getLogger("smoothserve.server")

MAX_BODY_BYTES = 8 * 1024**2
RETRY_AFTER_QUEUE_FULL_S = 1
RETRY_AFTER_SHUTDOWN_S = 5
PUBLIC_PATHS = ("/health", "/ready")
ENGINE_FAILED = "the engine failed while serving this request"


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers


def error_envelope(status: int, message: str, kind: str = "invalid_request_error",
                   param: str | None = None) -> ErrorResponse:  # fmt: skip
    """The OpenAI error envelope, as a JSON reply and as an SSE error event."""
    return ErrorResponse(error=ErrorBody(message=message, type=kind, param=param, code=str(status)))


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:  # fmt: skip
    body = error_envelope(status, message, kind, param)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


@dataclass
class ServerState:
    client: EngineClient
    tokenizer: Tokenizer
    metrics: ServerMetrics
    config: ServerConfig
    model_name: str
    vocab_size: int
    accepting: bool = True


@dataclass
class CompletionLog:
    """What the one log line of a completion request says; `finals` holds each prompt's latest output."""

    completion_id: str
    prompt_tokens: int
    n: int
    started: float
    finals: dict[int, RequestOutput]

    def emit(self, num_prompts: int, cut_short: str = "abort") -> None:
        """Log the request (never its text, never credentials). Unfinished completions get `cut_short`:
        abort (the client left), error (the engine failed) or shutdown."""
        reasons, generated = [], 0
        for prompt_index in range(num_prompts):
            final = self.finals.get(prompt_index)
            for index in range(self.n):
                output = final.outputs[index] if final is not None else None
                generated += len(output.token_ids) if output is not None else 0
                reasons.append(output.finish_reason if output is not None and output.finished else cut_short)
        logger.info(json.dumps({"id": self.completion_id, "prompt_tokens": self.prompt_tokens,
                                "completion_tokens": generated,
                                "latency_s": round(time.monotonic() - self.started, 4),
                                "finish_reasons": reasons}))  # fmt: skip


class GuardMiddleware:
    """API-key check (on the ASGI path, constant time) and the request body size limit, before routing."""

    def __init__(self, app: ASGIApp, api_key: str | None, metrics_public: bool) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.public = PUBLIC_PATHS + (("/metrics",) if metrics_public else ())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.expected is not None and scope["path"] not in self.public:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                await error_response(401, "invalid or missing API key", "authentication_error")(scope, receive, send)
                return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
            await error_response(413, f"request body larger than {MAX_BODY_BYTES} bytes")(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > MAX_BODY_BYTES:
                    raise APIError(413, f"request body larger than {MAX_BODY_BYTES} bytes")
            return message

        await self.app(scope, limited_receive, send)


class ResponseCountingMiddleware:
    """Counts every HTTP response by route and status, 401 and 413 from the guard included (it sits
    outside the guard). Paths that are not routes count as "other", so clients cannot grow the label set."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, routes: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.routes else "other"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.http_response(route, message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


def create_app(state: ServerState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.client.start()
        yield
        state.accepting = False
        state.client.shutdown()

    app = FastAPI(title="smoothserve", version="0.1.0", lifespan=lifespan)
    app.add_middleware(GuardMiddleware, api_key=state.config.api_key, metrics_public=state.config.metrics_public)
    if state.config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(state.config.cors_origins), allow_methods=["*"],
                           allow_headers=["*"])  # fmt: skip

    @app.exception_handler(APIError)
    async def _api_error(_: Request, error: APIError) -> JSONResponse:
        return error_response(error.status, error.message, error.kind, error.param, error.headers)

    @app.exception_handler(Exception)
    async def _unexpected_error(_: Request, error: Exception) -> JSONResponse:
        # A bug: the traceback goes to the server log (Starlette re-raises), the client gets the envelope only.
        return error_response(500, "internal server error", "server_error")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        location = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        message = first.get("msg", "invalid request")
        return error_response(400, f"{location}: {message}" if location else message, param=location or None)

    app.openapi = openapi_without_422(app)  # type: ignore[method-assign]

    @app.get("/health", responses=documented_errors(503))
    async def health() -> Response:
        if state.client.is_dead:
            return error_response(503, "the engine has failed", "server_error")
        return JSONResponse({"status": "ok"})

    @app.get("/ready", responses=documented_errors(503))
    async def ready() -> Response:
        if state.client.is_dead or not state.accepting:
            return error_response(503, "not ready", "server_error")
        return JSONResponse({"status": "ready"})

    @app.get(
        "/metrics",
        responses={
            **documented_errors(401),
            200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text format"},
        },
    )
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", response_model=ModelList, responses=documented_errors(401))
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=state.model_name)])

    @app.post("/tokenize", response_model=TokenizeResponse, responses=documented_errors(400, 401, 413))
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        ids = state.tokenizer.encode(body.prompt)
        if body.add_special_tokens:
            ids = [state.tokenizer.bos_token_id, *ids]
        return TokenizeResponse(tokens=ids, count=len(ids))

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=documented_errors(400, 401, 413))
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        check_token_ids(state, body.tokens, "tokens")
        return DetokenizeResponse(prompt=state.tokenizer.decode(body.tokens, skip_special_tokens=False))

    @app.post("/v1/completions", response_model=CompletionResponse,
              responses={**documented_errors(400, 401, 404, 413, 429, 500, 503), 200: STREAM_RESPONSE})  # fmt: skip
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(state, body, request)

    # Outermost (added last), so that the guard's 401/413 answers are counted too.
    routes = frozenset(route.path for route in app.routes if hasattr(route, "path"))
    app.add_middleware(ResponseCountingMiddleware, metrics=state.metrics, routes=routes)
    return app


ERROR_DESCRIPTIONS = {
    400: "Invalid request (also malformed JSON), in the OpenAI error envelope",
    401: "Missing or wrong API key (when the server has one)",
    404: "The model named is not the one served",
    413: f"Request body over {MAX_BODY_BYTES} bytes",
    429: "A queue limit (requests or prompt tokens) is reached; retry after Retry-After seconds",
    500: "The engine failed while serving the request",
    503: "The server is shutting down (retry after Retry-After seconds) or its engine has failed",
}
# With "stream": true, the 200 reply is server-sent events instead of one JSON CompletionResponse.
STREAM_RESPONSE = {
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
    "description": "A CompletionResponse; with stream=true, server-sent CompletionResponse chunks (an error "
    "event in the OpenAI envelope if the request fails midway), then data: [DONE]",
}


def documented_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status]} for status in statuses}


def openapi_without_422(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """FastAPI documents a 422 for every body; this server answers invalid input with 400 instead."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        fresh = app.openapi_schema is None
        schema = generate()
        if fresh:
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            for unused in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(unused, None)
        return schema

    return openapi


def check_token_ids(state: ServerState, ids: list[int], param: str) -> None:
    if any(t >= state.vocab_size for t in ids):
        raise APIError(400, f"token ids must be below the vocabulary size {state.vocab_size}", param=param)


def sampling_params(body: CompletionRequest) -> SamplingParams:
    try:
        return SamplingParams(
            n=body.n, max_tokens=body.max_tokens, min_tokens=min(body.min_tokens, body.max_tokens),
            temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed,
            stop=tuple([body.stop] if isinstance(body.stop, str) else body.stop or ()),
            stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=body.ignore_eos,
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty, logprobs=body.logprobs,
        )  # fmt: skip
    except ConfigError as error:
        raise APIError(400, str(error)) from None


async def create_completion(state: ServerState, body: CompletionRequest, request: Request) -> Response:
    if body.model != state.model_name:
        raise APIError(404, f"model {body.model!r} does not exist; this server serves {state.model_name!r}",
                       param="model")  # fmt: skip
    prompts = body.prompts()
    for prompt in prompts:
        if isinstance(prompt, list):
            check_token_ids(state, prompt, "prompt")
    # Off the event loop: a prompt may be megabytes of text. Nothing below awaits until `generate`, so
    # admission sees a consistent queue and no request slips in after a drain has begun.
    prompt_ids = await asyncio.to_thread(lambda: [encode_prompt(state.tokenizer, p) for p in prompts])
    prompt_lengths = [len(ids) for ids in prompt_ids]
    admit(state, prompt_lengths)
    params = sampling_params(body)
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    log = CompletionLog(completion_id, sum(prompt_lengths), body.n, time.monotonic(), {})
    streams = [state.client.generate(f"{completion_id}-{i}", prompt, params, ids)
               for i, (prompt, ids) in enumerate(zip(prompts, prompt_ids, strict=True))]  # fmt: skip
    if body.stream:
        return StreamingResponse(stream_completion(state, body, log, streams), media_type="text/event-stream")
    work = asyncio.ensure_future(collect_all(state, streams, log))
    disconnect = asyncio.ensure_future(wait_for_disconnect(request))
    done, _ = await asyncio.wait({work, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    if work not in done:  # the client left: cancelling the work aborts its engine requests
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await work
        state.metrics.aborts.inc()
        log.emit(len(prompts), "abort")
        return Response(status_code=499)
    disconnect.cancel()
    try:
        finals = raise_engine_errors(work)
    except APIError as error:
        log.emit(len(prompts), cut_short(error))
        raise
    log.emit(len(prompts))
    choices = [choice(state, body, i, j, final) for i, final in enumerate(finals) for j in range(body.n)]
    return JSONResponse(CompletionResponse(id=completion_id, model=state.model_name, choices=choices,
                                           usage=usage(finals)).model_dump())  # fmt: skip


def admit(state: ServerState, prompt_lengths: list[int]) -> None:
    """Refuse a request the server should not queue now: 503 while draining, 429 over a queue limit."""
    config, client = state.config, state.client
    if client.is_dead:
        raise APIError(503, "the engine has failed", "server_error")
    if not state.accepting:
        state.metrics.rejected("shutdown")
        raise APIError(503, "the server is shutting down; retry on another replica", "server_error",
                       headers={"Retry-After": str(RETRY_AFTER_SHUTDOWN_S)})  # fmt: skip
    if client.num_requests + len(prompt_lengths) > config.max_queued_requests:
        state.metrics.rejected("requests")
        raise APIError(429, "too many requests queued; retry later", "rate_limit_error",
                       headers={"Retry-After": str(RETRY_AFTER_QUEUE_FULL_S)})  # fmt: skip
    queued = client.num_queued_tokens
    # An empty queue takes any request (the engine enforces the context length), so that a prompt larger
    # than the limit cannot be refused forever.
    if config.max_queued_tokens is not None and queued and queued + sum(prompt_lengths) > config.max_queued_tokens:
        state.metrics.rejected("tokens")
        raise APIError(429, f"too many prompt tokens queued ({queued} of {config.max_queued_tokens}); retry later",
                       "rate_limit_error", headers={"Retry-After": str(RETRY_AFTER_QUEUE_FULL_S)})  # fmt: skip


def engine_error(error: BaseException) -> APIError | None:
    """The reply to a request the engine refused or could not finish; None for any other error."""
    if isinstance(error, ValueError):
        return APIError(400, str(error), param="prompt")
    if isinstance(error, ServerShuttingDownError):
        return APIError(503, "the server shut down before this request finished; retry", "server_error",
                        headers={"Retry-After": str(RETRY_AFTER_SHUTDOWN_S)})  # fmt: skip
    if isinstance(error, EngineDeadError):
        return APIError(500, ENGINE_FAILED, "server_error")
    return None


def cut_short(error: APIError) -> str:
    """How the request log names a completion ended by `error`."""
    return "shutdown" if error.status == 503 else "error"


def raise_engine_errors(work: asyncio.Future) -> list[RequestOutput]:
    error = work.exception()
    if error is not None:
        raise engine_error(error) or error
    return work.result()


async def wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect_all(state: ServerState, streams: list, log: CompletionLog) -> list[RequestOutput]:
    async def last(prompt_index: int, stream) -> RequestOutput:
        first_at = None
        async for output in stream:
            first_at = first_at or time.monotonic()
            log.finals[prompt_index] = output
        record_finished(state, log.finals[prompt_index], log.started, first_at)
        return log.finals[prompt_index]

    return list(await asyncio.gather(*(last(i, s) for i, s in enumerate(streams))))


def record_finished(state: ServerState, final: RequestOutput, started: float, first_at: float | None) -> None:
    metrics, now = state.metrics, time.monotonic()
    generated = sum(len(o.token_ids) for o in final.outputs)
    metrics.prompt_tokens.inc(len(final.prompt_token_ids))
    metrics.generation_tokens.inc(generated)
    metrics.prompt_length.observe(len(final.prompt_token_ids))
    metrics.generation_length.observe(generated)
    metrics.e2e.observe(now - started)
    if first_at is not None:
        metrics.ttft.observe(first_at - started)
        if generated > 1:
            metrics.inter_token.observe((now - first_at) / (generated - 1))
    for output in final.outputs:
        metrics.finished(output.finish_reason or "abort")


def usage(finals: list[RequestOutput]) -> Usage:
    prompt = sum(len(f.prompt_token_ids) * len(f.outputs) for f in finals)
    completion = sum(len(o.token_ids) for f in finals for o in f.outputs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def logprobs_of(state: ServerState, tokens: list[int], values: list[float], top: list) -> LogProbs:
    pieces = [state.tokenizer.decode([t], skip_special_tokens=False) for t in tokens]
    offsets, position = [], 0
    for piece in pieces:
        offsets.append(position)
        position += len(piece)
    top_dicts = [{state.tokenizer.decode([t], skip_special_tokens=False): v for t, v in row} for row in top]
    return LogProbs(tokens=pieces, token_logprobs=values, top_logprobs=top_dicts or None, text_offset=offsets)


def choice(state: ServerState, body: CompletionRequest, prompt_index: int, index: int, final: RequestOutput,
           text: str | None = None, start: int = 0, end: int | None = None) -> CompletionChoice:  # fmt: skip
    output = final.outputs[index]
    text = output.text if text is None else text
    if body.echo and start == 0:
        text = (final.prompt or state.tokenizer.decode(final.prompt_token_ids)) + text
    logprobs = None
    if body.logprobs is not None:
        stop = len(output.token_ids) if end is None else end
        logprobs = logprobs_of(state, output.token_ids[start:stop], output.logprobs[start:stop],
                               output.top_logprobs[start:stop])  # fmt: skip
    finish = output.finish_reason if end is None or end == len(output.token_ids) else None
    return CompletionChoice(index=prompt_index * body.n + index, text=text, logprobs=logprobs, finish_reason=finish)


async def stream_completion(state: ServerState, body: CompletionRequest, log: CompletionLog,
                            streams: list) -> AsyncIterator[str]:  # fmt: skip
    """SSE: one chunk per completion per step with its new text; then usage (if asked) and [DONE]. A failure
    (the engine's, or a shutdown that cannot wait) sends an error event in the OpenAI envelope, then [DONE]."""
    merged: asyncio.Queue = asyncio.Queue()
    sent = [[0] * body.n for _ in streams]
    completion_id, cut_short = log.completion_id, "abort"

    async def pump(prompt_index: int, stream) -> None:
        first_at = None
        try:
            async for output in stream:
                first_at = first_at or time.monotonic()
                await merged.put((prompt_index, output))
                if output.finished:
                    record_finished(state, output, log.started, first_at)
        except Exception as error:
            await merged.put((prompt_index, error))
        finally:
            await merged.put((prompt_index, None))

    def event(payload: dict) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    finals = log.finals
    try:
        remaining = len(streams)
        while remaining:
            prompt_index, item = await merged.get()
            if item is None:
                remaining -= 1
                continue
            if isinstance(item, Exception):
                error, cut_short = stream_error(item)
                yield event(error.model_dump())
                break
            finals[prompt_index] = item
            choices = []
            for index, output in enumerate(item.outputs):
                start = sent[prompt_index][index]
                if item.new_text[index] or len(output.token_ids) > start or output.finished:
                    choices.append(choice(state, body, prompt_index, index, item, text=item.new_text[index],
                                          start=start, end=len(output.token_ids)))  # fmt: skip
                    sent[prompt_index][index] = len(output.token_ids)
            if choices:
                chunk = CompletionResponse(id=completion_id, model=state.model_name, choices=choices)
                yield event(chunk.model_dump(exclude={"usage"}))
        else:
            if body.stream_options and body.stream_options.include_usage:
                ordered = [finals[i] for i in sorted(finals)]
                final = CompletionResponse(id=completion_id, model=state.model_name, choices=[], usage=usage(ordered))
                yield event(final.model_dump())
        yield "data: [DONE]\n\n"
    finally:
        if len(finals) < len(streams) or not all(f.finished for f in finals.values()):
            state.metrics.aborts.inc()
        log.emit(len(streams), cut_short)
        for task in tasks:
            task.cancel()


def stream_error(error: Exception) -> tuple[ErrorResponse, str]:
    """The SSE error event for a failed stream (internals stay in the server log: any other error reads as
    the engine's failure), and how the request log names the cut."""
    reply = engine_error(error) or APIError(500, ENGINE_FAILED, "server_error")
    return error_envelope(reply.status, reply.message, reply.kind, reply.param), cut_short(reply)
