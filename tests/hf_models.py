"""Tiny random-init transformers models, the numerical reference for HF I/O and the sampler."""

from __future__ import annotations

TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def redrawn_model(config_class: str, extra: dict, seed: int = 0):
    """A transformers model with every weight redrawn: norms near 1, biases and kernels ~N(0, 0.1).

    HF's 0.02 init makes logits nearly constant, which would hide layout bugs and let greedy
    decoding skip most of the network.
    """
    import torch
    import transformers

    config = getattr(transformers, config_class)(**TINY, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    return model
