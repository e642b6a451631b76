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
