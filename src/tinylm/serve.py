"""`tinylm serve`: an OpenAI-compatible HTTP API for one model, and a playground page, on localhost.

    POST /v1/completions        {"model", "prompt" (a string, a list of them, a list of token ids or a list of such
                                lists: one batch), "n", "echo", "logprobs" (0-5), "stream", "stream_options"} and the
                                sampling fields: SampleConfig's under OpenAI's names (see REQUEST_FIELDS)
    POST /v1/chat/completions   the same with "messages" (content a string or a list of text parts; roles system,
                                developer, user, assistant) instead of "prompt", rendered with the model's chat template
                                (a plain language model continues the messages' texts joined), "logprobs" (true or
                                false) and "top_logprobs" (0-20) instead of "echo" and "logprobs"
    GET  /v1/models, GET /health, GET / (the playground, completion or chat: static HTML and JavaScript, nothing
                                fetched from elsewhere, starting from the run's `sample` settings)
    GET /tokenizer_info, POST /tokenize, POST /detokenize   vLLM's tokenizer endpoints (what lm-eval's
                                `local-completions` looks for), in the model's own tokenizer

`"stream": true` answers with server-sent events, one chunk per piece of text, then `data: [DONE]`. The model runs in a
worker thread per request, which looks at a cancel flag before every token: a client that goes away (a stream closed,
or a plain request abandoned) stops its generation within a token and frees its slot. Requests beyond the concurrency
limit get 429 at once rather than queueing unseen. Every field the server does not know is refused with a 400 that
names it, except `user` and `metadata`, which cannot change an answer. Every error is an OpenAI-style body:
{"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import secrets
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from importlib.resources import files
from itertools import chain
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from tinylm.config import API_KEY_VARIABLE, SampleConfig, ServeLimits, check_sample_config, field_docs
from tinylm.errors import TinylmError
from tinylm.generate import Piece, check_logit_bias, check_scorable, encode_prompt, prompt_logprobs
from tinylm.run import Run, load

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from pydantic import AliasChoices, BaseModel, ConfigDict, Field, create_model
    from starlette.exceptions import HTTPException
except ImportError:
    raise TinylmError("tinylm serve needs FastAPI and uvicorn: pip install 'tinylm[serve]'") from None

PLAYGROUND = files("tinylm") / "playground.html"
__all__ = ["REQUEST_FIELDS", "ServeLimits", "create_app", "serve"]

DISCONNECT_POLL_S = 0.25
"""How often a plain (not streamed) request looks whether its client is still there."""


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
    "presence_penalty": (("presence_penalty",), 0.0),
    "frequency_penalty": (("frequency_penalty",), 0.0),
    "logit_bias": (("logit_bias",), None),  # none
    "top_k": (("top_k",), None),  # every token, as OpenAI samples
    "min_p": (("min_p",), 0.0),
    "repetition_penalty": (("repetition_penalty",), 1.0),
}
COMPLETION_MAX_TOKENS = 16
"""OpenAI's max_tokens when a completion request gives none."""
IGNORED_FIELDS = ("user", "metadata")
"""Request fields that cannot change an answer: accepted and ignored. Any other unknown field is refused."""


class Strict(BaseModel):
    """A part of a request: a field it does not declare is refused (a 400 that names it), never ignored."""

    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: bool = False
    """A last chunk, before [DONE], with the request's token counts and no choices."""


class RequestBase(Strict):
    """What both endpoints accept besides their prompt and the sampling fields."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    user: str | None = None
    metadata: dict[str, str] | None = None


def sampling_request_fields() -> dict[str, Any]:
    """SampleConfig's fields as pydantic fields under their OpenAI names, with their docstrings as descriptions."""
    hints, docs = get_type_hints(SampleConfig), field_docs(SampleConfig)
    left_out_is_none = {"max_new_tokens": int | None, "stop": str | list[str] | None, "logit_bias": hints["logit_bias"]}
    hints |= {name: hint | None for name, hint in left_out_is_none.items()}  # None: the defaults above
    return {
        name: (hints[name], Field(default, validation_alias=AliasChoices(*aliases), description=docs[name]))
        for name, (aliases, default) in REQUEST_FIELDS.items()
    }


