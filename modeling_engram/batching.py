"""Dynamic batching around `generate`: the engine behind `engram-serve` (serving.py).

Requests that wait when the model is free run together as one left-padded batch through `model.generate`, which is
exact for Engram models (the generation cache keeps each row's token history and short-conv state, and padding is
masked). Requests that arrive while a batch runs wait for the next one. Each row keeps its own parameters:

- `max_tokens`, `stop` strings and EOS end a row on its own (a stopping criterion that answers per row); the batch
  runs until every row has ended, the rows that ended get padding, which is never decoded;
- greedy rows take generate's argmax; a sampled row's token is drawn by a logits processor from its own
  temperature / top-k / top-p distribution with its own `torch.Generator`, so a `seed` gives the same text alone or
  batched with any other requests.

A helper of the package, never exported with a model: nothing in the model files imports it.
"""

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper


@dataclass
class SamplingParams:
    """One request's decoding parameters. temperature 0 is greedy (generate's argmax)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Delta:
    """New text of a request (never a part of a stop string, never half a character)."""

    text: str


@dataclass
class Finished:
    """A request has ended: `finish_reason` "stop" (EOS or a stop string) or "length" (max_tokens)."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    error: Exception


Event = Delta | Finished | Failed


class GenerationRequest:
    """One prompt to complete. `emit` receives its events (`Delta`, then one `Finished` or `Failed`) on the engine's
    thread; `cancel()` ends it at the next decoding step (a client that went away)."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, emit: Callable[[Event], None]):
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.emit = emit
        self.generated: list[int] = []
        self.text = ""
        self.sent = 0  # characters of `text` already emitted
        self.finish_reason: str | None = None
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.cancelled

    def accept(self, token: int, eos_ids: set[int], decode: Callable[[list[int]], str]) -> None:
        """Take one generated token: update the text, end on EOS, a stop string or max_tokens, emit what is safe."""
        self.generated.append(token)
        if token in eos_ids:
            self.finish_reason = "stop"
        else:
            self.text = decode([t for t in self.generated if t not in eos_ids])
            cuts = [i for i in (self.text.find(s) for s in self.params.stop) if i >= 0]
            if cuts:
                self.text, self.finish_reason = self.text[: min(cuts)], "stop"
            elif len(self.generated) >= self.params.max_tokens:
                self.finish_reason = "length"
        safe = len(self.text)
        if self.finish_reason is None:
            # Hold back what could still become a stop string, and an incomplete UTF-8 character (U+FFFD).
            safe -= max((len(s) for s in self.params.stop), default=1) - 1
            while safe > self.sent and self.text[safe - 1] == "\ufffd":
                safe -= 1
        if safe > self.sent:
            self.emit(Delta(self.text[self.sent : safe]))
            self.sent = safe

    def finish(self) -> None:
        self.emit(Finished(self.finish_reason or "stop", len(self.prompt_ids), len(self.generated)))


class RowStops(StoppingCriteria):
    """generate's stopping criterion for a batch of requests: feeds every new token to its row's request and answers
    per row whether it has ended. `halt()` ends every row (shutdown)."""

    def __init__(self, requests: list[GenerationRequest], eos_ids: set[int], decode: Callable[[list[int]], str]):
        self.requests, self.eos_ids, self.decode = requests, eos_ids, decode
        self.halted = False

    def halt(self) -> None:
        self.halted = True

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        tokens = input_ids[:, -1].tolist()
        for request, token in zip(self.requests, tokens):
            if not request.done:
                request.accept(token, self.eos_ids, self.decode)
        done = [self.halted or request.done for request in self.requests]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class RowSampler(LogitsProcessor):
    """Draws the next token of every sampled row from its own warped distribution with its own generator, and leaves
    only that token possible, so generate's argmax takes it; greedy rows pass unchanged."""

    def __init__(self, requests: list[GenerationRequest], device: torch.device):
        self.requests = requests
        self.rows = []
        for index, request in enumerate(requests):
            params = request.params
            if params.greedy:
                continue
            warpers = [TemperatureLogitsWarper(params.temperature)]
            if params.top_k:
                warpers.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                warpers.append(TopPLogitsWarper(params.top_p))
            generator = torch.Generator(device=device)
            if params.seed is None:
                generator.seed()
            else:
                generator.manual_seed(params.seed)
            self.rows.append((index, warpers, generator))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for index, warpers, generator in self.rows:
            if self.requests[index].done:
                continue
            row = scores[index : index + 1].float()
            for warper in warpers:
                row = warper(input_ids[index : index + 1], row)
            token = torch.multinomial(row.softmax(-1), 1, generator=generator)
            scores[index] = float("-inf")
            scores[index, token] = 0.0
        return scores


