"""The shipped run configs load, describe the models they claim, and fit their target meshes."""

from __future__ import annotations

import dataclasses
import os

import pytest

from lt_jax.train.config import load_run_config

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")

# recipe -> (chips of the target named in its header, parameters of the model in billions)
RECIPES = {
    "qwen2.5-7b-32k.yaml": (32, 7.6),
    "qwen2.5-32b-32k.yaml": (64, 32.8),
    "qwen2.5-72b-32k.yaml": (128, 72.7),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_follow_deepdistill_stage_one_and_fit_their_mesh(name):
    cfg = load_run_config(os.path.join(CONFIGS, name))
    chips, billions = RECIPES[name]
    # Qwen2.5 has q/k/v biases and untied embeddings at these sizes; those come from the checkpoint
    model = dataclasses.replace(cfg.model_config(), attention_bias=True, tie_word_embeddings=False)
    assert model.num_params() / 1e9 == pytest.approx(billions, abs=0.05)
    assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup_fraction, cfg.optim.min_lr_ratio) == (8e-5, "cosine", 0.05, 0.0)
    assert (cfg.train.global_batch, cfg.train.epochs, cfg.data.seq_len) == (64, 1, 32768)
    sizes = cfg.mesh.resolve(chips)
    rows_per_micro = cfg.train.global_batch // cfg.train.grad_accum
    assert rows_per_micro % (sizes["data"] * sizes["fsdp"]) == 0, "each batch shard needs whole rows"
    assert cfg.data.seq_len % cfg.train.lm_head_chunk == 0 and cfg.data.seq_len % 128 == 0  # splash blocks
    assert model.num_heads % sizes["tensor"] == 0


def test_tiny_config_is_a_small_model_for_the_cpu_demo():
    cfg = load_run_config(os.path.join(CONFIGS, "tiny.yaml"), ["data.train=/tmp/tokens"])
    model = cfg.model_config()
    # The demo's tokenizer is fitted with at most demo.tokenizer_vocab entries plus its added tokens.
    import yaml

    from lt_jax.data.tiny_tokenizer import ADDED_TOKENS

    demo = yaml.safe_load(open(os.path.join(CONFIGS, "tiny.yaml")))["demo"]
    assert model.num_params() < 2_000_000 and model.vocab_size >= demo["tokenizer_vocab"] + len(ADDED_TOKENS)
    assert cfg.mesh.resolve(1) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert cfg.train.global_batch % cfg.train.grad_accum == 0 and cfg.train.init_from is None

