"""`lt-jax eval --hf` on a tiny random Qwen2 folder through the project's sampler (CPU mesh)."""

import json

import pytest

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + ChatML specials): any text encodes, vocab < 512."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHATML)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    import torch
    import transformers

    path = tmp_path_factory.mktemp("tiny_qwen2")
    tok = byte_tokenizer()
    tok.save_pretrained(path)
    config = transformers.Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    model.save_pretrained(path)
    return str(path)


def generations(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.slow  # two sampler compiles on the 8-device CPU mesh: ~40 s on 2 cores
def test_eval_hf_folder_with_the_sampler(tiny_hf, tmp_path):
    from lt_jax import cli

    common = ["--hf", tiny_hf, "--name", "tiny", "--benchmarks", "aime25", "--no-progress"]
    overrides = ["limit=3", "num_samples=2", "sampling.max_new_tokens=6"]
    assert cli.main(["eval", *common, "--out", str(tmp_path / "a"), *overrides, "batch_size=3"]) == 0
    s = json.loads((tmp_path / "a" / "summary.json").read_text())["runs"]["tiny"]["aime25"]
    assert s["num_items"] == 3 and s["samples_per_item"] == 2
    recs = generations(tmp_path / "a" / "tiny" / "aime25" / "generations.jsonl")
    samples = [smp for r in recs for smp in r["samples"]]
    assert all(1 <= smp["num_tokens"] <= 6 and smp["finish_reason"] in ("stop", "length") for smp in samples)
    assert any(smp["text"] for smp in samples)
    assert len({smp["text"] for smp in samples}) > 1  # temperature 0.6: samples differ
    # Same seeds per problem whatever the batching: one problem per call gives the same samples.
    assert cli.main(["eval", *common, "--out", str(tmp_path / "b"), *overrides, "batch_size=1"]) == 0
    again = generations(tmp_path / "b" / "tiny" / "aime25" / "generations.jsonl")
    assert [r["samples"] for r in again] == [r["samples"] for r in recs]


def test_eval_through_the_engine_equals_the_lockstep_sampler_per_item(tiny_hf, tmp_path):
    """Greedy `lt-jax eval` (every problem x sample one stream of engine requests) against the
    lockstep sampler on the same prompts."""
    from lt_jax import cli
    from lt_jax.eval.benchmarks import load_benchmark
    from lt_jax.eval.harness import PromptConfig, build_messages
    from lt_jax.sample import generate as gen
    from lt_jax.sample import sampler as smp

    out = tmp_path / "e"
    args = ["eval", "--hf", tiny_hf, "--name", "tiny", "--benchmarks", "aime25", "--no-progress",
            "--out", str(out), "limit=4", "num_samples=2", "sampling.max_new_tokens=8", "sampling.temperature=0"]
    assert cli.main(args) == 0
    recs = generations(out / "tiny" / "aime25" / "generations.jsonl")
    model, tok = gen.load_model(hf=tiny_hf), gen.load_tokenizer(tiny_hf)
    items = load_benchmark("aime25").head(4).items
    prompts = [gen.encode_prompt(tok, build_messages(it, "math", PromptConfig()))[1] for it in items]
    eos = gen.eos_token_ids(model, tok)
    rows = [smp.RowSpec(i, temperature=0.0, max_new_tokens=8, stop_token_ids=eos) for i in range(len(items))]
    decode = gen.make_decoder(tok, True)
    want = [gen.to_sample(decode, r).text for r in smp.Sampler(model).run(prompts, rows, decode)]
    by_id = {r["id"]: r for r in recs}
    for it, text in zip(items, want):
        assert [s["text"] for s in by_id[it.id]["samples"]] == [text, text]


def test_a_problem_too_long_for_the_context_gets_error_samples_not_a_crash(tiny_hf):
    from lt_jax.eval.generators import SamplerGenerator, SamplingConfig
    from lt_jax.sample import generate as gen
    from lt_jax.sample.engine import EngineConfig

    model, tok = gen.load_model(hf=tiny_hf), gen.load_tokenizer(tiny_hf)
    generator = SamplerGenerator(model, tok, "tiny", sampler_config=EngineConfig(num_slots=2, max_len=64))
    short, long = [{"role": "user", "content": "2+2?"}], [{"role": "user", "content": "x" * 200}]
    out = generator.generate([short, long, short], 2, SamplingConfig(temperature=0.0, max_new_tokens=4))
    assert [c.finish_reason for c in out[1]] == ["error", "error"] and "context of 64" in out[1][0].error
    assert all(c.finish_reason in ("stop", "length") and c.num_tokens >= 1 for c in out[0] + out[2])
    assert [c.text for c in out[0]] == [c.text for c in out[2]]


def test_the_model_generator_ends_rows_on_the_requests_stop_token_ids(tiny_hf):
    """Eval's in-process generator ends rows on the same ids as `lt_jax.generate` (`stop_ids`): the
    request's stop_token_ids too, not only EOS."""
    from lt_jax.eval.generators import SamplerGenerator, SamplingConfig
    from lt_jax.sample import generate as gen
    from lt_jax.sample.engine import EngineConfig

    model, tok = gen.load_model(hf=tiny_hf), gen.load_tokenizer(tiny_hf)
    generator = SamplerGenerator(model, tok, "tiny", sampler_config=EngineConfig(num_slots=2, max_len=64))
    prompt = [[{"role": "user", "content": "2+2?"}]]
    free = generator.generate(prompt, 1, SamplingConfig(temperature=0.0, max_new_tokens=8))[0][0]
    assert free.num_tokens >= 2
    greedy = gen.generate(model, tok, prompt, gen.SamplingParams(temperature=0.0, max_new_tokens=8))[0].samples[0]
    assert greedy.text == free.text
    stopped = generator.generate(prompt, 1, SamplingConfig(temperature=0.0, max_new_tokens=8,
                                                           stop_token_ids=(greedy.token_ids[0],)))[0][0]
    assert stopped.finish_reason == "stop" and stopped.num_tokens <= 1
    assert stopped.text == ""
