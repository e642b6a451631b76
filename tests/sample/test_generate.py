"""`lt_jax.generate`, incremental text and stop strings, the server's model backend, `lt-jax sample`
and `lt-jax serve --hf` on a tiny byte-level BPE tokenizer with a ChatML template."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import numpy as np
import pytest

import lt_jax
from lt_jax import storage
from lt_jax.sample.backends import GenRequest
from lt_jax.sample.detokenize import TextStream
from lt_jax.sample.generate import SamplingParams, generate, load_tokenizer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The sum of 12 and 30 is 42, so the answer is \\boxed{42}.",
    "Let me think step by step. First, multiply 7 by 6; that gives 42.",
    "naïve café, déjà vu: 日本語のテキスト and ünïcödé bytes.",
    "Wait, let me check again: 3 + 4 = 7, and 7 * 2 = 14. Therefore the answer is 14.",
]
CHAT = [{"role": "system", "content": "Reason step by step."}, {"role": "user", "content": "What is 6 * 7?"}]


def build_tokenizer(folder: str) -> str:
    """A <= 300-token byte-level BPE with ChatML special tokens and chat template, saved to `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    # Only the corpus's bytes as the alphabet: random-weight models then emit mostly whole characters.
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny Qwen2 HF folder (random N(0, 0.1) weights) that also holds the tokenizer."""
    import torch
    import transformers

    folder = str(tmp_path_factory.mktemp("tiny_qwen"))
    tok = load_tokenizer(build_tokenizer(folder))
    config = transformers.Qwen2Config(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), bos_token_id=None,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(hf_folder):
    return lt_jax.load_hf(hf_folder)


@pytest.fixture(scope="module")
def tok(hf_folder):
    return load_tokenizer(hf_folder)


GREEDY = SamplingParams(temperature=0.0, max_new_tokens=24)


def test_generate_renders_chat_and_raw_prompts(model, tok):
    out = lt_jax.generate(model, tok, [CHAT, "The answer is"], GREEDY)
    chat_text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert chat_text.endswith("<|im_start|>assistant\n") and out[0].prompt == chat_text
    assert list(out[0].prompt_token_ids) == tok(chat_text, add_special_tokens=False)["input_ids"]
    assert list(out[1].prompt_token_ids) == tok("The answer is")["input_ids"]
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    for r in out:
        (s,) = r.samples
        ended_by_eos = s.token_ids[-1] == eos
        assert s.finish_reason == ("stop" if ended_by_eos else "length")
        assert ended_by_eos or s.num_tokens == GREEDY.max_new_tokens
        body = list(s.token_ids[:-1] if ended_by_eos else s.token_ids)
        assert eos not in body
        assert s.text == tok.decode(body, skip_special_tokens=True)
    # One conversation (not a list of them) is one prompt.
    assert [r.samples for r in generate(model, tok, CHAT, GREEDY)] == [out[0].samples]


def test_n_samples_seeds_and_ignore_eos(model, tok):
    params = SamplingParams(n=3, temperature=1.0, top_p=0.9, seed=4, max_new_tokens=24, ignore_eos=True)
    a, b = generate(model, tok, [CHAT, "x"], params)
    assert all(s.num_tokens == 24 and s.finish_reason == "length" for s in a.samples + b.samples)
    assert len(set(a.texts)) == 3
    # Per-prompt seeds: prompt 0 keeps seed 4 and its samples; prompt 1 gets seed 9 and other samples.
    again, other = generate(model, tok, [CHAT, "x"], params, seeds=[4, 9])
    assert again.samples == a.samples
    assert other.prompt_token_ids == b.prompt_token_ids and other.texts != b.texts
    # One seed for several prompts: each prompt draws its own stream (the same prompt twice differs),
    # and a prompt's samples do not depend on the prompts beside it.
    x1, x2 = generate(model, tok, ["x", "x"], params)
    assert x1.texts != x2.texts
    assert generate(model, tok, [CHAT, "x"], params)[1].samples == b.samples
    assert x1.samples == generate(model, tok, ["x"], params)[0].samples


def test_every_eos_id_ends_a_sample_and_round_trips(model, tok, hf_folder, tmp_path):
    import shutil

    from lt_jax.model.config import ModelConfig
    from lt_jax.model.hf import hf_to_model_config, load_hf, model_config_to_hf

    cfg = ModelConfig(eos_token_id=[128001, 128008, 128009])
    assert cfg.eos_token_ids == (128001, 128008, 128009)
    assert hf_to_model_config(model_config_to_hf(cfg)) == cfg
    free = generate(model, tok, ["x"], SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True))[0]
    first, second = free.samples[0].token_ids[2], free.samples[0].token_ids[5]
    # generation_config.json's list (not config.json's single id) reaches lt_jax.generate via load_hf.
    folder = tmp_path / "multi_eos"
    shutil.copytree(hf_folder, folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [int(second), int(first)]}))
    multi = load_hf(str(folder))
    assert {first, second} <= set(multi.config.eos_token_ids)
    (res,) = generate(multi, tok, ["x"], SamplingParams(temperature=0.0, max_new_tokens=24))
    assert res.samples[0].token_ids == free.samples[0].token_ids[:3]
    assert (res.samples[0].finish_reason, res.samples[0].stop_reason) == ("stop", first)


def test_stop_strings_cut_the_text_at_the_first_match(model, tok):
    params = SamplingParams(temperature=1.0, seed=2, max_new_tokens=24, ignore_eos=True)
    base = generate(model, tok, [CHAT], params)[0].samples[0]
    text = base.text
    # A 3-character stop string from the second half of the (seeded, reproducible) answer.
    start = next(i for i in range(len(text) // 2, len(text) - 3) if "\ufffd" not in text[i : i + 3])
    stop = text[start : start + 3]
    cut = text.find(stop)
    (res,) = generate(model, tok, [CHAT], dataclasses.replace(params, stop=("never-in-this-text", stop)))
    s = res.samples[0]
    assert (s.text, s.finish_reason, s.stop_reason) == (text[:cut], "stop", stop)
    # The kept tokens are the shortest prefix of the answer whose text holds the stop string.
    assert list(s.token_ids) == list(base.token_ids[: s.num_tokens])
    assert stop in tok.decode(list(s.token_ids)) and stop not in tok.decode(list(s.token_ids[:-1]))


def test_text_stream_holds_back_partial_stops_and_bytes(tok):
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    text = "naïve café 日本語, so the answer is 42 and more"  # only characters the tokenizer knows
    assert tok.decode(tok(text)["input_ids"]) == text
    ids = tok(text)["input_ids"]
    stream, deltas = TextStream(decode, stop=["answer is"]), []
    kept = None
    for i in range(0, len(ids), 2):
        kept = stream.push(ids[i : i + 2])
        deltas.append(stream.delta())
        if kept is not None:
            break
    deltas.append(stream.delta(final=True))
    assert "".join(deltas) == "naïve café 日本語, so the "
    assert not any("\ufffd" in d for d in deltas)  # deltas only grow, so no part of the stop leaked either
    assert stop_token_count(decode, ids, "answer is") == kept
    # Without stop strings, deltas concatenate to the full decode.
    plain = TextStream(decode)
    got = "".join(plain.delta() for i in range(len(ids)) if plain.push([ids[i]]) is None) + plain.delta(final=True)
    assert got == text


def stop_token_count(decode, ids, stop) -> int:
    return next(k for k in range(1, len(ids) + 1) if stop in decode(ids[:k]))


# ---------------------------------------------------------------------------------------------
# Server backend and CLIs


def test_model_backend_serves_a_batch_in_one_sampler_call(model, tok):
    from lt_jax.sample.model_backend import ModelBackend

    backend = ModelBackend(model, tok, "tiny")
    reqs = [
        GenRequest(messages=tuple(CHAT), n=2, temperature=0.8, top_p=0.9, seed=5, max_tokens=24),
        GenRequest(prompt="The answer is", temperature=0.0, max_tokens=24),
    ]
    results = backend.generate(reqs)
    assert backend.batch_sizes == [3]
    want0 = generate(model, tok, [CHAT], SamplingParams(n=2, temperature=0.8, top_p=0.9, seed=5, max_new_tokens=24))
    want1 = generate(model, tok, ["The answer is"], SamplingParams(temperature=0.0, max_new_tokens=24))
    for res, want in zip(results, want0 + want1):
        assert [c.text for c in res.choices] == want.texts
        assert [c.completion_tokens for c in res.choices] == [s.num_tokens for s in want.samples]
        assert [c.finish_reason for c in res.choices] == [s.finish_reason for s in want.samples]
        assert res.prompt_tokens == len(want.prompt_token_ids)
    # Streaming: the deltas of each choice add up to its text; the last event finishes it.
    texts, finals = {}, {}
    for ev in backend.generate_stream(reqs):
        texts[ev.request, ev.choice] = texts.get((ev.request, ev.choice), "") + ev.text
        if ev.finish_reason:
            finals[ev.request, ev.choice] = (ev.finish_reason, ev.completion_tokens)
    for r, res in enumerate(results):
        for j, c in enumerate(res.choices):
            assert texts[r, j] == c.text and finals[r, j] == (c.finish_reason, c.completion_tokens)


def test_serve_hf_folder_through_openai_client(hf_folder, model, tok):
    import openai

    from lt_jax.sample import serve_cli
    from lt_jax.sample.server import ServerConfig, ServerThread

    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser, "serve")  # with the model backend's flags
    args = parser.parse_args(["--hf", hf_folder, "--mesh", "data=2,fsdp=2,tensor=2", "--model-name", "tiny",
                              "--max-new-tokens", "32"])
    backend = serve_cli.build_backend(args)
    with ServerThread(backend, ServerConfig(port=0)) as srv:
        client = openai.OpenAI(base_url=srv.url, api_key="-", max_retries=0)
        resp = client.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_tokens=24)
    (want,) = generate(model, tok, [CHAT], SamplingParams(temperature=0.0, max_new_tokens=24))
    assert resp.choices[0].message.content == want.texts[0]
    assert resp.usage.completion_tokens == want.samples[0].num_tokens
    assert resp.usage.prompt_tokens == len(want.prompt_token_ids)


@pytest.mark.slow
def test_sample_cli_reads_gcs_hf_folders_and_checkpoints(hf_folder, model, tok, gcs_bucket, tmp_path):
    from lt_jax.cli import main
    from lt_jax.train.checkpoint import save_model_checkpoint

    remote = f"{gcs_bucket}/models/tiny"
    for name in os.listdir(hf_folder):
        storage.copy_local_to(os.path.join(hf_folder, name), f"{remote}/{name}")
    ckpt = str(tmp_path / "ckpt")
    save_model_checkpoint(model, ckpt)
    (want,) = generate(model, tok, [CHAT[1:]], SamplingParams(n=2, temperature=0.7, seed=3, max_new_tokens=24))
    common = ["--prompt", CHAT[1]["content"], "--n", "2", "--temperature", "0.7", "--seed", "3",
              "--max-new-tokens", "24", "--mesh", "data=2,fsdp=2,tensor=2"]
    sources = {"gcs": ["--hf", remote], "ckpt": ["--checkpoint", ckpt, "--tokenizer", hf_folder]}
    for name, src in sources.items():
        out = f"{gcs_bucket}/out/{name}.jsonl"
        assert main(["sample", *src, *common, "--out", out]) == 0
        (line,) = [json.loads(x) for x in storage.read_text(out).splitlines()]
        assert [s["text"] for s in line["samples"]] == want.texts, name
        assert line["prompt_tokens"] == len(want.prompt_token_ids)


def test_sampling_params_validate():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    p = SamplingParams(stop=["a", "b"], top_k=None)
    assert p.stop == ("a", "b") and p.top_k == 0
    assert np.isclose(SamplingParams().top_p, 1.0)