SamplingFields = create_model("SamplingFields", __base__=RequestBase, **sampling_request_fields())


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    """The prompt before its continuation, in the text and (with logprobs) in the log-probabilities."""
    logprobs: int | None = Field(None, ge=0, le=5)
    """Each token's log-probability and the log-probabilities of this many likeliest tokens at its position."""


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class TokenizeRequest(Strict):
    prompt: str
    add_special_tokens: bool = False  # tinylm's tokenizers add none either way


class DetokenizeRequest(Strict):
    tokens: list[int]


class RequireAPIKey:
    """ASGI middleware: 401 for a request without `Authorization: Bearer <api_key>`, except the health check and the
    playground page (whose own requests send the key the user types in). Plain ASGI, not Starlette's
    BaseHTTPMiddleware, so streams and disconnects pass through untouched."""

    OPEN_PATHS = ("/", "/health")

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                message = "this server needs an API key: send the header `Authorization: Bearer KEY`"
                await error_response(401, message, code="invalid_api_key")(scope, receive, send)
                return
        await self.app(scope, receive, send)


REQUEST_MODELS = (CompletionRequest, ChatRequest, ChatMessage, TextPart, StreamOptions, TokenizeRequest)
UNION_FIELDS = {
    name
    for model in REQUEST_MODELS
    for field_name, info in model.model_fields.items()
    if get_origin(info.annotation) in (Union, UnionType)
    and len([kind for kind in get_args(info.annotation) if kind is not type(None)]) > 1
    for name in (field_name, *getattr(info.validation_alias, "choices", ()))
}
"""Fields that take one of several forms (prompt, stop, content): pydantic reports a value that fits none of them
once per form."""


def describe_invalid(errors: list[dict]) -> tuple[str, str]:
    """(the field, a one-line message) for pydantic's errors about a request body. A value that fits none of a union's
    forms (a prompt of [["a"]]) is reported once, with the forms it may take, not as one error per form."""
    first = errors[0]
    parts = [part for part in first.get("loc", ()) if part != "body"]
    union = next((i + 1 for i, part in enumerate(parts[:-1]) if part in UNION_FIELDS), None)
    if union is None:
        where = ".".join(map(str, parts))
        if first.get("type") == "extra_forbidden":
            return where, f"{where}: this server does not support this field; leave it out"
        return where, f"{where or 'the request body'}: {first.get('msg')}"
    where, prefix = ".".join(map(str, parts[:union])), ("body", *parts[:union])
    forms = dict.fromkeys(e["loc"][len(prefix)] for e in errors if tuple(e["loc"][: len(prefix)]) == prefix)
    return where, f"{where} must be {' or '.join(map(str, forms))}, not {json.dumps(first.get('input'))[:200]}"


