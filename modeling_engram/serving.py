"""`engram-serve MODEL`: an OpenAI-compatible server for Engram models (`/v1/models`, `/v1/completions`,
`/v1/chat/completions`, streamed as server-sent events or not).

Why not transformers' own server: `transformers serve` (transformers/cli/serving/model_manager.py, 5.25) loads a model
by `getattr(transformers, config.architectures[0])`, and `EngramForCausalLM` is not an attribute of transformers
("module transformers has no attribute EngramForCausalLM"), with or without `--trust-remote-code`; its continuous
batching would be refused anyway (the paged cache has no slot for Engram's state). So this is a small FastAPI app
around `generate`, with dynamic batching (batching.py): concurrent requests run as one left-padded batch, which is
exact for Engram, and never mix.

A helper of the package, never exported with a model; it needs the `serve` extra (fastapi, uvicorn).
"""

import argparse
import asyncio
import contextlib
import json
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .batching import BatchingEngine, Delta, Failed, Finished, GenerationRequest, SamplingParams

MAX_STOP_STRINGS = 4  # as OpenAI's API


class ApiError(Exception):
    """A request the server refuses: answered with `status` and OpenAI's error JSON, naming the problem."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


class SamplingFields(BaseModel):
    """The fields both endpoints share. Unknown fields are ignored; known ones this server cannot honour are refused."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Any] | None = None


def refuse_unsupported(body: SamplingFields) -> None:
    unsupported = {
        "n": body.n != 1,
        "logprobs": body.logprobs not in (None, False),
        "presence_penalty": body.presence_penalty != 0,
        "frequency_penalty": body.frequency_penalty != 0,
        "logit_bias": bool(body.logit_bias),
        "echo": getattr(body, "echo", False),
        "best_of": getattr(body, "best_of", None) not in (None, 1),
        "suffix": getattr(body, "suffix", None) is not None,
        "tools": bool(getattr(body, "tools", None)),
    }
    for name, given in unsupported.items():
        if given:
            raise ApiError(400, f"{name} is not supported by engram-serve (given {getattr(body, name)!r}).", name,
                           "unsupported_parameter")


