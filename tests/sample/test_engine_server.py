"""`lt-jax serve` over the generation engine with the official openai client: requests join the
running batch, a short request is not held up by long ones, bad requests get their own 400."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import openai
import pytest

from test_generate import CHAT, hf_folder  # noqa: F401 (the tiny model fixture)

import lt_jax
from lt_jax.sample.engine import EngineConfig
from lt_jax.sample.generate import SamplingParams, generate, load_tokenizer
from lt_jax.sample.model_backend import ModelBackend
from lt_jax.sample.server import ServerConfig, ServerThread

@pytest.fixture(scope="module")
def served(hf_folder):
    """(server, backend, model, tokenizer): test_generate's tiny Qwen2 behind the engine runner."""
    model, tok = lt_jax.load_hf(hf_folder), load_tokenizer(hf_folder)
    backend = ModelBackend(model, tok, "tiny", max_new_tokens=200,
                           config=EngineConfig(num_slots=64, page_size=16, decode_steps=8, prefill_chunk=64))
    with ServerThread(backend, ServerConfig(port=0)) as srv:
        yield srv, backend, model, tok


def _post(url: str, raw: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/chat/completions", data=raw, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


BAD = {  # each gets a 400 naming its problem while its neighbours are served
    "too_long_prompt": (dict(messages=[{"role": "user", "content": "naïve café " * 200}]), "context"),
    "prompt_plus_max_tokens": (dict(max_tokens=250), "max_tokens 250 is too large"),
    "top_k_overflow": (dict(top_k=1099511627776), "top_k"),
    "frequency_penalty": (dict(frequency_penalty=2.5), "frequency_penalty"),
    "presence_penalty": (dict(presence_penalty=-3), "presence_penalty"),
    "min_p_out_of_range": (dict(min_p=2), "min_p"),
    "repetition_penalty": (dict(repetition_penalty=0), "repetition_penalty"),
    "stop_token_id_out_of_vocab": (dict(stop_token_ids=[10**6]), "vocabulary"),
}


def test_bad_requests_get_400_alone_while_neighbours_are_served(served):
    srv, _, model, tok = served
    (want,) = generate(model, tok, [CHAT], SamplingParams(temperature=0.0, max_new_tokens=16))
    client = openai.AsyncOpenAI(base_url=srv.url, api_key="-", max_retries=0)

    async def good():
        r = await client.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_tokens=16)
        return r.choices[0].message.content

    async def bad(change):
        body = dict(model="tiny", messages=CHAT, temperature=0, max_tokens=16)
        body.update(change)
        with pytest.raises(openai.BadRequestError) as e:
            await client.chat.completions.create(**{k: body.pop(k) for k in ("model", "messages")}, extra_body=body)
        return str(e.value)

    async def main():
        goods = [good() for _ in range(4)]
        bads = [bad(change) for change, _ in BAD.values()]
        return await asyncio.gather(*goods), await asyncio.gather(*bads)

    answers, errors = asyncio.run(main())
    assert answers == [want.texts[0]] * 4
    for (name, (_, needle)), err in zip(BAD.items(), errors):
        assert needle in err, (name, err)
    # Non-finite numbers (JSON's NaN) are refused too.
    status, body = _post(srv.url, b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], '
                                  b'"temperature": NaN}')
    assert status == 400 and body["error"]["param"] == "temperature"


def test_64_streams_join_the_running_batch_and_short_ones_finish_early(served):
    srv, backend, _, _ = served
    client = openai.AsyncOpenAI(base_url=srv.url, api_key="-", max_retries=0)

    async def stream(max_tokens, seed, started=None):
        t0 = time.perf_counter()
        text, finish = "", None
        try:
            resp = await client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"question {seed}"}], temperature=1.0,
                seed=seed, max_tokens=max_tokens, stream=True)
            async for chunk in resp:
                if started is not None and not started.done():
                    started.set_result(None)
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    finish = chunk.choices[0].finish_reason or finish
        except Exception as e:
            if started is not None and not started.done():
                started.set_exception(e)
            raise
        return time.perf_counter() - t0, text, finish

    async def main():
        await stream(4, 0)  # warm the compiled shapes
        alone = min([(await stream(4, 1))[0] for _ in range(2)])
        loop = asyncio.get_running_loop()
        started = [loop.create_future() for _ in range(63)]
        longs = [asyncio.create_task(stream(130 + i, 100 + i, started[i])) for i in range(63)]
        await asyncio.gather(*started)  # every long stream is decoding
        busy_short = await stream(4, 1)
        done = await asyncio.gather(*longs)
        return alone, busy_short, done

    alone, (busy, short_text, short_finish), longs = asyncio.run(main())
    longest = max(t for t, _, _ in longs)
    print(f"short alone {alone:.3f}s, short among 63 long streams {busy:.3f}s, longest {longest:.3f}s")
    assert short_finish in ("stop", "length") and all(f in ("stop", "length") for _, _, f in longs)
    assert busy < longest / 3  # it joined the running batch instead of waiting for the longest
    assert backend.engine.allocator.in_use == 0


