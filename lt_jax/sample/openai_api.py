"""The OpenAI wire format: request validation, response and stream-chunk bodies, <think> splitting.

Pure functions over plain dicts so the server (lt_jax.sample.server) stays a thin shell. Field
names and shapes follow the OpenAI Chat Completions and (legacy) Completions APIs; two common
extensions are accepted: `top_k` (vLLM/SGLang) and `reasoning_format` ("inline" keeps
<think>...</think> in `content`; "separate" moves it to `reasoning_content`, DeepSeek style).
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from typing import Any

from lt_jax.data.formats import split_thinking
from lt_jax.sample.backends import GenRequest
from lt_jax.sampling import INT32_MAX, SamplingError

REASONING_FORMATS = ("inline", "separate")
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Parameters that would change the output in ways the backends cannot honour: refuse, don't ignore.
_UNSUPPORTED = {
    "tools": lambda v: bool(v), "functions": lambda v: bool(v), "echo": lambda v: bool(v),
    "best_of": lambda v: v not in (None, 1), "suffix": lambda v: v is not None,
    "logit_bias": lambda v: bool(v), "audio": lambda v: v is not None,
    "response_format": lambda v: isinstance(v, dict) and v.get("type") not in (None, "text"),
}


class APIError(Exception):
    """An error the client sees as an OpenAI error body with this HTTP status."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int = 400, type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass(frozen=True)
class ParsedCall:
    """A validated request: one GenRequest per prompt (chat always has one)."""

    model: str
    requests: tuple[GenRequest, ...]
    stream: bool
    include_usage: bool
    reasoning_format: str


# ---------------------------------------------------------------------------------------------
# Field validation


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise APIError(f"'{name}' must be a number, got {value!r}", param=name, code="invalid_type")
    if not math.isfinite(value) or value > hi or value < lo or (lo_open and value == lo):
        bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise APIError(f"'{name}' must be in {bound}, got {value}", param=name, code="invalid_value")
    return float(value)


def _integer(body: dict, name: str, lo: int, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(f"'{name}' must be an integer, got {value!r}", param=name, code="invalid_type")
    if value < lo or (hi is not None and value > hi):
        raise APIError(f"'{name}' must be between {lo} and {hi}, got {value}" if hi is not None
                       else f"'{name}' must be >= {lo}, got {value}", param=name, code="invalid_value")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value) or len(value) > 16:
        raise APIError("'stop' must be a string or a list of at most 16 strings", param="stop", code="invalid_type")
    return tuple(s for s in value if s)


def _sampling(body: dict, max_n: int) -> dict[str, Any]:
    for name, bad in _UNSUPPORTED.items():
        if bad(body.get(name)):
            raise APIError(f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")
    top_k = _integer(body, "top_k", -1, INT32_MAX)
    max_tokens = _integer(body, "max_completion_tokens", 1, INT32_MAX)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1, INT32_MAX)
    return dict(
        n=_integer(body, "n", 1, max_n) or 1,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=None if top_k in (None, -1, 0) else top_k,
        max_tokens=max_tokens,
        stop=_stop(body),
        seed=_integer(body, "seed", -(2**63)),
        stop_token_ids=_token_ids(body, "stop_token_ids"),
        ignore_eos=_boolean(body, "ignore_eos"),
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        min_tokens=_integer(body, "min_tokens", 0, INT32_MAX) or 0,
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, math.inf, lo_open=True),
    )


def _token_ids(body: dict, name: str) -> tuple[int, ...]:
    value = body.get(name) or []
    if (not isinstance(value, list) or len(value) > 64
            or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= INT32_MAX for i in value)):
        raise APIError(f"'{name}' must be a list of at most 64 token ids (non-negative integers)", param=name,
                       code="invalid_value")
    return tuple(value)


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(f"'{name}' must be a boolean, got {value!r}", param=name, code="invalid_type")
    return value


