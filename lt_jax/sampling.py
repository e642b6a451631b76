"""How to sample: the one parameters type of generate, the server, eval and distill, and its seed hash.

`SamplingParams` is validated once, here, when it is built: every field's range, non-finite numbers
and values that would overflow the engine's int32 arrays are refused with a ValueError naming the
field. The other layers hold or build one (eval's `SamplingConfig` only changes the defaults to the
long-CoT protocol; the server maps OpenAI request fields onto it) or, where a field may be left
unset (distill's "leave it to the teacher"), check the set fields with `check_field`.

`derive_seed` is the one way a seed is derived from a base seed and keys (a sample index, a prompt
number, a problem id): stable across processes (not Python's salted `hash`), 31 bits so any server
and the engine's uint32 keys accept it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from typing import Any, Optional

INT32_MAX = 2**31 - 1
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # seeds are hashed, so any 64-bit value is accepted

# field: (kind, low, high, what the bound means); kind "float" fields must be finite.
_RULES: dict[str, tuple[str, float, float, str]] = {
    "n": ("int", 1, INT32_MAX, ">= 1"),
    "temperature": ("float", 0.0, math.inf, ">= 0 (0 = greedy)"),
    "top_p": ("float", 0.0, 1.0, "in (0, 1] (1 = off)"),
    "top_k": ("int", 0, INT32_MAX, ">= 0 (0 = off)"),
    "min_p": ("float", 0.0, 1.0, "in [0, 1] (0 = off)"),
    "max_new_tokens": ("int", 1, INT32_MAX, ">= 1"),
    "min_tokens": ("int", 0, INT32_MAX, ">= 0"),
    "logprobs": ("int", 0, INT32_MAX, ">= 0 (alternatives per token)"),
    "seed": ("int", SEED_MIN, SEED_MAX, "a 64-bit integer"),
    "presence_penalty": ("float", -2.0, 2.0, "in [-2, 2] (0 = off)"),
    "frequency_penalty": ("float", -2.0, 2.0, "in [-2, 2] (0 = off)"),
    "repetition_penalty": ("float", 0.0, math.inf, "> 0 (1 = off)"),
}


class SamplingError(ValueError):
    """A sampling field out of range; `field` is its SamplingParams name."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def check_field(name: str, value: Any, owner: str = "SamplingParams", label: Optional[str] = None) -> None:
    """Raises ValueError naming `owner.label` (label: the caller's name for field `name`, e.g.
    max_tokens) when `value` is out of the field's range (None passes: an unset optional field).
    Integers must be ints (not bools) within int32 (seeds: 64 bits); numbers must be finite."""
    if value is None:
        return
    kind, low, high, meaning = _RULES[name]
    where = f"{owner}.{label or name}"
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise SamplingError(name, f"{where} must be an integer, got {value!r}")
        if not low <= value <= high:
            extra = f" and at most {high} (int32)" if high == INT32_MAX else ""
            raise SamplingError(name, f"{where} must be {meaning}{extra}, got {value}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SamplingError(name, f"{where} must be a finite number {meaning}, got {value!r}")
    if not low <= value <= high or (name in ("top_p", "repetition_penalty") and value == 0):
        raise SamplingError(name, f"{where} must be {meaning}, got {value}")


def check_token_ids(name: str, ids: tuple, owner: str = "SamplingParams") -> None:
    """Token ids must be non-negative int32 integers."""
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i <= INT32_MAX:
            raise SamplingError(name, f"{owner}.{name} must hold token ids (integers in [0, 2^31)), got {i!r}")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample. temperature 0 is greedy; top_k 0 (or None) and top_p 1 are off. `stop`
    strings end a sample (not included in its text); EOS ids of the tokenizer/model and
    `stop_token_ids` end it too (unless `ignore_eos`, which ignores only the EOS ids).
    `seed` None draws fresh entropy per call."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Optional[int] = 0
    max_new_tokens: int = 1024
    seed: Optional[int] = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logprobs: Optional[int] = None  # per token: the chosen token's logprob and this many alternatives
    min_p: float = 0.0  # drop tokens below min_p x the most likely token's probability (after temperature)
    min_tokens: int = 0  # EOS / stop token ids cannot end a sample before this many tokens
    # Penalties, applied to the logits before temperature (vLLM's order: repetition, then frequency
    # and presence). With c[t] the times token t was generated so far in this sample:
    #   repetition (HF/vLLM): a token seen in the prompt or the output has its logit divided by r
    #     when positive, multiplied by r when not;
    #   frequency/presence (OpenAI): logit[t] -= frequency * c[t] + presence * (c[t] > 0).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0

    @property
    def penalized(self) -> bool:
        """Whether any penalty is on."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)

    def __post_init__(self):
        owner = type(self).__name__
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise SamplingError("stop", f"{owner}.stop must be non-empty strings, got {stop!r}")
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "top_k", 0 if self.top_k is None else self.top_k)
        for name in _RULES:
            check_field(name, getattr(self, name), owner)
        check_token_ids("stop_token_ids", self.stop_token_ids, owner)
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingError(name, f"{owner}.{name} must be true or false, got {getattr(self, name)!r}")

    def replace(self, **changes) -> "SamplingParams":
        """A copy with `changes` (validated again)."""
        return dataclasses.replace(self, **changes)


def derive_seed(base: Optional[int], *keys: Any) -> int:
    """A 31-bit seed for (base seed, keys...), the same in every process; fresh entropy when `base`
    is None (an unseeded request)."""
    if base is None:
        return int.from_bytes(os.urandom(4), "little") & INT32_MAX
    text = ":".join(str(k) for k in (base, *keys))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & INT32_MAX