def test_a_disconnected_stream_frees_its_slot_and_pages(served):
    srv, backend, _, _ = served
    cancelled = backend.engine.stats["cancelled"]
    body = json.dumps(dict(model="tiny", messages=CHAT, temperature=1.0, max_tokens=200, n=4, stream=True)).encode()
    req = urllib.request.Request(srv.url + "/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    resp = urllib.request.urlopen(req, timeout=60)
    resp.readline()  # the stream has started
    resp.close()  # the client goes away mid-stream
    deadline = time.time() + 30
    while time.time() < deadline and (backend.engine.busy or backend.engine.allocator.in_use):
        time.sleep(0.05)
    assert not backend.engine.busy and backend.engine.allocator.in_use == 0
    assert backend.engine.stats["cancelled"] > cancelled  # stopped, not run to its end


def test_stop_token_ids_and_ignore_eos_are_honoured(served):
    srv, _, model, tok = served
    params = SamplingParams(temperature=0.0, max_new_tokens=16, ignore_eos=True)
    (free,) = generate(model, tok, [CHAT], params)
    ids = list(free.samples[0].token_ids)
    stop = ids[3]
    cut = ids.index(stop)
    client = openai.OpenAI(base_url=srv.url, api_key="-", max_retries=0)
    kw = dict(model="tiny", messages=CHAT, temperature=0, max_tokens=16)
    r = client.chat.completions.create(**kw, extra_body=dict(ignore_eos=True))
    assert (r.choices[0].message.content, r.usage.completion_tokens) == (free.texts[0], 16)
    r = client.chat.completions.create(**kw, extra_body=dict(ignore_eos=True, stop_token_ids=[stop]))
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == cut + 1
    assert r.choices[0].message.content == tok.decode(ids[:cut], skip_special_tokens=True)
    r = client.chat.completions.create(**kw, extra_body=dict(ignore_eos=True, stop_token_ids=[stop],
                                                             min_tokens=cut + 2))
    assert r.usage.completion_tokens >= cut + 2  # the stop token could not end it earlier


def test_logprobs_equal_the_engines(served):
    srv, _, model, tok = served
    params = SamplingParams(temperature=0.7, seed=5, max_new_tokens=8, logprobs=3, ignore_eos=True)
    (want,) = generate(model, tok, [CHAT], params)
    client = openai.OpenAI(base_url=srv.url, api_key="-", max_retries=0)
    r = client.chat.completions.create(model="tiny", messages=CHAT, temperature=0.7, seed=5, max_tokens=8,
                                       logprobs=True, top_logprobs=3, extra_body=dict(ignore_eos=True))
    got = r.choices[0].logprobs.content
    assert [c.token for c in got] == [tok.decode([t]) for t in want.samples[0].token_ids]
    for c, (lp, top) in zip(got, want.samples[0].logprobs):
        assert c.logprob == pytest.approx(lp, abs=1e-5)
        assert [a.token for a in c.top_logprobs] == [tok.decode([i]) for i, _ in top]
        assert [a.logprob for a in c.top_logprobs] == pytest.approx([x for _, x in top], abs=1e-5)
    # Legacy completions: `logprobs` is the count of alternatives.
    prompt = "The answer is"
    (want,) = generate(model, tok, [prompt], params)
    c = client.completions.create(model="tiny", prompt=prompt, temperature=0.7, seed=5, max_tokens=8, logprobs=3,
                                  extra_body=dict(ignore_eos=True)).choices[0]
    assert c.logprobs.token_logprobs == pytest.approx([lp for lp, _ in want.samples[0].logprobs], abs=1e-5)
    assert "".join(c.logprobs.tokens) == tok.decode(list(want.samples[0].token_ids))
    assert len(c.logprobs.top_logprobs) == 8
    # Streamed: each chunk carries the logprobs of the tokens it adds; in order they are the above.
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, temperature=0.7, seed=5, max_tokens=8,
                                                 logprobs=True, top_logprobs=3, stream=True,
                                                 extra_body=dict(ignore_eos=True)))
    parts = [ch.choices[0].logprobs.content for ch in chunks if ch.choices and ch.choices[0].logprobs]
    assert len(parts) > 1  # spread over the engine steps, not all at the end
    streamed = [x for part in parts for x in part]
    assert [x.token for x in streamed] == [x.token for x in got]
    assert [x.logprob for x in streamed] == pytest.approx([x.logprob for x in got], abs=1e-5)
    assert [[a.token for a in x.top_logprobs] for x in streamed] == [[a.token for a in x.top_logprobs] for x in got]
    chunks = list(client.completions.create(model="tiny", prompt=prompt, temperature=0.7, seed=5, max_tokens=8,
                                            logprobs=3, stream=True, extra_body=dict(ignore_eos=True)))
    parts = [ch.choices[0].logprobs for ch in chunks if ch.choices and ch.choices[0].logprobs]
    assert len(parts) > 1
    assert [t for p in parts for t in p.tokens] == c.logprobs.tokens
    assert [t for p in parts for t in p.text_offset] == c.logprobs.text_offset
    assert [t for p in parts for t in p.token_logprobs] == pytest.approx(c.logprobs.token_logprobs, abs=1e-5)
    assert [sorted(t) for p in parts for t in p.top_logprobs] == [sorted(t) for t in c.logprobs.top_logprobs]
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.text


def test_penalties_through_the_openai_client_equal_generate(served):
    srv, _, model, tok = served
    kw = dict(temperature=0.0, max_new_tokens=16, frequency_penalty=1.2, presence_penalty=0.5, repetition_penalty=1.3)
    (want,) = generate(model, tok, [CHAT], SamplingParams(**kw))
    (plain,) = generate(model, tok, [CHAT], SamplingParams(temperature=0.0, max_new_tokens=16))
    assert want.texts != plain.texts  # the penalties matter for this prompt
    client = openai.OpenAI(base_url=srv.url, api_key="-", max_retries=0)
    r = client.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_tokens=16,
                                       frequency_penalty=1.2, presence_penalty=0.5,
                                       extra_body={"repetition_penalty": 1.3})
    assert r.choices[0].message.content == want.texts[0]
