"""The one sampling-parameters type: validated once, used by generate, the server, eval and distill."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from lt_jax import config, sampling
from lt_jax.sampling import INT32_MAX, SamplingParams, derive_seed


@pytest.mark.parametrize("field, value, words", [
    ("temperature", -0.1, ">= 0"),
    ("temperature", math.nan, "finite"),
    ("temperature", math.inf, "finite"),
    ("top_p", 0.0, "(0, 1]"),
    ("top_p", 1.5, "(0, 1]"),
    ("top_p", math.nan, "finite"),
    ("min_p", -0.5, "[0, 1]"),
    ("top_k", -1, ">= 0"),
    ("top_k", INT32_MAX + 1, "int32"),
    ("max_new_tokens", 0, ">= 1"),
    ("max_new_tokens", INT32_MAX + 1, "int32"),
    ("max_new_tokens", 2.5, "integer"),
    ("min_tokens", -1, ">= 0"),
    ("n", 0, ">= 1"),
    ("n", True, "integer"),
    ("logprobs", -1, ">= 0"),
    ("seed", 2**64, "64-bit"),
    ("stop_token_ids", (5, -1), "token ids"),
    ("stop_token_ids", (2**31,), "token ids"),
    ("stop", ("",), "non-empty"),
    ("presence_penalty", 2.5, "[-2, 2]"),
    ("frequency_penalty", -2.5, "[-2, 2]"),
    ("frequency_penalty", math.nan, "finite"),
    ("repetition_penalty", 0.0, "> 0"),
    ("repetition_penalty", math.inf, "finite"),
])
def test_bad_values_are_refused_naming_the_field(field, value, words):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field} .*{__import__('re').escape(words)}"):
        SamplingParams(**{field: value})


def test_normalises_and_accepts_edges():
    p = SamplingParams(stop="</s>", top_k=None, top_p=1, temperature=0, max_new_tokens=INT32_MAX, seed=-(2**63))
    assert p.stop == ("</s>",) and p.top_k == 0 and p.max_new_tokens == INT32_MAX
    with pytest.raises(ValueError, match="SamplingParams.top_p"):
        p.replace(top_p=0)


def test_the_other_layers_use_the_one_type():
    from lt_jax.eval.generators import SamplingConfig
    from lt_jax.sample import generate
    from lt_jax.sample.backends import GenRequest

    assert generate.SamplingParams is SamplingParams
    assert issubclass(SamplingConfig, SamplingParams)
    # eval keeps its YAML keys and long-CoT defaults; bad values are refused by the shared checks
    cfg = config.from_dict(SamplingConfig, {"temperature": 0.7, "stop": ["</answer>"]})
    assert (cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.stop) == (0.7, 0.95, 32768, ("</answer>",))
    with pytest.raises(config.ConfigError, match=r"SamplingConfig\.top_k .*int32"):
        config.from_dict(SamplingConfig, {"top_k": 2**40})
    with pytest.raises(config.ConfigError, match=r"SamplingConfig\.temperature .*finite"):
        config.from_dict(SamplingConfig, {"temperature": float("nan")})
    # the server's request maps its OpenAI names onto the type
    req = GenRequest(prompt="x", n=2, temperature=0.5, top_k=None, max_tokens=7, seed=3, min_p=0.1)
    assert req.params() == SamplingParams(n=2, temperature=0.5, top_k=0, max_new_tokens=7, seed=3, min_p=0.1)
    assert req.params(99).max_new_tokens == 7 and GenRequest(prompt="x").params(99).max_new_tokens == 99
    with pytest.raises(ValueError, match=r"SamplingParams\.temperature .*finite"):
        GenRequest(prompt="x", temperature=float("inf"))
    with pytest.raises(ValueError, match=r"SamplingParams\.top_k .*int32"):
        GenRequest(prompt="x", top_k=2**31)


def test_distill_checks_its_set_fields_with_the_shared_rules():
    from lt_jax.data.distill import DistillConfig

    base = dict(input="in.jsonl", output="out.jsonl", base_url="http://x", model="m")
    DistillConfig(**base)  # unset fields are left to the teacher
    for field, value, words in [("temperature", float("nan"), "finite"), ("max_tokens", 2**31, "int32"),
                                ("top_p", 0.0, "(0, 1]"), ("top_k", -2, ">= 0"), ("n", 2**31, "int32")]:
        with pytest.raises(config.ConfigError, match=rf"DistillConfig\.{field} "):
            config.from_dict(DistillConfig, dict(base, **{field: value}))
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            DistillConfig(**base, **{field: value})


def test_one_seed_hasher_stable_across_processes():
    from lt_jax.data.distill import sample_seed
    from lt_jax.eval.generators import seed_for
    from lt_jax.sample.backends import choice_seed
    from lt_jax.sample.generate import prompt_seed
    from lt_jax.sample.sampler import row_seed

    assert row_seed(7, 2) == choice_seed(7, 2) == derive_seed(7, 2)  # server choice j == engine row j
    assert seed_for(7, "p1") == derive_seed(7, "p1") and sample_seed(7, "p1", 0) == derive_seed(7, "p1", 0)
    assert prompt_seed(7, 0) == 7 and prompt_seed(7, 1) == derive_seed(7, "prompt1")
    seeds = {derive_seed(0, k) for k in range(2000)}
    assert len(seeds) > 1990 and all(0 <= s <= INT32_MAX for s in seeds)
    assert derive_seed(None) != derive_seed(None) or derive_seed(None) != derive_seed(None)
    other = subprocess.run([sys.executable, "-c", "from lt_jax.sampling import derive_seed; "
                            "print(derive_seed(123, 'abc', 4))"], capture_output=True, text=True, check=True)
    assert int(other.stdout) == derive_seed(123, "abc", 4)
    assert sampling.check_field("seed", None) is None  # unset passes


def test_eval_sends_the_fields_the_openai_api_lacks_as_body_extensions():
    from lt_jax.eval.generators import SamplingConfig, endpoint_extras

    assert endpoint_extras(SamplingConfig()) == {}
    cfg = SamplingConfig(top_k=20, min_p=0.05, min_tokens=3, stop_token_ids=(7,), skip_special_tokens=False,
                         repetition_penalty=1.1, presence_penalty=0.5)
    assert endpoint_extras(cfg) == {"top_k": 20, "min_p": 0.05, "min_tokens": 3, "stop_token_ids": [7],
                                    "skip_special_tokens": False, "repetition_penalty": 1.1}
    with pytest.raises(ValueError, match="SamplingConfig.n must be 1"):
        SamplingConfig(n=4)
    with pytest.raises(ValueError, match="SamplingConfig.logprobs"):
        SamplingConfig(logprobs=2)
