"""`tinylm serve`: an OpenAI-compatible HTTP API for one model, and a playground page, on localhost.

    POST /v1/completions        {"model", "prompt" (a string or a list: one batch), "stream", "n" (1)} and the
                                sampling fields: SampleConfig's under OpenAI's names ("max_tokens", "temperature",
                                "top_p", "stop", "seed", and tinylm's own "top_k", "min_p", "repetition_penalty"; see
                                REQUEST_FIELDS)
    POST /v1/chat/completions   the same with "messages" instead of "prompt", rendered with the model's chat template
                                (a plain language model continues the messages' texts joined)
    GET  /v1/models, GET /health, GET / (the playground: static HTML and JavaScript, nothing fetched from elsewhere,
                                starting from the run's `sample` settings)

`"stream": true` answers with server-sent events, one chunk per piece of text, then `data: [DONE]`. The model runs in
worker threads, so the event loop keeps answering (health checks, other streams) while it computes. Requests beyond
the concurrency limit get 429 at once rather than queueing unseen; prompts and max_tokens beyond their limits, and
sampling values `check_sample_config` refuses, get 400.
Every error is an OpenAI-style body: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, get_type_hints

from tinylm.config import SampleConfig, check_sample_config, field_docs
from tinylm.errors import TinylmError
from tinylm.generate import Piece, encode_prompt
from tinylm.run import Run, load

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from pydantic import AliasChoices, BaseModel, Field, create_model
    from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
    from starlette.exceptions import HTTPException
except ImportError:
    raise TinylmError("tinylm serve needs FastAPI and uvicorn: pip install 'tinylm[serve]'") from None

PLAYGROUND = files("tinylm") / "playground.html"


@dataclass
class ServeLimits:
    max_prompt_tokens: int = 4096
    """Longest prompt accepted, in tokens (a longer one is answered 400)."""
    max_tokens: int = 1024
    """Most tokens one request may ask for."""
    max_concurrent: int = 4
    """Requests generating at once; more are answered 429."""


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "rate_limit_error" if status == 429 else "server_error" if status >= 500 else "invalid_request_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


# How a request's fields map onto SampleConfig's, which give their types, meaning and check (`check_sample_config`):
# SampleConfig field -> (the request's names for it, the first winning when both come; its default when left out).
# A field the request leaves out takes OpenAI's default where OpenAI defines one, so an OpenAI client gets what it
# expects (not the run's `sample` section, which the playground offers instead); tinylm's own fields default to off.
REQUEST_FIELDS: dict[str, tuple[tuple[str, ...], Any]] = {
    "max_new_tokens": (("max_completion_tokens", "max_tokens"), None),  # 16 on /v1/completions, --max-tokens on chats
    "temperature": (("temperature",), 1.0),
    "top_p": (("top_p",), 1.0),
    "stop": (("stop",), None),  # a string or a list of them
    "seed": (("seed",), None),  # a different text each time
    "top_k": (("top_k",), None),  # every token, as OpenAI samples
    "min_p": (("min_p",), 0.0),
    "repetition_penalty": (("repetition_penalty",), 1.0),
}
COMPLETION_MAX_TOKENS = 16
"""OpenAI's max_tokens when a completion request gives none."""


class RequestBase(BaseModel):
    """What both endpoints accept besides their prompt and the sampling fields."""

    model: str
    stream: bool = False
    n: int = 1


def sampling_request_fields() -> dict[str, Any]:
    """SampleConfig's fields as pydantic fields under their OpenAI names, with their docstrings as descriptions."""
    hints, docs = get_type_hints(SampleConfig), field_docs(SampleConfig)
    hints |= {"max_new_tokens": int | None, "stop": str | list[str] | None}  # left out: the defaults above
    return {
        name: (hints[name], Field(default, validation_alias=AliasChoices(*aliases), description=docs[name]))
        for name, (aliases, default) in REQUEST_FIELDS.items()
    }


SamplingFields = create_model("SamplingFields", __base__=RequestBase, **sampling_request_fields())


class CompletionRequest(SamplingFields):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)


