"""engram-serve through the real `openai` client, on 127.0.0.1: greedy output equals `generate`, streams join to the
whole text, concurrent requests batch without mixing, bad requests get a 4xx and the server lives on, Ctrl-C stops
it cleanly. The server runs a tiny model saved to a temporary folder, with the tiny character tokenizer."""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import torch
from conftest import ROOT, make_tiny_tokenizer, require, tiny_model

require("fastapi")
require("uvicorn")
openai = require("openai")

import uvicorn  # noqa: E402

from modeling_engram import exported_code_files  # noqa: E402
from modeling_engram.serving import create_app, load  # noqa: E402

NAME = "tiny-engram"
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")
PROMPTS = ["def main():", "hash the rows", "x", "memory layers are sparse lookups"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Engram model (the 99 ids of the tiny tokenizer; EOS is id 2) and its tokenizer, with a chat template."""
    folder = tmp_path_factory.mktemp("served")
    tiny_model(vocab_size=99).save_pretrained(folder)
    tokenizer = make_tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@contextmanager
def running(model, tokenizer, **app_kwargs):
    """The app on an ephemeral 127.0.0.1 port, in a thread: (openai client, app); shut down and joined on exit."""
    app = create_app(model, tokenizer, NAME, **app_kwargs)
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        port = sock.getsockname()[1]
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60), app
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def served(folder):
    """(client, app, reference model, tokenizer): the server loads the folder as `engram-serve` does; the reference
    is a second copy, so `generate` never runs beside the server's."""
    model, tokenizer = load(str(folder), device="cpu")
    reference, _ = load(str(folder), device="cpu")
    with running(model, tokenizer) as (client, app):
        yield client, app, reference, tokenizer


@torch.no_grad()
def generated_text(reference, tokenizer, ids: list[int], max_tokens: int) -> tuple[str, int, str]:
    """(text, tokens generated, finish reason: "stop" at EOS, else "length") of `model.generate` alone on `ids`."""
    out = reference.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False)[0, len(ids):]
    reason = "stop" if int(out[-1]) == tokenizer.eos_token_id else "length"
    return tokenizer.decode(out, skip_special_tokens=True), len(out), reason


def test_models_lists_the_served_model(served):
    client, app, reference, tokenizer = served
    assert [m.id for m in client.models.list().data] == [NAME]


@pytest.mark.parametrize("max_tokens", [1, 7, 40])
def test_greedy_completion_equals_generate(served, max_tokens):
    client, app, reference, tokenizer = served
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        text, count, reason = generated_text(reference, tokenizer, ids, max_tokens)
        response = client.completions.create(model=NAME, prompt=prompt, max_tokens=max_tokens, temperature=0)
        assert (response.choices[0].text, response.choices[0].finish_reason) == (text, reason)
        assert response.usage.prompt_tokens == len(ids) and response.usage.completion_tokens == count


def test_eos_ends_a_completion(served):
    """A prompt whose greedy continuation reaches EOS (id 2) within 200 tokens stops there, reason "stop"."""
    client, app, reference, tokenizer = served
    for prompt in PROMPTS + [f"{p} {q}" for p in PROMPTS for q in PROMPTS]:
        ids = tokenizer(prompt)["input_ids"]
        text, count, reason = generated_text(reference, tokenizer, ids, 200)
        if reason == "stop":
            break
    else:
        pytest.fail("no prompt reached EOS: choose others")
    response = client.completions.create(model=NAME, prompt=prompt, max_tokens=200, temperature=0)
    assert (response.choices[0].text, response.choices[0].finish_reason) == (text, "stop")
    assert response.usage.completion_tokens == count


def test_chat_uses_the_template_and_equals_generate(served):
    client, app, reference, tokenizer = served
    messages = [{"role": "user", "content": "hello"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert tokenizer.decode(ids).endswith("user: hello\n<s>assistant: ")
    text, count, _ = generated_text(reference, tokenizer, ids, 20)
    response = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0)
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == text
    assert response.usage.prompt_tokens == len(ids)


def test_stream_pieces_join_to_the_whole_text(served):
    client, app, reference, tokenizer = served
    whole = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=30, temperature=0)
    stream = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=30, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert sum(bool(p) for p in pieces) > 1 and "".join(pieces) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    messages = [{"role": "user", "content": "stream"}]
    chat = client.chat.completions.create(model=NAME, messages=messages, max_tokens=25, temperature=0)
    streamed = client.chat.completions.create(model=NAME, messages=messages, max_tokens=25, temperature=0, stream=True)
    deltas = [c.choices[0].delta.content or "" for c in streamed]
    assert "".join(deltas) == chat.choices[0].message.content and sum(bool(d) for d in deltas) > 1


def test_stop_strings_end_the_text_before_them(served):
    client, app, reference, tokenizer = served
    text = generated_text(reference, tokenizer, tokenizer(PROMPTS[1])["input_ids"], 40)[0]
    stop = text[10:13]
    assert len(stop) == 3 and text.find(stop) >= 3
    expected = text[: text.find(stop)]
    response = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=40, temperature=0,
                                         stop=["never there", stop])
    assert (response.choices[0].text, response.choices[0].finish_reason) == (expected, "stop")
    stream = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=40, temperature=0, stop=stop,
                                       stream=True)
    assert "".join(c.choices[0].text for c in stream) == expected


def busy(client, max_tokens: int = 220):
    """A long request in a thread: the requests sent while it runs wait, then run as one batch."""
    pool = ThreadPoolExecutor(1)
    future = pool.submit(client.completions.create, model=NAME, prompt="busy", max_tokens=max_tokens, temperature=0)
    pool.shutdown(wait=False)
    time.sleep(0.2)
    return future