def stop_strings(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
        raise ApiError(400, f"stop takes at most {MAX_STOP_STRINGS} non-empty strings; got {stops!r}.", "stop")
    return stops


class EngramServer:
    """The model, its tokenizer and the batching engine, as the endpoints use them."""

    def __init__(self, model, tokenizer, model_name: str, max_model_len: int | None = None, max_batch_size: int = 32,
                 batch_wait: float = 0.02):
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.max_model_len = max_model_len or getattr(model.config, "max_position_embeddings", None) or 2048
        self.vocab_size = model.config.vocab_size
        self.engine = BatchingEngine(model, tokenizer, max_batch_size=max_batch_size, batch_wait=batch_wait)
        self.created = int(time.time())

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise ApiError(404, f"The model {name!r} does not exist; this server serves {self.model_name!r}.",
                           "model", "model_not_found")

    def sampling_params(self, body: SamplingFields, max_tokens: int | None, prompt_len: int) -> SamplingParams:
        """The request's parameters; unset ones default to the model's generation config (greedy unless it samples)."""
        config = self.model.generation_config
        sampling = bool(config.do_sample)
        temperature = body.temperature if body.temperature is not None else (config.temperature or 1.0) * sampling
        top_p = body.top_p if body.top_p is not None else (config.top_p or 1.0) if sampling else 1.0
        top_k = (config.top_k or None) if sampling and body.temperature is None else None
        room = self.max_model_len - prompt_len
        if (max_tokens or 1) > room:
            asked = f" and max_tokens asks for {max_tokens} more" if max_tokens is not None else ", no room for more"
            raise ApiError(400, f"This model's maximum context length is {self.max_model_len} tokens; the prompt has "
                                f"{prompt_len} tokens{asked}.", "max_tokens" if prompt_len < self.max_model_len
                           else "prompt", "context_length_exceeded")
        return SamplingParams(max_tokens=max_tokens or room, temperature=temperature, top_p=top_p, top_k=top_k,
                              seed=body.seed, stop=stop_strings(body.stop))

    def check_ids(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise ApiError(400, f"{param} is empty: give at least one token.", param)
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ApiError(400, f"{param} holds token id {bad[0]}, outside the vocabulary [0, {self.vocab_size - 1}].",
                           param)
        return ids

    def completion_prompts(self, body: CompletionRequest) -> list[list[int]]:
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise ApiError(400, "prompt is empty.", "prompt")
        ids = [p if isinstance(p, list) else self.tokenizer(p)["input_ids"] for p in prompt]
        return [self.check_ids(p, "prompt") for p in ids]

    def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, f"The tokenizer of {self.model_name!r} has no chat template, so chat requests cannot be "
                                "formatted; use /v1/completions, or save a tokenizer with a chat_template.",
                           "messages", "no_chat_template")
        messages = []
        for message in body.messages:
            content = message.content
            if isinstance(content, list):
                if any(part.get("type") != "text" for part in content):
                    raise ApiError(400, "messages may only hold text content parts.", "messages")
                content = "".join(part.get("text", "") for part in content)
            messages.append({"role": message.role, "content": content or ""})
        try:
            encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                         return_dict=True)
        except Exception as error:  # the template's own checks (roles, order) raise jinja errors
            raise ApiError(400, f"the chat template refused the messages: {error}", "messages") from None
        return self.check_ids(list(encoded["input_ids"]), "messages")

    def submit(self, prompts: list[list[int]], body: SamplingFields, max_tokens: int | None):
        """Queue one engine request per prompt; returns (requests, event queue of (choice index, event))."""
        params = [self.sampling_params(body, max_tokens, len(ids)) for ids in prompts]  # all checked before any runs
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        requests = []
        for index, (ids, request_params) in enumerate(zip(prompts, params)):
            def emit(event, index=index):
                loop.call_soon_threadsafe(events.put_nowait, (index, event))

            requests.append(GenerationRequest(ids, request_params, emit))
        for request in requests:
            try:
                self.engine.submit(request)
            except RuntimeError as error:
                raise ApiError(503, str(error)) from None
        return requests, events

    async def events(self, requests, events) -> AsyncIterator[tuple[int, Delta | Finished]]:
        """Every request's events until all have finished; cancels them all if the caller stops early."""
        pending = len(requests)
        try:
            while pending:
                index, event = await events.get()
                if isinstance(event, Failed):
                    raise ApiError(503 if "shutting down" in str(event.error) else 500,
                                   f"generation failed: {event.error}")
                pending -= isinstance(event, Finished)
                yield index, event
        finally:
            for request in requests:
                request.cancel()


def usage(finished: dict[int, Finished]) -> dict[str, int]:
    prompt = sum(f.prompt_tokens for f in finished.values())
    completion = sum(f.completion_tokens for f in finished.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def respond(server: EngramServer, body: SamplingFields, prompts: list[list[int]], max_tokens: int | None,
                  kind: Literal["text_completion", "chat.completion"]):
    """The response of either endpoint: one choice per prompt, whole or streamed."""
    requests, events = server.submit(prompts, body, max_tokens)
    response_id = f"{'cmpl' if kind == 'text_completion' else 'chatcmpl'}-{uuid.uuid4().hex}"
    head = {"id": response_id, "created": int(time.time()), "model": server.model_name}
    chat = kind == "chat.completion"

    def choice(index: int, text: str | None, finish_reason: str | None, whole: bool) -> dict:
        if not chat:
            return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        key = "message" if whole else "delta"
        content = {"role": "assistant", "content": text} if whole else ({} if text is None else {"content": text})
        return {"index": index, key: content, "logprobs": None, "finish_reason": finish_reason}

    if not body.stream:
        texts, finished = {i: [] for i in range(len(prompts))}, {}
        async for index, event in server.events(requests, events):
            if isinstance(event, Delta):
                texts[index].append(event.text)
            else:
                finished[index] = event
        choices = [choice(i, "".join(texts[i]), finished[i].finish_reason, True) for i in range(len(prompts))]
        return JSONResponse({**head, "object": kind, "choices": choices, "usage": usage(finished)})

    chunk_kind = "chat.completion.chunk" if chat else "text_completion"
    include_usage = bool((body.stream_options or {}).get("include_usage"))

    async def stream() -> AsyncIterator[str]:
        finished = {}
        if chat:
            for index in range(len(prompts)):
                start = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}
                yield sse({**head, "object": chunk_kind, "choices": [start]})
        try:
            async for index, event in server.events(requests, events):
                if isinstance(event, Delta):
                    piece = choice(index, event.text, None, False)
                else:
                    finished[index] = event
                    piece = choice(index, None if chat else "", event.finish_reason, False)
                yield sse({**head, "object": chunk_kind, "choices": [piece]})
        except ApiError as error:  # the status line has gone: the error travels as an event
            yield sse({"error": {"message": error.message, "type": "server_error", "param": None, "code": None}})
            return
        if include_usage:
            yield sse({**head, "object": chunk_kind, "choices": [], "usage": usage(finished)})
        yield sse("[DONE]")

    return StreamingResponse(stream(), media_type="text/event-stream")