def create_app(run: Run, limits: ServeLimits | None = None, model_name: str | None = None) -> FastAPI:
    limits = limits or ServeLimits()
    model_name = model_name or run.path.name
    # A hub name or a packaged model has no folder of its own to date it by.
    created = int(run.path.stat().st_mtime) if run.path.exists() else int(time.time())
    app = FastAPI(title="tinylm", docs_url=None, redoc_url=None)
    generating = asyncio.Semaphore(limits.max_concurrent)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error_response(error.status, error.message, error.param, error.code)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON", code="invalid_json")
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        return error_response(400, f"{where}: {first.get('msg')}", param=where or None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail))

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        return error_response(500, f"the server failed: {type(error).__name__}: {error}")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "tinylm"}
        return {"object": "list", "data": [card]}

    page = PLAYGROUND.read_text().replace("{{ sampling }}", playground_sampling(run, limits))

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> str:
        return page

    def sampling_for(request: SamplingFields, max_tokens_left_out: int) -> SampleConfig:
        if request.model != model_name:
            raise APIError(404, f"the model '{request.model}' does not exist; this server has '{model_name}'",
                           "model", "model_not_found")  # fmt: skip
        if request.n != 1:
            raise APIError(400, "n must be 1: ask again for another sample", "n")
        values = request.model_dump(include=set(REQUEST_FIELDS))
        if values["max_new_tokens"] is None:
            values["max_new_tokens"] = max_tokens_left_out
        if values["max_new_tokens"] > limits.max_tokens:
            raise APIError(400, f"max_tokens must be at most {limits.max_tokens} on this server, not "
                           f"{values['max_new_tokens']}", "max_tokens")  # fmt: skip
        stop = values["stop"]
        values["stop"] = [stop] if isinstance(stop, str) else stop or []
        sampling = SampleConfig(**values)
        try:
            check_sample_config(sampling)
        except TinylmError as error:
            message = str(error).replace("max_new_tokens", "max_tokens")  # the request's name for it
            raise APIError(400, message, message.split()[0]) from None  # each message opens with the field's name
        return sampling

    def checked_prompt(ids: list[int]) -> list[int]:
        if len(ids) > limits.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this server takes at most "
                           f"{limits.max_prompt_tokens}", "prompt", "context_length_exceeded")  # fmt: skip
        return ids

    async def respond(
        prompts: list[list[int]], sampling: SampleConfig, stream: bool, chunk, final
    ) -> JSONResponse | StreamingResponse:
        """Generate under the concurrency limit: SSE chunks when streaming, else one JSON body."""
        if generating.locked():
            raise APIError(429, f"the server is busy with {limits.max_concurrent} requests; retry shortly")
        await generating.acquire()
        pieces = run.stream_ids(prompts, sampling)
        prompt_tokens = sum(len(p) for p in prompts)
        if not stream:
            try:
                collected = await run_in_threadpool(list, pieces)
            finally:
                generating.release()
            return JSONResponse(final(collected, prompt_tokens))

        async def events() -> AsyncIterator[str]:
            try:
                async for piece in iterate_in_threadpool(pieces):
                    yield f"data: {json.dumps(chunk(piece))}\n\n"
                yield "data: [DONE]\n\n"
            except Exception as error:  # the status line is sent already: report the failure in the stream
                failure = {"message": f"the server failed: {type(error).__name__}: {error}", "type": "server_error"}
                yield f"data: {json.dumps({'error': failure})}\n\n"
            finally:
                generating.release()

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):
        sampling = sampling_for(request, COMPLETION_MAX_TOKENS)
        texts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if not texts:
            raise APIError(400, "prompt is an empty list; give at least one prompt", "prompt")
        try:
            prompts = [checked_prompt(encode_prompt(run.tokenizer, text)) for text in texts]
        except TinylmError as error:
            raise APIError(400, str(error), "prompt") from None
        header = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}

        def chunk(piece: Piece) -> dict:
            choice = {"index": piece.row, "text": piece.text, "logprobs": None, "finish_reason": piece.finish_reason}
            return {**header, "object": "text_completion", "choices": [choice]}

        def final(pieces: list[Piece], prompt_tokens: int) -> dict:
            choices = [{"index": i, "text": "", "logprobs": None, "finish_reason": None} for i in range(len(texts))]
            for piece in pieces:
                choices[piece.row]["text"] += piece.text
                choices[piece.row]["finish_reason"] = piece.finish_reason
            body = {**header, "object": "text_completion", "choices": choices}
            return body | {"usage": usage(prompt_tokens, pieces)}

        return await respond(prompts, sampling, request.stream, chunk, final)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest):
        sampling = sampling_for(request, limits.max_tokens)
        messages = [message.model_dump() for message in request.messages]
        try:
            prompt = checked_prompt(run.chat_prompt(messages))
        except TinylmError as error:
            raise APIError(400, str(error), "messages") from None
        header = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        started = set()

        def chunk(piece: Piece) -> dict:
            delta = {"content": piece.text} if piece.text else {}
            if piece.row not in started:  # the first chunk names the role, as OpenAI's do
                started.add(piece.row)
                delta = {"role": "assistant", **delta}
            choice = {"index": 0, "delta": delta, "finish_reason": piece.finish_reason}
            return {**header, "object": "chat.completion.chunk", "choices": [choice]}

        def final(pieces: list[Piece], prompt_tokens: int) -> dict:
            message = {"role": "assistant", "content": "".join(piece.text for piece in pieces)}
            choice = {"index": 0, "message": message, "finish_reason": pieces[-1].finish_reason if pieces else None}
            body = {**header, "object": "chat.completion", "choices": [choice]}
            return body | {"usage": usage(prompt_tokens, pieces)}

        return await respond([prompt], sampling, request.stream, chunk, final)

    return app


def playground_sampling(run: Run, limits: ServeLimits) -> str:
    """The playground's starting settings, as request fields in JSON: the run's `sample` section (the page is
    tinylm's own, not an OpenAI client), within this server's max_tokens, and a different text each time, as in chat."""
    sampling = run.sampling(seed=None)
    # The last name is the one every OpenAI endpoint takes (max_tokens).
    values = {names[-1]: getattr(sampling, field) for field, (names, _) in REQUEST_FIELDS.items()}
    values["max_tokens"] = min(values["max_tokens"], limits.max_tokens)
    return json.dumps(values).replace("<", "\\u003c")  # inside a <script>: a stop string cannot close it


def usage(prompt_tokens: int, pieces: list[Piece]) -> dict[str, int]:
    completion_tokens = sum(piece.tokens for piece in pieces if piece.finish_reason)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def serve(
    run_dir: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: ServeLimits | None = None,
    device: str = "auto",
    quantize: str | None = None,
) -> None:
    """Load the model (anything `tinylm.load` takes; `quantize` as for it) and answer HTTP requests until
    interrupted."""
    import uvicorn

    run = load(run_dir, device, quantize)
    print(f"tinylm: serving {run.path} as '{run.path.name}' on http://{host}:{port}/ (playground at /, API at /v1)")
    uvicorn.run(create_app(run, limits), host=host, port=port, log_level="warning")