class BatchingEngine:
    """Runs `model.generate` on one thread, one batch of waiting requests at a time (at most `max_batch_size`; a batch
    starts `batch_wait` seconds after its first request arrived at the latest, see `_take_batch`).

    `submit` may be called from any thread. `start()` starts the thread; `stop()` ends the running batch at its next
    step, fails what still waits, and joins the thread.
    """

    def __init__(self, model, tokenizer, max_batch_size: int = 32, batch_wait: float = 0.02):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.batch_wait = max_batch_size, batch_wait
        config = model.generation_config
        eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        pads = (config.pad_token_id, model.config.pad_token_id, tokenizer.pad_token_id, *sorted(self.eos_ids), 0)
        self.pad_id = next(p for p in pads if p is not None)
        self.waiting: queue.Queue[GenerationRequest | None] = queue.Queue()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.current: RowStops | None = None
        self.batch_sizes: list[int] = []  # of every batch run, for the benchmark and the tests

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="engram-serve-engine", daemon=True)
        self.thread.start()

    def stop(self, timeout: float | None = 30) -> None:
        self.stopping = True
        if self.current is not None:
            self.current.halt()
        self.waiting.put(None)
        if self.thread is not None:
            self.thread.join(timeout)
        while True:
            try:
                request = self.waiting.get_nowait()
            except queue.Empty:
                break
            if request is not None:
                request.emit(Failed(RuntimeError("the server is shutting down")))

    def submit(self, request: GenerationRequest) -> None:
        if self.stopping:
            raise RuntimeError("the server is shutting down")
        self.waiting.put(request)

    def _take_batch(self) -> list[GenerationRequest]:
        """The requests waiting (at most `max_batch_size`). While fewer wait than the last batch held, the first one
        waits up to `batch_wait` seconds for more: clients answered by one batch send their next requests a few
        milliseconds apart and should not split into smaller batches, and a lone client never waits."""
        first = self.waiting.get()
        if first is None:
            return []
        batch, deadline = [first], time.monotonic() + self.batch_wait
        expected = min(self.batch_sizes[-1] if self.batch_sizes else 1, self.max_batch_size)
        while len(batch) < self.max_batch_size:
            wait = max(0.0, deadline - time.monotonic()) if len(batch) < expected else 0.0
            try:
                request = self.waiting.get(timeout=wait) if wait else self.waiting.get_nowait()
            except queue.Empty:
                break
            if request is None:
                break
            batch.append(request)
        return [request for request in batch if not request.cancelled]

    def _run(self) -> None:
        while not self.stopping:
            batch = self._take_batch()
            if not batch or self.stopping:
                for request in batch:
                    request.emit(Failed(RuntimeError("the server is shutting down")))
                continue
            try:
                self.generate(batch)
            except Exception as error:  # one batch's failure fails its unfinished requests, never the server
                for request in batch:
                    request.finish() if request.finish_reason else request.emit(Failed(error))
            else:
                for request in batch:
                    request.finish()

    @torch.no_grad()
    def generate(self, batch: list[GenerationRequest]) -> None:
        """One left-padded `generate` call for `batch`; each request receives its events as its row decodes."""
        length = max(len(request.prompt_ids) for request in batch)
        device = self.model.device
        input_ids = torch.full((len(batch), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
        for row, request in enumerate(batch):
            input_ids[row, length - len(request.prompt_ids) :] = torch.tensor(request.prompt_ids)
            attention_mask[row, length - len(request.prompt_ids) :] = 1
        stops = RowStops(batch, self.eos_ids, self.decode)
        processors = LogitsProcessorList()
        if not all(request.params.greedy for request in batch):
            processors.append(RowSampler(batch, device))
        self.current = stops
        self.batch_sizes.append(len(batch))
        try:
            self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max(request.params.max_tokens for request in batch),
                do_sample=False,
                num_beams=1,
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList([stops]),
                pad_token_id=self.pad_id,
                eos_token_id=sorted(self.eos_ids) or None,
            )
        finally:
            self.current = None
        if stops.halted:
            raise RuntimeError("the server is shutting down")