def _common(body: Any, served: str) -> tuple[str, bool, bool]:
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object", code="invalid_body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError("'model' is required and must be a string", param="model", code="invalid_type")
    if model != served:
        raise APIError(f"model {model!r} does not exist; this server serves {served!r}", param="model",
                       code="model_not_found", status=404)
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise APIError("'stream' must be a boolean", param="stream", code="invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError("'stream_options' must be an object", param="stream_options", code="invalid_type")
    return model, stream, bool(options.get("include_usage"))


def _messages(value: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise APIError("'messages' must be a non-empty list", param="messages", code="invalid_type")
    out = []
    for i, m in enumerate(value):
        param = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise APIError(f"{param}: expected an object with role one of {sorted(_ROLES)}", param=param,
                           code="invalid_value")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(f"{param}.content: only text parts are supported", param=param,
                               code="unsupported_content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(f"{param}.content must be a string or a list of text parts", param=param,
                           code="invalid_type")
        out.append({"role": _ROLES[m["role"]], "content": content})
    return tuple(out)


def _reasoning_format(body: dict, default: str) -> str:
    value = body.get("reasoning_format") or default
    if value not in REASONING_FORMATS:
        raise APIError(f"'reasoning_format' must be one of {REASONING_FORMATS}, got {value!r}",
                       param="reasoning_format", code="invalid_value")
    return value


MAX_LOGPROBS = 20


def _logprobs(body: dict, chat: bool, stream: bool) -> int | None:
    """Top alternatives per token wanted (None: no logprobs). Chat: `logprobs` true and
    `top_logprobs`; completions: `logprobs` as the count."""
    if chat:
        wanted = _boolean(body, "logprobs")
        top = _integer(body, "top_logprobs", 0, MAX_LOGPROBS)
        if top is not None and not wanted:
            raise APIError("'top_logprobs' needs 'logprobs': true", param="top_logprobs", code="invalid_value")
        count = (top or 0) if wanted else None
    else:
        count = _integer(body, "logprobs", 0, MAX_LOGPROBS)
    return count


def _request(**fields) -> GenRequest:
    """The request, its fields checked by the shared SamplingParams rules (a 400 naming the field)."""
    try:
        return GenRequest(**fields)
    except SamplingError as e:
        param = {"max_new_tokens": "max_tokens"}.get(e.field, e.field)
        raise APIError(f"'{param}': {e}", param=param, code="invalid_value") from None


def parse_chat(body: Any, served: str, *, max_n: int, reasoning_format: str) -> ParsedCall:
    """Validates a /v1/chat/completions body; raises APIError naming the bad field."""
    model, stream, usage = _common(body, served)
    request = _request(messages=_messages(body.get("messages")), **_sampling(body, max_n),
                       logprobs=_logprobs(body, True, stream))
    return ParsedCall(model, (request,), stream, usage, _reasoning_format(body, reasoning_format))


def parse_completion(body: Any, served: str, *, max_n: int, max_prompts: int = 64) -> ParsedCall:
    """Validates a /v1/completions body (a prompt string or a list of prompt strings)."""
    model, stream, usage = _common(body, served)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise APIError("'prompt' must be a string or a non-empty list of strings (token ids are not supported)",
                       param="prompt", code="invalid_type")
    if len(prompts) > max_prompts:
        raise APIError(f"at most {max_prompts} prompts per request", param="prompt", code="invalid_value")
    sampling = dict(_sampling(body, max_n), logprobs=_logprobs(body, False, stream))
    return ParsedCall(model, tuple(_request(prompt=p, **sampling) for p in prompts), stream, usage, "inline")


# ---------------------------------------------------------------------------------------------
# <think> splitting, incremental so streamed and whole responses split identically


class ThinkSplitter:
    """Routes text into (reasoning, content): a leading <think>...</think> block is reasoning.

    Feed it deltas; it holds back only what could still be part of a tag (or the newlines
    around the thinking, which are dropped like the tags). Text without a leading <think> is
    all content; an unclosed block (cut by max_tokens) is all reasoning.
    """

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self):
        self._buf, self._state = "", "start"

    def feed(self, text: str) -> tuple[str, str]:
        self._buf += text
        reasoning, content = [], []
        while True:
            buf = self._buf
            if self._state == "start":
                head = buf.lstrip()
                if head.startswith(self.OPEN):
                    self._buf, self._state = head[len(self.OPEN):], "think_start"
                elif not self.OPEN.startswith(head):
                    self._state = "content"
                else:
                    break
            elif self._state == "think_start":
                self._buf = buf.lstrip("\n")
                if not self._buf:
                    break
                self._state = "think"
            elif self._state == "think":
                end = buf.find(self.CLOSE)
                if end >= 0:
                    reasoning.append(buf[:end].rstrip("\n"))
                    self._buf, self._state = buf[end + len(self.CLOSE):], "after"
                    continue
                keep = _held_suffix(buf, self.CLOSE)
                reasoning.append(buf[:len(buf) - keep])
                self._buf = buf[len(buf) - keep:]
                break
            elif self._state == "after":
                self._buf = buf.lstrip()
                if not self._buf:
                    break
                self._state = "content"
            else:
                content.append(buf)
                self._buf = ""
                break
        return "".join(reasoning), "".join(content)

    def flush(self) -> tuple[str, str]:
        """Whatever is held back at the end of the text."""
        buf, self._buf = self._buf, ""
        if self._state in ("think", "think_start"):
            return buf.rstrip("\n"), ""
        return "", "" if self._state == "after" else buf


def _held_suffix(buf: str, tag: str) -> int:
    """Length of the tail of `buf` that may still become `tag` (a tag prefix, plus newlines before it)."""
    keep = next((k for k in range(min(len(tag) - 1, len(buf)), 0, -1) if tag.startswith(buf[-k:])), 0)
    while keep < len(buf) and buf[len(buf) - keep - 1] == "\n":
        keep += 1
    return keep


def split_think(text: str) -> tuple[str | None, str]:
    """(reasoning or None, content) of a finished text: the data stages' rule (formats.split_thinking)."""
    return split_thinking(text)


# ---------------------------------------------------------------------------------------------
# Response bodies


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_message(text: str, reasoning_format: str) -> dict[str, Any]:
    if reasoning_format == "separate":
        reasoning, content = split_think(text)
        return {"role": "assistant", "content": content, "reasoning_content": reasoning}
    return {"role": "assistant", "content": text}


def chat_response(call_id: str, model: str, choices: list[tuple[str, str]], reasoning_format: str,
                  use: dict[str, int], logprobs: list | None = None) -> dict[str, Any]:
    """A chat.completion body; `choices` are (text, finish_reason) pairs in index order; logprobs:
    per choice, (token text, logprob, [(token text, logprob), ...]) per generated token, or None."""
    logprobs = logprobs or [None] * len(choices)
    return {
        "id": call_id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "message": chat_message(text, reasoning_format), "finish_reason": finish,
                     "logprobs": chat_logprobs(lp)} for i, ((text, finish), lp) in enumerate(zip(choices, logprobs))],
        "usage": use,
    }


