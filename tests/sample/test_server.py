"""`lt-jax serve`: the official openai client against the synthetic teacher, errors, auth, batching."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

from lt_jax.data import synthetic
from lt_jax.sample import openai_api
from lt_jax.sample.backends import (GenRequest, GenResult, Choice, SyntheticBackend, apply_stop_and_limit,
                                    choice_seed, pieces)
from lt_jax.sample.server import ServerConfig, ServerThread

KEY = "sk-test-key"
MODEL = "synthetic-teacher"
PROBLEM = "Compute 4821 * 37.\nPlease reason step by step, and put your final answer within \\boxed{}."


@pytest.fixture(scope="module")
def served():
    """`lt-jax serve --teacher synthetic` in a subprocess on a free loopback port, with an API key."""
    env = dict(os.environ, LT_JAX_TEST_KEY=KEY)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lt_jax.cli", "serve", "--teacher", "synthetic", "--port", "0",
         "--api-key-env", "LT_JAX_TEST_KEY", "--batch-window-ms", "10", "--log-level", "WARNING"],
        stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    assert line.startswith(f"serving {MODEL} at http://127.0.0.1:"), line
    yield line.split(" at ")[1].strip()
    proc.terminate()
    assert proc.wait(timeout=20) == 0  # SIGTERM shuts it down cleanly


@pytest.fixture(scope="module")
def backend():
    return SyntheticBackend()  # the same default config as the served one


def _direct(backend, **kw) -> GenResult:
    return backend.generate([GenRequest(**kw)])[0]


def _chat(problem=PROBLEM):
    return [{"role": "user", "content": problem}]


def test_sync_client_gets_the_backends_text(served, backend):
    client = openai.OpenAI(base_url=served, api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]
    resp = client.chat.completions.create(model=MODEL, messages=_chat(), n=3, seed=11, temperature=0.7)
    want = _direct(backend, messages=tuple(_chat()), n=3, seed=11, temperature=0.7)
    assert [c.message.content for c in resp.choices] == [c.text for c in want.choices]
    assert resp.usage.prompt_tokens == want.prompt_tokens
    assert resp.usage.completion_tokens == sum(c.completion_tokens for c in want.choices)
    assert resp.choices[0].finish_reason == "stop"

    stream = client.chat.completions.create(model=MODEL, messages=_chat(), seed=11, temperature=0.7, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == want.choices[0].completion_tokens

    # Same seed, same text; the text is the synthetic teacher's own trace and answer.
    again = client.chat.completions.create(model=MODEL, messages=_chat(), seed=11, temperature=0.7)
    assert again.choices[0].message.content == resp.choices[0].message.content
    thinking, answer = synthetic.teacher_response(PROBLEM, random.Random(choice_seed(11, 0)), backend.cfg)
    assert resp.choices[0].message.content == f"<think>\n{thinking}\n</think>\n\n{answer}"


def test_async_client_separate_reasoning_and_completions(served, backend):
    async def main():
        client = openai.AsyncOpenAI(base_url=served, api_key=KEY, max_retries=0)
        sep = {"reasoning_format": "separate"}
        whole = await client.chat.completions.create(model=MODEL, messages=_chat(), seed=5, extra_body=sep)
        stream = await client.chat.completions.create(model=MODEL, messages=_chat(), seed=5, extra_body=sep,
                                                      stream=True)
        reasoning, content = "", ""
        async for chunk in stream:
            delta = chunk.choices[0].delta
            reasoning += getattr(delta, "reasoning_content", None) or ""
            content += delta.content or ""
        comp = await client.completions.create(model=MODEL, prompt=["Compute 77 + 58.", "Compute 9 * 9."],
                                               n=2, seed=3, max_tokens=20, stop=["</think>"])
        comp_stream = await client.completions.create(model=MODEL, prompt="Compute 77 + 58.", seed=3,
                                                      stop=["</think>"], stream=True)
        streamed = "".join([c.choices[0].text async for c in comp_stream])
        await client.close()
        return whole, reasoning, content, comp, streamed

    whole, reasoning, content, comp, streamed = asyncio.run(main())
    thinking, answer = synthetic.teacher_response(PROBLEM, random.Random(choice_seed(5, 0)), backend.cfg)
    assert whole.choices[0].message.reasoning_content == thinking == reasoning
    assert whole.choices[0].message.content == answer == content

    texts = [c.text for c in sorted(comp.choices, key=lambda c: c.index)]
    want = [c for p in ("Compute 77 + 58.", "Compute 9 * 9.")
            for c in _direct(backend, prompt=p, n=2, seed=3, max_tokens=20, stop=("</think>",)).choices]
    assert texts == [c.text for c in want] and all(c.finish_reason == "length" for c in comp.choices)
    full = _direct(backend, prompt="Compute 77 + 58.", seed=3).choices[0].text
    assert streamed == full.split("</think>")[0] and "</think>" not in streamed


def _post(url: str, body, key: str | None = KEY, raw: bytes | None = None):
    req = urllib.request.Request(url, data=raw if raw is not None else json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


BAD_REQUESTS = [
    (None, b"{not json", 400, None),
    (None, b"[1, 2]", 400, None),
    ({"messages": _chat()}, None, 400, "model"),
    ({"model": MODEL, "messages": "hello"}, None, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, None, 400, "messages[0]"),
    ({"model": MODEL, "messages": _chat(), "temperature": "hot"}, None, 400, "temperature"),
    ({"model": MODEL, "messages": _chat(), "temperature": 3.5}, None, 400, "temperature"),
    ({"model": MODEL, "messages": _chat(), "n": 0}, None, 400, "n"),
    ({"model": MODEL, "messages": _chat(), "max_tokens": -4}, None, 400, "max_tokens"),
    ({"model": MODEL, "messages": _chat(), "stop": [1, 2]}, None, 400, "stop"),
    ({"model": MODEL, "messages": _chat(), "stream": "yes"}, None, 400, "stream"),
    ({"model": MODEL, "messages": _chat(), "tools": [{"type": "function"}]}, None, 400, "tools"),
    ({"model": MODEL, "messages": _chat(), "reasoning_format": "xml"}, None, 400, "reasoning_format"),
    ({"model": "gpt-9", "messages": _chat()}, None, 404, "model"),
    # past the API's own checks, refused by the shared SamplingParams rules (not a 500)
    ({"model": MODEL, "messages": _chat(), "seed": 2**70}, None, 400, "seed"),
]


@pytest.mark.parametrize("body,raw,status,param", BAD_REQUESTS)
def test_bad_requests_get_openai_errors(served, body, raw, status, param):
    code, err = _post(f"{served}/chat/completions", body, raw=raw)
    assert code == status
    assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["message"]
    assert err["error"]["param"] == param


def test_errors_auth_and_survival(served, backend):
    code, err = _post(f"{served}/completions", {"model": MODEL, "prompt": [1, 2, 3]})
    assert code == 400 and err["error"]["param"] == "prompt"
    code, err = _post(f"{served}/nowhere", {"model": MODEL})
    assert code == 404 and "error" in err
    # Auth: none, wrong, right.
    assert _post(f"{served}/chat/completions", {"model": MODEL, "messages": _chat()}, key=None)[0] == 401
    with pytest.raises(openai.AuthenticationError) as info:
        openai.OpenAI(base_url=served, api_key="wrong", max_retries=0).models.list()
    assert info.value.body["code"] == "invalid_api_key"
    with urllib.request.urlopen(served.replace("/v1", "/health"), timeout=10) as r:
        assert json.loads(r.read())["status"] == "ok"
    # A client that hangs up mid-stream does not hurt the server.
    client = openai.OpenAI(base_url=served, api_key=KEY, max_retries=0)
    stream = client.chat.completions.create(model=MODEL, messages=_chat(), stream=True)
    next(iter(stream))
    stream.close()
    # ... and after all of the above, it still answers correctly.
    code, ok = _post(f"{served}/chat/completions", {"model": MODEL, "messages": _chat(), "seed": 1})
    assert code == 200
    assert ok["choices"][0]["message"]["content"] == _direct(backend, messages=tuple(_chat()), seed=1).choices[0].text


def test_32_concurrent_clients_are_batched(served, backend):
    problems = [f"Compute {1000 + i} * {i + 12}." for i in range(32)]  # traces longer than max_tokens

    async def one(client, i):
        kw = dict(model=MODEL, messages=_chat(problems[i]), seed=i, max_tokens=60 + i)
        if i % 2:
            stream = await client.chat.completions.create(stream=True, **kw)
            return "".join([c.choices[0].delta.content or "" async for c in stream])
        return (await client.chat.completions.create(**kw)).choices[0].message.content

    async def main():
        client = openai.AsyncOpenAI(base_url=served, api_key=KEY, max_retries=0)
        out = await asyncio.gather(*(one(client, i) for i in range(32)))
        await client.close()
        return out

    texts = asyncio.run(main())
    for i, text in enumerate(texts):
        want = _direct(backend, messages=tuple(_chat(problems[i])), seed=i, max_tokens=60 + i).choices[0]
        assert text == want.text and len(pieces(text)) == 60 + i
    with urllib.request.urlopen(served.replace("/v1", "/stats"), timeout=10) as r:
        stats = json.loads(r.read())
    assert stats["max_batch_sequences"] > 1, stats
    assert stats["requests"] >= 32


# ---------------------------------------------------------------------------------------------
# In-process: batching limits, non-incremental and failing backends, <think> splitting


class _Recording:
    """A non-incremental backend (no generate_stream) that records its batches; 'boom' fails it."""

    name = "rec"

    def __init__(self):
        self.batches: list[list[GenRequest]] = []
        self.gate = threading.Event()
        self.arrived = 0  # requests the server has taken in (validate runs just before it queues them)

    def validate(self, request):
        self.arrived += 1
        if len(request.prompt) > 20:
            raise ValueError("prompt too long for this model's context")

    def generate(self, requests):
        self.gate.wait(10)
        self.batches.append(requests)
        if any("boom" in (r.prompt or "") for r in requests):
            raise RuntimeError("device on fire")
        return [GenResult(tuple(Choice(f"{r.prompt} #{i} and more words", "stop", 5) for i in range(r.n)), 2)
                for r in requests]


def test_batches_respect_the_cap_and_failures_stay_local():
    rec = _Recording()
    cfg = ServerConfig(port=0, max_batch_sequences=6, batch_window_ms=50)
    with ServerThread(rec, cfg) as srv:
        client = openai.OpenAI(base_url=srv.url, api_key="-", max_retries=0)
        results = {}

        def call(i, n):
            results[i] = client.completions.create(model="rec", prompt=f"p{i}", n=n)

        threads = [threading.Thread(target=call, args=(i, 1 + i % 3)) for i in range(10)]
        for t in threads:
            t.start()
        # The first batch is held at the gate until every request has queued behind it (polled, not slept:
        # a busy runner may take any time to get there).
        deadline = time.monotonic() + 30
        while rec.arrived < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rec.arrived == 10
        rec.gate.set()
        for t in threads:
            t.join(30)
        assert all(sum(r.n for r in b) <= 6 for b in rec.batches) and max(len(b) for b in rec.batches) > 1
        assert sum(len(b) for b in rec.batches) == 10
        for i, resp in results.items():
            assert [c.text for c in resp.choices] == [f"p{i} #{k} and more words" for k in range(1 + i % 3)]
        # Streaming a non-incremental backend: the finished text arrives in chunks.
        chunks = list(client.completions.create(model="rec", prompt="s", stream=True))
        assert "".join(c.choices[0].text for c in chunks) == "s #0 and more words" and len(chunks) > 2
        with pytest.raises(openai.InternalServerError, match="device on fire"):
            client.completions.create(model="rec", prompt="boom")
        with pytest.raises(openai.BadRequestError, match="too long"):
            client.completions.create(model="rec", prompt="x" * 21)
        assert client.completions.create(model="rec", prompt="fine").choices[0].text == "fine #0 and more words"


SPLIT_CASES = [
    "<think>\nstep 1\nstep 2\n</think>\n\nThe answer is 4.",
    "  <think>a</think>b",
    "<think>\nunclosed thinking cut by max_tokens",
    "<thi",
    "<think>\n\n</think>\n\n",
    "<think>x</thin",
]


@pytest.mark.parametrize("text", SPLIT_CASES)
def test_think_split_is_the_same_streamed_in_any_chunks(text):
    whole = openai_api.split_think(text)
    rng = random.Random(0)
    for _ in range(50):
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text), rng.randint(1, 6))))
        splitter, reasoning, content = openai_api.ThinkSplitter(), "", ""
        for a, b in zip([0] + cuts, cuts + [len(text)]):
            r, c = splitter.feed(text[a:b])
            reasoning, content = reasoning + r, content + c
        r, c = splitter.flush()
        assert (reasoning + r, content + c) == ((whole[0] or ""), whole[1])
    if text.lstrip().startswith("<think>"):
        assert whole[0] is not None and "<think>" not in whole[0] and "</think>" not in whole[1]
    else:
        assert whole == (None, text)


def test_stop_and_length_cut_like_a_decoder():
    text = "<think>\nabc def\n</think>\n\nAnswer: 42"
    assert apply_stop_and_limit(text, ["def"], None) == Choice("<think>\nabc ", "stop", len(pieces("<think>\nabc ")))
    cut = apply_stop_and_limit(text, [], 3)
    assert cut.finish_reason == "length" and cut.completion_tokens == 3 and text.startswith(cut.text)
    assert "".join(pieces(text)) == text