def create_app(
    run: Run, limits: ServeLimits | None = None, model_name: str | None = None, api_key: str | None = None
) -> FastAPI:
    """The server's FastAPI app. With `api_key`, every request but /health and the playground page itself needs
    `Authorization: Bearer <api_key>`."""
    limits = limits or ServeLimits()
    model_name = model_name or run.path.name
    tokenizer, vocab_size = run.tokenizer, run.model.config.vocab_size
    # A hub name or a packaged model has no folder of its own to date it by.
    created = int(run.path.stat().st_mtime) if run.path.exists() else int(time.time())
    app = FastAPI(title="tinylm", docs_url=None, redoc_url=None)
    # A thread's semaphore, not asyncio's: the worker thread gives its slot back itself, whether or not the event loop
    # that started it is still there to be told (a test client's loop may close first).
    slots = threading.BoundedSemaphore(limits.max_concurrent)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error_response(error.status, error.message, error.param, error.code)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        errors = error.errors()
        if errors[0].get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON", code="invalid_json")
        where, message = describe_invalid(errors)
        code = "unsupported_field" if errors[0].get("type") == "extra_forbidden" else None
        return error_response(400, message, param=where or None, code=code)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail))

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        return error_response(500, f"the server failed: {type(error).__name__}: {error}")

    if api_key:
        app.add_middleware(RequireAPIKey, api_key=api_key)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "tinylm"}
        return {"object": "list", "data": [card]}

    page = PLAYGROUND.read_text().replace("{{ sampling }}", playground_settings(run, limits, bool(api_key)))

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> str:
        return page

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        eos = tokenizer.decode([tokenizer.end_of_text])
        return {"eos_token": eos, "bos_token": None, "pad_token": None, "model_max_length": run.model.config.block_size}

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> dict:
        try:
            tokens = tokenizer.encode(request.prompt)
        except TinylmError as error:
            raise APIError(400, f"prompt: {error}", "prompt") from None
        return {"tokens": tokens, "count": len(tokens), "max_model_len": run.model.config.block_size}

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> dict:
        return {"prompt": tokenizer.decode(checked_ids(request.tokens, "tokens"))}

    def sampling_for(request: SamplingFields, max_tokens_left_out: int) -> SampleConfig:
        if request.model != model_name:
            raise APIError(404, f"the model '{request.model}' does not exist; this server has '{model_name}'",
                           "model", "model_not_found")  # fmt: skip
        if request.stream_options is not None and not request.stream:
            raise APIError(400, "stream_options needs stream: true", "stream_options")
        values = request.model_dump(include=set(REQUEST_FIELDS))
        if values["max_new_tokens"] is None:
            values["max_new_tokens"] = max_tokens_left_out
        if values["max_new_tokens"] > limits.max_tokens:
            raise APIError(400, f"max_tokens must be at most {limits.max_tokens} on this server, not "
                           f"{values['max_new_tokens']}", "max_tokens")  # fmt: skip
        stop = values["stop"]
        values["stop"] = [stop] if isinstance(stop, str) else stop or []
        if len(values["stop"]) > limits.max_stop or any(len(s) > limits.max_stop_chars for s in values["stop"]):
            raise APIError(400, f"stop takes at most {limits.max_stop} strings of at most {limits.max_stop_chars} "
                           "characters on this server", "stop")  # fmt: skip
        values["logit_bias"] = values["logit_bias"] or {}
        sampling = SampleConfig(**values)
        try:
            check_sample_config(sampling)
            check_logit_bias(sampling, vocab_size)
        except TinylmError as error:
            message = str(error).replace("max_new_tokens", "max_tokens")  # the request's name for it
            raise APIError(400, message, message.split()[0]) from None  # each message opens with the field's name
        return sampling

    def checked_ids(ids: list[int], param: str) -> list[int]:
        outside = [token for token in ids if not 0 <= token < vocab_size]
        if outside:
            raise APIError(400, f"{param}: token id {outside[0]} is outside the vocabulary (0 to {vocab_size - 1})",
                           param)  # fmt: skip
        return ids

    def checked_prompt(ids: list[int]) -> list[int]:
        if not ids:
            raise APIError(400, "prompt is empty; give at least one token", "prompt")
        if len(ids) > limits.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this server takes at most "
                           f"{limits.max_prompt_tokens}", "prompt", "context_length_exceeded")  # fmt: skip
        return checked_ids(ids, "prompt")

    def checked_batch(prompts: list[list[int]], n: int, sampling: SampleConfig) -> None:
        texts = len(prompts) * n
        if texts > limits.max_batch:
            raise APIError(400, f"this request asks for {texts} texts (prompts x n); this server generates at most "
                           f"{limits.max_batch} per request", "n")  # fmt: skip
        work = n * sum(len(prompt) + sampling.max_new_tokens for prompt in prompts)
        if work > limits.max_batch_tokens:
            raise APIError(400, f"this request holds {work} tokens (prompts and max_tokens, times n); this server "
                           f"takes at most {limits.max_batch_tokens}: lower max_tokens or n, or split the prompts",
                           "max_tokens")  # fmt: skip

    async def pieces_of(
        produce: Callable[[threading.Event], Iterator[Piece]], client: Request | None
    ) -> AsyncIterator[Piece]:
        """Run `produce(cancel)` in a worker thread under the concurrency limit and give its pieces as they come. When
        this iterator is closed early (a stream's client went away) or `client` disconnects (looked at every
        DISCONNECT_POLL_S), the cancel flag stops the model at its next token; the slot is free once it has stopped."""
        if not slots.acquire(blocking=False):
            raise APIError(429, f"the server is busy with {limits.max_concurrent} requests; retry shortly")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Piece | Exception | None] = asyncio.Queue()
        cancel = threading.Event()

        def on_the_loop(callback: Callable, *args) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed (the server stopped): nobody is waiting
                loop.call_soon_threadsafe(callback, *args)

        def work() -> None:
            end: Exception | None = None
            try:
                for piece in produce(cancel):
                    on_the_loop(queue.put_nowait, piece)
            except Exception as error:
                end = error
            finally:
                slots.release()  # before the answer ends: a client's next request finds its slot free
            on_the_loop(queue.put_nowait, end)

        # Started here, not when the pieces are first asked for, so that the slot is given back even if they never are.
        threading.Thread(target=work, name="tinylm-generate", daemon=True).start()

        async def gen() -> AsyncIterator[Piece]:
            getter, looked = None, time.monotonic()
            try:
                while True:
                    getter = getter or asyncio.ensure_future(queue.get())
                    done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
                    if client is not None and time.monotonic() - looked >= DISCONNECT_POLL_S:
                        if await client.is_disconnected():
                            return
                        looked = time.monotonic()
                    if not done:
                        continue
                    item, getter = getter.result(), None
                    if item is None:
                        return
                    if isinstance(item, Exception):
                        raise item
                    yield item
            finally:
                cancel.set()
                if getter is not None:
                    getter.cancel()

        return gen()

    async def respond(
        pieces: AsyncIterator[Piece],
        stream: bool,
        chunk: Callable[[Piece], dict],
        final: Callable[[list[Piece]], dict],
        usage_chunk: Callable[[list[Piece]], dict] | None,
    ) -> JSONResponse | StreamingResponse:
        """SSE chunks when streaming (and the usage chunk last, if asked for), else one JSON body of every piece."""
        if not stream:
            return JSONResponse(final([piece async for piece in pieces]))

        async def events() -> AsyncIterator[str]:
            collected = []
            try:
                async for piece in pieces:
                    collected.append(piece)
                    yield f"data: {json.dumps(chunk(piece))}\n\n"
                if usage_chunk:
                    yield f"data: {json.dumps(usage_chunk(collected))}\n\n"
                yield "data: [DONE]\n\n"
            except Exception as error:  # the status line is sent already: report the failure in the stream
                failure = {"message": f"the server failed: {type(error).__name__}: {error}", "type": "server_error"}
                yield f"data: {json.dumps({'error': failure})}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def usage_chunk_of(request: SamplingFields, header: dict, kind: str, prompt_tokens: int):
        """The last chunk of a stream when stream_options.include_usage asks for it: token counts, no choices."""
        if not (request.stream_options and request.stream_options.include_usage):
            return None
        return lambda pieces: {**header, "object": kind, "choices": [], "usage": usage(prompt_tokens, pieces)}

    def token_text(token: int) -> str:
        return tokenizer.decode([token])

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, http: Request):
        sampling = sampling_for(request, COMPLETION_MAX_TOKENS)
        prompt = request.prompt
        if not isinstance(prompt, list) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]  # one prompt: a string, or token ids
        if not prompt:
            raise APIError(400, "prompt is an empty list; give at least one prompt", "prompt")
        try:
            prompts = [checked_prompt(encode_prompt(tokenizer, p) if isinstance(p, str) else p) for p in prompt]
        except TinylmError as error:
            raise APIError(400, str(error), "prompt") from None
        checked_batch(prompts, request.n, sampling)
        top, n = request.logprobs, request.n
        if request.echo and top is not None:
            try:
                check_scorable(run.model, prompts)
            except TinylmError as error:
                raise APIError(400, f"echo with logprobs: {error}", "prompt") from None
        rows = [p for p in prompts for _ in range(n)]  # choice i continues prompt i // n

        def produce(cancel: threading.Event) -> Iterator[Piece]:
            echoed: Iterator[Piece] = iter(())
            if request.echo:
                scored = prompt_logprobs(run.model, prompts, top) if top is not None else None
                echoed = (
                    Piece(row, tokenizer.decode(rows[row]), 0, logprobs=scored[row // n] if scored else [])
                    for row in range(len(rows))
                )
            return chain(echoed, run.stream_ids(rows, sampling, top, cancel))

        header = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        offsets = [0] * len(rows)  # where each choice's next token starts in its text

        def logprobs_of(piece: Piece) -> dict | None:
            if top is None:
                return None
            texts = [token_text(token.id) for token in piece.logprobs]
            starts = [offsets[piece.row] + sum(len(t) for t in texts[:i]) for i in range(len(texts))]
            offsets[piece.row] += sum(len(t) for t in texts)
            return {
                "tokens": texts,
                "token_logprobs": [token.logprob for token in piece.logprobs],
                "top_logprobs": [
                    None if token.logprob is None else {token_text(i): value for i, value in token.top}
                    for token in piece.logprobs
                ],
                "text_offset": starts,
            }

        def choice_of(piece: Piece) -> dict:
            return {"index": piece.row, "text": piece.text, "logprobs": logprobs_of(piece),
                    "finish_reason": piece.finish_reason}  # fmt: skip

        def chunk(piece: Piece) -> dict:
            return {**header, "object": "text_completion", "choices": [choice_of(piece)]}

        def final(pieces: list[Piece]) -> dict:
            choices = [{"index": i, "text": "", "logprobs": None, "finish_reason": None} for i in range(len(rows))]
            for piece in pieces:
                choice, new = choices[piece.row], choice_of(piece)
                choice["text"] += new["text"]
                choice["finish_reason"] = new["finish_reason"]
                if new["logprobs"] is not None:
                    whole = choice["logprobs"] or {key: [] for key in new["logprobs"]}
                    choice["logprobs"] = {key: whole[key] + value for key, value in new["logprobs"].items()}
            if top is not None:  # a choice with no token at all still says so in OpenAI's form
                empty = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                for choice in choices:
                    choice["logprobs"] = choice["logprobs"] or empty
            body = {**header, "object": "text_completion", "choices": choices}
            return body | {"usage": usage(sum(len(p) for p in prompts), pieces)}

        usage_chunk = usage_chunk_of(request, header, "text_completion", sum(len(p) for p in prompts))
        pieces = await pieces_of(produce, None if request.stream else http)
        return await respond(pieces, request.stream, chunk, final, usage_chunk)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest, http: Request):
        sampling = sampling_for(request, limits.max_tokens)
        if request.top_logprobs is not None and not request.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        messages = [{"role": message.role, "content": message.text()} for message in request.messages]
        try:
            prompt = checked_prompt(run.chat_prompt(messages))
        except TinylmError as error:
            raise APIError(400, str(error), "messages") from None
        checked_batch([prompt], request.n, sampling)
        top = (request.top_logprobs or 0) if request.logprobs else None
        header = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        started = set()

        def entry(token: int, logprob: float) -> dict:
            return {"token": token_text(token), "logprob": logprob, "bytes": list(tokenizer.token_bytes(token))}

        def logprobs_of(piece: Piece) -> dict | None:
            if top is None:
                return None
            content = [
                entry(t.id, t.logprob) | {"top_logprobs": [entry(i, value) for i, value in t.top]}
                for t in piece.logprobs
            ]
            return {"content": content}

        def chunk(piece: Piece) -> dict:
            delta = {"content": piece.text} if piece.text else {}
            if piece.row not in started:  # the first chunk of a choice names the role, as OpenAI's do
                started.add(piece.row)
                delta = {"role": "assistant", **delta}
            choice = {"index": piece.row, "delta": delta, "logprobs": logprobs_of(piece),
                      "finish_reason": piece.finish_reason}  # fmt: skip
            return {**header, "object": "chat.completion.chunk", "choices": [choice]}

        def final(pieces: list[Piece]) -> dict:
            choices = [
                {"index": i, "message": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(request.n)
            ]
            for piece in pieces:
                choice = choices[piece.row]
                choice["message"]["content"] += piece.text
                choice["finish_reason"] = piece.finish_reason
                if top is not None:
                    choice["logprobs"] = {"content": (choice["logprobs"] or {"content": []})["content"]
                                          + logprobs_of(piece)["content"]}  # fmt: skip
            body = {**header, "object": "chat.completion", "choices": choices}
            return body | {"usage": usage(len(prompt), pieces)}

        def produce(cancel: threading.Event) -> Iterator[Piece]:
            return run.stream_ids([prompt] * request.n, sampling, top, cancel)

        usage_chunk = usage_chunk_of(request, header, "chat.completion.chunk", len(prompt))
        pieces = await pieces_of(produce, None if request.stream else http)
        return await respond(pieces, request.stream, chunk, final, usage_chunk)

    return app


def playground_settings(run: Run, limits: ServeLimits, needs_key: bool) -> str:
    """The playground's starting settings, as JSON: request fields from the run's `sample` section (the page is
    tinylm's own, not an OpenAI client), within this server's max_tokens, and a different text each time, as in chat;
    and whether the server asks for an API key."""
    sampling = run.sampling(seed=None)
    # The last name is the one every OpenAI endpoint takes (max_tokens).
    values = {names[-1]: getattr(sampling, field) for field, (names, _) in REQUEST_FIELDS.items()}
    values["max_tokens"] = min(values["max_tokens"], limits.max_tokens)
    page = {"request": values, "needs_key": needs_key}
    return json.dumps(page).replace("<", "\\u003c")  # inside a <script>: a stop string cannot close it


def usage(prompt_tokens: int, pieces: list[Piece]) -> dict[str, int]:
    completion_tokens = sum(piece.tokens for piece in pieces if piece.finish_reason)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may well resolve to the network
        return False


def serve(
    run_dir: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: ServeLimits | None = None,
    device: str = "auto",
    api_key: str | None = None,
    quantize: str | None = None,
) -> None:
    """Load the model (anything `tinylm.load` takes; `quantize` as for it) and answer HTTP requests until
    interrupted. Without `api_key`, the key in $TINYLM_API_KEY, if any, is asked of every request."""
    import uvicorn

    api_key = api_key or os.environ.get(API_KEY_VARIABLE) or None
    run = load(run_dir, device, quantize)
    if not api_key and not is_loopback(host):
        print(f"tinylm: warning: {host} lets other machines in, and no API key is set: anyone who reaches this port "
              f"can use the model. Give --api-key KEY (or ${API_KEY_VARIABLE}).", file=sys.stderr)  # fmt: skip
    print(f"tinylm: serving {run.path} as '{run.path.name}' on http://{host}:{port}/ (playground at /, API at /v1)")
    uvicorn.run(create_app(run, limits, api_key=api_key), host=host, port=port, log_level="warning")