def test_concurrent_clients_get_their_own_generate_output(served):
    client, app, reference, tokenizer = served
    engine = app.state.server.engine
    max_tokens = [12, 25, 5, 18]
    expected = [generated_text(reference, tokenizer, tokenizer(p)["input_ids"], n)[0]
                for p, n in zip(PROMPTS, max_tokens)]
    start = threading.Barrier(len(PROMPTS))

    def ask(index):
        start.wait()
        response = client.completions.create(model=NAME, prompt=PROMPTS[index], max_tokens=max_tokens[index],
                                             temperature=0)
        return response.choices[0].text

    before = len(engine.batch_sizes)
    blocker = busy(client)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        texts = list(pool.map(ask, range(len(PROMPTS))))
    blocker.result()
    assert texts == expected
    assert max(engine.batch_sizes[before:]) == len(PROMPTS)  # they did run as one batch


def test_seeded_sampling_is_the_same_alone_and_batched(served):
    client, app, reference, tokenizer = served
    engine = app.state.server.engine
    kwargs = dict(model=NAME, prompt=PROMPTS[0], max_tokens=30, temperature=1.0, top_p=0.9, seed=7)
    alone = client.completions.create(**kwargs).choices[0].text
    assert client.completions.create(**kwargs).choices[0].text == alone
    others = [dict(kwargs, prompt=p, seed=s, temperature=t) for p, s, t in zip(PROMPTS[1:], (1, 2, 3), (0, 0.7, 1.5))]
    before = len(engine.batch_sizes)
    blocker = busy(client)
    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda k: client.completions.create(**k).choices[0].text, [kwargs, *others]))
    blocker.result()
    assert max(engine.batch_sizes[before:]) == 4
    assert texts[0] == alone
    assert texts[1] == generated_text(reference, tokenizer, tokenizer(PROMPTS[1])["input_ids"], 30)[0]  # greedy row
    other_seed = client.completions.create(**dict(kwargs, seed=8)).choices[0].text
    assert other_seed != alone  # the seed matters: the comparison above could fail


def test_bad_requests_get_4xx_and_the_server_lives_on(served, folder):
    client, app, reference, tokenizer = served
    bad = {
        "unknown model": (openai.NotFoundError, "does not exist", dict(model="gpt-4o", prompt="x")),
        "prompt too long": (openai.BadRequestError, "maximum context length is 256 tokens; the prompt has 300",
                            dict(model=NAME, prompt="x" * 300)),
        "no room for max_tokens": (openai.BadRequestError, "max_tokens asks for 250 more",
                                   dict(model=NAME, prompt="x" * 10, max_tokens=250)),
        "temperature": (openai.BadRequestError, "temperature", dict(model=NAME, prompt="x", temperature=3)),
        "top_p": (openai.BadRequestError, "top_p", dict(model=NAME, prompt="x", top_p=0)),
        "max_tokens": (openai.BadRequestError, "max_tokens", dict(model=NAME, prompt="x", max_tokens=0)),
        "n": (openai.BadRequestError, "n is not supported", dict(model=NAME, prompt="x", n=2)),
        "stop": (openai.BadRequestError, "stop takes at most 4", dict(model=NAME, prompt="x", stop=list("abcde"))),
        "token id": (openai.BadRequestError, "token id 500", dict(model=NAME, prompt=[3, 500])),
        "empty prompt": (openai.BadRequestError, "empty", dict(model=NAME, prompt="")),
    }
    for case, (error, message, kwargs) in bad.items():
        with pytest.raises(error, match=message) as refusal:
            client.completions.create(**kwargs)
        assert 400 <= refusal.value.status_code < 500, case
        assert refusal.value.body["message"], case  # OpenAI's error JSON
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=NAME, messages=[])
    with pytest.raises(openai.BadRequestError, match="the prompt has 2.. tokens, no room for more"):  # no max_tokens
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x" * 250}])
    assert client.completions.create(model=NAME, prompt="still here", max_tokens=3).usage.completion_tokens == 3


def test_chat_without_a_template_is_refused(folder):
    model, tokenizer = load(str(folder), device="cpu")
    tokenizer.chat_template = None
    with running(model, tokenizer) as (client, app):
        with pytest.raises(openai.BadRequestError, match="has no chat template"):
            client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}])
        assert client.completions.create(model=NAME, prompt="hi", max_tokens=2).choices[0].finish_reason


def test_the_server_is_not_exported_with_a_model(folder):
    assert not {"serving.py", "batching.py"} & set(exported_code_files())
    assert not (folder / "serving.py").exists() and not (folder / "batching.py").exists()


@pytest.mark.slow
def test_engram_serve_command_stops_cleanly_on_ctrl_c(folder):
    """`python -m modeling_engram.serving MODEL --port 0` (the `engram-serve` entry point): serves, then SIGINT (Ctrl-C)
    shuts it down: exit status 0, no traceback."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "modeling_engram.serving", str(folder), "--port", "0", "--served-model-name",
               NAME, "--device", "cpu"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            found = re.search(r"at http://127\.0\.0\.1:(\d+)/v1", line)
            if found:
                break
        assert found, "".join(lines)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{found[1]}/v1", api_key="unused", max_retries=0)
        assert client.completions.create(model=NAME, prompt="hi", max_tokens=4).usage.completion_tokens == 4
        process.send_signal(signal.SIGINT)
        output = "".join(lines) + process.communicate(timeout=60)[0]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output
    assert "Traceback" not in output and "engram-serve: stopped" in output, output