def completion_response(call_id: str, model: str, choices: list[tuple[str, str]],
                        use: dict[str, int], logprobs: list | None = None) -> dict[str, Any]:
    logprobs = logprobs or [None] * len(choices)
    return {
        "id": call_id, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "text": text, "finish_reason": finish, "logprobs": completion_logprobs(lp)}
                    for i, ((text, finish), lp) in enumerate(zip(choices, logprobs))],
        "usage": use,
    }


def _token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(entries: list | None) -> dict[str, Any] | None:
    """The chat `logprobs` object ({"content": [...]}) of a choice's token entries."""
    if entries is None:
        return None
    return {"content": [dict(_token(t, lp), top_logprobs=[_token(a, alp) for a, alp in top])
                        for t, lp, top in entries]}


def completion_logprobs(entries: list | None, start: int = 0) -> dict[str, Any] | None:
    """The legacy completions `logprobs` object (tokens, token_logprobs, top_logprobs, text_offset);
    `start`: the text offset of the first entry (a streamed chunk's, in the choice's text)."""
    if entries is None:
        return None
    offsets, at = [], start
    for t, _, _ in entries:
        offsets.append(at)
        at += len(t)
    return {"tokens": [t for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [dict(top) for _, _, top in entries], "text_offset": offsets}


def chat_chunk(call_id: str, model: str, index: int, delta: dict[str, Any],
               finish_reason: str | None = None, logprobs: list | None = None) -> dict[str, Any]:
    """A chat.completion.chunk; `logprobs`: the entries of the tokens this chunk adds (as in
    `chat_response`), when asked."""
    return {"id": call_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason,
                         "logprobs": chat_logprobs(logprobs)}]}


def completion_chunk(call_id: str, model: str, index: int, text: str, finish_reason: str | None = None,
                     logprobs: list | None = None, offset: int = 0) -> dict[str, Any]:
    """A streamed text_completion; `logprobs` of the tokens it adds, the first at text `offset`."""
    return {"id": call_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "finish_reason": finish_reason,
                         "logprobs": completion_logprobs(logprobs, offset)}]}


def usage_chunk(call_id: str, model: str, obj: str, use: dict[str, int]) -> dict[str, Any]:
    return {"id": call_id, "object": obj, "created": int(time.time()), "model": model, "choices": [],
            "usage": use}


def model_list(name: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(name, created)]}


def model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "lt_jax"}