def create_app(model, tokenizer, model_name: str, max_model_len: int | None = None, max_batch_size: int = 32,
               batch_wait: float = 0.02) -> FastAPI:
    """The FastAPI app serving `model` as `model_name`; its lifespan starts and stops the batching engine."""
    server = EngramServer(model, tokenizer, model_name, max_model_len, max_batch_size, batch_wait)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(server.engine.stop)

    app = FastAPI(title="engram-serve", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        problems = [f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in error.errors()]
        first = error.errors()[0]["loc"] if error.errors() else ()
        return ApiError(400, "invalid request: " + "; ".join(problems), str(first[-1]) if len(first) > 1 else None,
                        "invalid_parameter").response()

    @app.get("/v1/models")
    async def models():
        card = {"id": model_name, "object": "model", "created": server.created, "owned_by": "modeling_engram",
                "max_model_len": server.max_model_len}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        server.check_model(body.model)
        refuse_unsupported(body)
        max_tokens = body.max_tokens if "max_tokens" in body.model_fields_set else 16  # OpenAI's default
        return await respond(server, body, server.completion_prompts(body), max_tokens, "text_completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        server.check_model(body.model)
        refuse_unsupported(body)
        max_tokens = body.max_completion_tokens or body.max_tokens  # None: up to the context length
        return await respond(server, body, [server.chat_prompt(body)], max_tokens, "chat.completion")

    return app


def load(model: str, revision: str | None = None, trust_remote_code: bool = False, device: str | None = None,
         dtype: str = "auto"):
    """(model, tokenizer) from a saved folder or a Hub id; Engram folders load without trust_remote_code, since this
    package registers the Auto classes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import modeling_engram  # noqa: F401  (registers the Auto classes)

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = AutoModelForCausalLM.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code,
                                                  dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    return loaded, tokenizer


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engram-serve", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a saved model folder or a Hub id (with its tokenizer)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    parser.add_argument("--revision", default=None, help="a Hub branch, tag or commit")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the repo's own code (not needed for Engram models: this package serves them)")
    parser.add_argument("--served-model-name", default=None, help="the name clients use (default: MODEL)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-batch-size", type=int, default=32, help="requests decoded together at most")
    parser.add_argument("--batch-wait-ms", type=float, default=20.0,
                        help="how long a batch's first request waits for others, while fewer wait than the last batch held")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="prompt + completion tokens at most (default: the config's max_position_embeddings)")
    return parser


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, sock: socket.socket | None = None, **kwargs):
    """Run `app` with uvicorn until Ctrl-C (SIGINT) or SIGTERM, then shut down cleanly: open streams get 5 s to end,
    the engine stops, the process exits 0."""
    import uvicorn

    sock = sock or socket.create_server((host, port))
    config = uvicorn.Config(app, log_level=kwargs.pop("log_level", "info"), timeout_graceful_shutdown=5, **kwargs)
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    print(f"engram-serve: {app.state.server.model_name!r} at http://{host}:{port}/v1", flush=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it caught, after its graceful shutdown has run
        pass
    return server


def main(argv: list[str] | None = None) -> None:
    args = argument_parser().parse_args(argv)
    sock = socket.create_server((args.host, args.port))  # bound before the model loads: a taken port fails at once
    model, tokenizer = load(args.model, args.revision, args.trust_remote_code, args.device, args.dtype)
    app = create_app(model, tokenizer, args.served_model_name or args.model, args.max_model_len, args.max_batch_size,
                     args.batch_wait_ms / 1000)
    serve(app, sock=sock)
    print("engram-serve: stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
