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
    import transformers

    return redrawn_from_config(getattr(transformers, config_class)(**TINY, **extra), seed)


def redrawn_from_config(config, seed: int = 0):
    """`redrawn_model` for a transformers config object of any size."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    return model


def saved_models(tmp_path_factory, families: dict) -> dict:
    """{family: (transformers model, saved folder)} for {family: (config class, extra fields)}."""
    out = {}
    for family, (cls, extra) in families.items():
        model = redrawn_model(cls, extra)
        folder = str(tmp_path_factory.mktemp(family))
        model.save_pretrained(folder)
        out[family] = (model, folder)
    return out


def hf_greedy(model, prompt: list[int], new: int) -> list[int]:
    """transformers' greedy generate of exactly `new` tokens (no EOS)."""
    import torch

    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                             min_new_tokens=new, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()
