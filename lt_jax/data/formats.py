"""Reads distilled long-CoT data in the layouts the field publishes, into one `Record` type.

Files: JSONL (optionally .gz), JSON (a list, or {"data": [...]}), Parquet, or a folder of them;
local or gs:// (everything goes through lt_jax.storage). Layouts, auto-detected from each file's
first recognisable row or forced with `layout=`:

- "responses": this project's responses.jsonl / graded.jsonl (problem_id, sample_index, prompt,
  response, reasoning_content, reference_answer, status, ...).
- "openai": `messages` [{role, content}] with thinking inline as <think>...</think> or in the
  assistant message's `reasoning_content` (DeepSeek) / `reasoning` (vLLM) field.
- "sharegpt": `conversations` [{from, value}] with human/gpt/system (also user/assistant), an
  optional top-level `system`, and OpenThoughts / Bespoke-Stratos markers
  <|begin_of_thought|>...<|end_of_thought|> <|begin_of_solution|>...<|end_of_solution|>.
- "problem_solution": a problem field plus a response and/or thinking field: s1K
  (question, thinking_trajectories: list, attempt, solution = gold), s1K-1.1 (deepseek_*), LIMO
  (question, solution = the long response, answer = gold).
- "am": a-m-team AM-DeepSeek distilled sets: `messages` whose entries carry `info`
  (think_content, answer_content, reference_answer, verify_score, source) and/or a top-level
  `info` (answer, verify_score, source); assistant text as <think>...</think><answer>...</answer>.

Field names are remappable: `fields={"problem": "question", "reference": "info.answer"}` reads the
canonical field from another (dotted) key. Canonical names: id, problem, response, thinking,
reference, system, messages, conversations, source.

Only the last assistant turn keeps its thinking (`Record.thinking`); earlier assistant turns keep
their visible answer only, which is what chat templates such as Qwen's render for history anyway.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Iterator

from lt_jax import storage
from lt_jax.data.jsonl import DataError, DropLog, Policy, check_policy, handle, loads, read_jsonl

# The papers' math instruction, one text for distillation, the synthetic teacher and evaluation.
# `{problem}` is replaced; MATH_PROMPT_FORMAT is the same text as a str.format template (braces doubled).
MATH_PROMPT = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{}."
MATH_PROMPT_FORMAT = MATH_PROMPT.replace("{}", "{{}}")

LAYOUTS = ("responses", "openai", "sharegpt", "problem_solution", "am")
CANONICAL = ("id", "problem", "response", "thinking", "reference", "system", "messages", "conversations", "source")
_KEYS: dict[str, tuple[str, ...]] = {
    "id": ("id", "problem_id", "uuid", "unique_id", "question_id"),
    "problem": ("problem", "question", "prompt", "instruction", "query"),
    "response": ("response", "attempt", "deepseek_attempt", "output", "completion", "generation"),
    "thinking": ("reasoning_content", "thinking", "thinking_trajectories", "deepseek_thinking_trajectory", "think_content", "reasoning"),
    "reference": ("reference_answer", "answer", "gold", "ground_truth"),
    "system": ("system",),
    "messages": ("messages",),
    "conversations": ("conversations",),
    "source": ("source", "data_source", "source_type"),
}
_ROLES = {
    "system": "system", "developer": "system", "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant", "chatgpt": "assistant", "bot": "assistant",
}
_MISSING = object()
SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".json", ".parquet")


@dataclasses.dataclass
class Record:
    """One normalised example: a chat whose last assistant turn is the (graded / trained) response.

    `messages` holds system / user / assistant turns with the assistant's visible text only; the last
    assistant turn's thinking is in `thinking` (None when the source has none). `reference` is the
    gold answer when known. `meta` keeps every other source field; `raw` is the input row.
    """

    id: str
    messages: list[dict[str, str]]
    thinking: str | None = None
    reference: str | None = None
    source: str = ""
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    raw: dict[str, Any] | None = dataclasses.field(default=None, repr=False, compare=False)
    file: str = dataclasses.field(default="", compare=False)
    line: int = dataclasses.field(default=0, compare=False)

    @property
    def problem(self) -> str:
        """The last user turn (the problem as asked)."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")

    @property
    def answer(self) -> str:
        """The last assistant turn's visible text (after the thinking)."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "assistant"), "")

    def assistant_text(self) -> str:
        """The final turn as trained on: "<think>\\n{thinking}\\n</think>\\n\\n{answer}" (answer alone without thinking)."""
        return join_thinking(self.thinking, self.answer)

    def to_sft(self, meta: dict[str, Any] | None = None) -> dict[str, Any]:
        """The sft.jsonl row (id, messages with thinking inline in the last assistant turn, meta)."""
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        msgs = [dict(m) for m in self.messages[: last + 1]]
        msgs[last]["content"] = self.assistant_text()
        return {"id": self.id, "messages": msgs, "meta": {**self.meta, **(meta or {})}}


# ---------------------------------------------------------------------------------------------
# Thinking / answer split


_THOUGHT = re.compile(r"<\|begin_of_thought\|>(.*?)<\|end_of_thought\|>", re.S)
_SOLUTION = re.compile(r"<\|begin_of_solution\|>(.*?)(?:<\|end_of_solution\|>|$)", re.S)
_ANSWER_TAG = re.compile(r"^\s*<answer>(.*?)(?:</answer>\s*)?$", re.S)


def split_thinking(text: str) -> tuple[str | None, str]:
    """(thinking, answer) from a response with inline thinking.

    Everything up to the last </think> is thinking (one leading <think> removed): this covers
    <think>...</think>, several blocks, a bare "...</think>" (templates that open <think> in the
    prompt), an unclosed <think> (truncated: everything is thinking, the answer is empty), the
    OpenThoughts thought/solution markers and AM's <answer>...</answer> wrapper. Text with no
    markers is all answer.
    """
    text = text or ""
    m = _THOUGHT.search(text)
    if m:
        rest = text[m.end():]
        sol = _SOLUTION.search(rest)
        return m.group(1).strip(), (sol.group(1) if sol else rest).strip()
    if "<|begin_of_thought|>" in text:
        return text.split("<|begin_of_thought|>", 1)[1].strip(), ""
    if "</think>" in text:
        # Everything up to the last closing tag is thinking, however many blocks the model opened.
        head, answer = text.rsplit("</think>", 1)
        head = head.lstrip()
        thinking = (head[len("<think>"):] if head.startswith("<think>") else head).strip()
    elif "<think>" in text:
        return text.split("<think>", 1)[1].strip(), ""
    else:
        thinking, answer = None, text
    tag = _ANSWER_TAG.match(answer)
    return thinking, (tag.group(1) if tag else answer).strip()


def join_thinking(thinking: str | None, answer: str) -> str:
    """Inverse of `split_thinking` for training text."""
    if thinking is None:
        return answer
    return f"<think>\n{thinking}\n</think>\n\n{answer}"


# ---------------------------------------------------------------------------------------------
# Rows from files


def list_files(path: str) -> list[str]:
    """`path` itself, or the supported data files directly inside a folder (sorted)."""
    if storage.isdir(path):
        names = [n for n in storage.listdir(path) if n.endswith(SUFFIXES)]
        if not names:
            raise DataError(path, None, None, f"folder has no data files ({', '.join(SUFFIXES)})", "no_files")
        return [storage.join(path, n) for n in names]
    return [path]


def read_rows(path: str, *, policy: Policy = "skip", drops: DropLog | None = None) -> Iterator[tuple[int, dict]]:
    """Yields (line / item / row number, 1-based; dict) from one JSONL, JSON or Parquet file."""
    check_policy(policy)
    name = str(path)
    if name.endswith((".parquet", ".pq")):
        yield from _parquet_rows(path, policy, drops)
    elif name.endswith(".json"):
        yield from _json_rows(path, policy, drops)
    else:
        yield from read_jsonl(path, policy=policy, drops=drops)


def _json_rows(path: str, policy: Policy, drops: DropLog | None) -> Iterator[tuple[int, dict]]:
    data = storage.read_bytes(path)
    try:
        doc = loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        handle(DataError(path, None, None, f"invalid UTF-8 at byte {e.start}", "invalid_utf8"), policy, drops)
        return
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # a .json file that is really JSON Lines
            yield from read_jsonl(path, policy=policy, drops=drops)
            return
        handle(DataError(path, e.lineno, None, f"invalid JSON: {e.msg}", "invalid_json"), policy, drops)
        return
    if isinstance(doc, dict):
        lists = [k for k, v in doc.items() if isinstance(v, list)]
        key = "data" if "data" in lists else (lists[0] if len(lists) == 1 else None)
        if key is None:
            doc = [doc]
        else:
            doc = doc[key]
    for i, item in enumerate(doc, start=1):
        if isinstance(item, dict):
            yield i, item
        else:
            handle(DataError(path, i, None, f"item {i}: expected a JSON object, got {type(item).__name__}", "not_an_object"), policy, drops)


def _parquet_rows(path: str, policy: Policy, drops: DropLog | None) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq  # 0.4 s to import; only Parquet inputs need it, and grade must start fast

    with storage.open_file(path, "rb") as f:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # pyarrow raises several types for a corrupt file
            handle(DataError(path, None, None, f"not a readable Parquet file: {e}", "invalid_parquet"), policy, drops)
            return
        row = 0
        for batch in pf.iter_batches(batch_size=1024):
            for item in batch.to_pylist():
                row += 1
                yield row, item


# ---------------------------------------------------------------------------------------------
# Field access


def get_path(row: dict, dotted: str) -> Any:
    """row["a"]["b"] for "a.b"; _MISSING when any part is absent."""
    node: Any = row
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


class _Row:
    """A row with canonical-name lookup through the field map; errors name the source key."""

    def __init__(self, data: dict, fields: dict[str, str], path: str, line: int):
        self.data, self.fields, self.path, self.line = data, fields, path, line

    def key(self, canon: str) -> str | None:
        if canon in self.fields:
            return self.fields[canon]
        return next((k for k in _KEYS[canon] if self.data.get(k) is not None), None)

    def get(self, canon: str, default: Any = None) -> Any:
        key = self.key(canon)
        if key is None:
            return default
        value = get_path(self.data, key)
        return default if value is _MISSING or value is None else value

    def has(self, canon: str) -> bool:
        return self.get(canon, _MISSING) is not _MISSING

    def error(self, field: str | None, message: str, reason: str) -> DataError:
        return DataError(self.path, self.line, field, message, reason)

    def text(self, canon: str, *, required: bool = True, key: str | None = None) -> str | None:
        """A string field (numbers accepted and converted for answers/ids)."""
        key = key or self.key(canon) or canon
        value = get_path(self.data, key)
        if value is _MISSING or value is None:
            if required:
                raise self.error(key, "required field is missing", "missing_field")
            return None
        if isinstance(value, list) and canon == "thinking" and all(isinstance(v, str) for v in value):
            return "\n\n".join(value)  # s1K: thinking_trajectories is a list of strings
        if isinstance(value, (int, float)) and not isinstance(value, bool) and canon in ("id", "reference"):
            return str(value)
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {type(value).__name__}", "wrong_type")
        return value


def detect_layout(row: dict, fields: dict[str, str] | None = None) -> str | None:
    """The layout a row looks like, or None."""
    r = _Row(row, fields or {}, "", 0)
    if r.has("messages"):
        msgs = r.get("messages")
        has_info = isinstance(row.get("info"), dict) or (
            isinstance(msgs, list) and any(isinstance(m, dict) and isinstance(m.get("info"), dict) for m in msgs)
        )
        return "am" if has_info else "openai"
    if r.has("conversations"):
        return "sharegpt"
    if "problem_id" in row and ("response" in row or "prompt" in row or "status" in row):
        return "responses"
    if r.has("problem") and (r.has("response") or r.has("thinking") or "solution" in row):
        return "problem_solution"
    return None


# ---------------------------------------------------------------------------------------------
# Layout parsers: _Row -> Record (raise DataError)


def _content(r: _Row, value: Any, field: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):  # OpenAI content parts
        return "".join(str(p.get("text", "")) for p in value if p.get("type", "text") == "text")
    raise r.error(field, f"expected a string, got {type(value).__name__}", "wrong_type")


def _turns(r: _Row, canon: str, role_key: str, text_key: str) -> list[tuple[dict, str, str]]:
    """(original message, role, content) for each turn of a chat list; checks types and roles."""
    key = r.key(canon) or canon
    items = get_path(r.data, key)
    if items is _MISSING or items is None:
        raise r.error(key, "required field is missing", "missing_field")
    if not isinstance(items, list):
        raise r.error(key, f"expected a list of turns, got {type(items).__name__}", "wrong_type")
    out = []
    for i, m in enumerate(items):
        f = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise r.error(f, f"expected an object, got {type(m).__name__}", "wrong_type")
        role = m.get(role_key)
        if not isinstance(role, str):
            raise r.error(f"{f}.{role_key}", f"expected a role string, got {type(role).__name__}", "wrong_type")
        if role.lower() not in _ROLES:
            raise r.error(f"{f}.{role_key}", f"unsupported role {role!r}; known: {', '.join(sorted(_ROLES))}", "bad_role")
        content = m.get(text_key)
        if content is None:
            raise r.error(f"{f}.{text_key}", "turn has no content", "missing_field")
        out.append((m, _ROLES[role.lower()], _content(r, content, f"{f}.{text_key}")))
    return out


def _chat_record(r: _Row, turns: list[tuple[dict, str, str]], extract: Callable[[dict, str], tuple[str | None, str]]) -> tuple[list[dict], str | None]:
    """Messages (visible text only) and the last assistant turn's thinking."""
    key = r.key("messages") or r.key("conversations") or "messages"
    if not any(role == "assistant" for _, role, _ in turns):
        raise r.error(key, "no assistant turn", "no_assistant_turn")
    if not any(role == "user" for _, role, _ in turns):
        raise r.error(key, "no user turn", "no_user_turn")
    system = r.get("system")
    messages = [{"role": "system", "content": _content(r, system, "system")}] if system and turns[0][1] != "system" else []
    thinking = None
    last = max(i for i, (_, role, _) in enumerate(turns) if role == "assistant")
    for i, (m, role, content) in enumerate(turns[: last + 1]):
        if role == "assistant":
            t, content = extract(m, content)
            if i == last:
                thinking = t
        messages.append({"role": role, "content": content})
    return messages, thinking


def _openai_extract(m: dict, content: str) -> tuple[str | None, str]:
    thinking, answer = split_thinking(content)
    sep = m.get("reasoning_content") or m.get("reasoning")
    if isinstance(sep, str) and sep.strip():
        thinking = sep.strip() if thinking is None else f"{sep.strip()}\n\n{thinking}"
    return thinking, answer


def _am_extract(m: dict, content: str) -> tuple[str | None, str]:
    info = m.get("info") if isinstance(m.get("info"), dict) else {}
    think, ans = info.get("think_content"), info.get("answer_content")
    if isinstance(think, str) and isinstance(ans, str):
        return think.strip(), ans.strip()
    return _openai_extract(m, content)


def _parse_openai(r: _Row) -> tuple[list[dict], str | None, str | None, dict]:
    messages, thinking = _chat_record(r, _turns(r, "messages", "role", "content"), _openai_extract)
    top = r.text("thinking", required=False) if r.key("thinking") else None
    return messages, (thinking or top), r.text("reference", required=False), {}


def _parse_am(r: _Row) -> tuple[list[dict], str | None, str | None, dict]:
    turns = _turns(r, "messages", "role", "content")
    messages, thinking = _chat_record(r, turns, _am_extract)
    infos = [m["info"] for m, _, _ in turns if isinstance(m.get("info"), dict)]
    if isinstance(r.data.get("info"), dict):
        infos.insert(0, r.data["info"])
    meta: dict[str, Any] = {}
    reference = r.text("reference", required=False) if "reference" in r.fields else None
    for info in infos:
        for src, dst in (("reference_answer", "reference"), ("answer", "reference"), ("verify_score", "verify_score"), ("source", "source"), ("model_name", "teacher")):
            value = info.get(src)
            if value is None:
                continue
            if dst == "reference":
                reference = reference if reference is not None else str(value)
            else:
                meta.setdefault(dst, value)
    return messages, thinking, reference, meta


def _parse_sharegpt(r: _Row) -> tuple[list[dict], str | None, str | None, dict]:
    messages, thinking = _chat_record(r, _turns(r, "conversations", "from", "value"), lambda m, c: split_thinking(c))
    return messages, thinking, r.text("reference", required=False), {}


def _parse_problem_solution(r: _Row) -> tuple[list[dict], str | None, str | None, dict]:
    problem = r.text("problem")
    thinking = r.text("thinking", required=False) if r.key("thinking") else None
    reference = r.text("reference", required=False) if r.key("reference") else None
    if r.key("response"):
        response = r.text("response")
        if reference is None and "solution" in r.data and "response" not in r.fields:
            reference = r.text("reference", key="solution", required=False)  # s1K: solution is the gold
    elif "solution" in r.data:
        response = r.text("response", key="solution")  # LIMO: solution is the long response
    elif thinking is not None:
        response = ""
    else:
        raise r.error(r.key("problem"), "no response, solution or thinking field beside the problem", "missing_field")
    inline, answer = split_thinking(response)
    if inline is not None:
        thinking = inline if thinking is None else f"{thinking}\n\n{inline}"
    messages = []
    system = r.get("system")
    if system:
        messages.append({"role": "system", "content": _content(r, system, "system")})
    messages += [{"role": "user", "content": problem}, {"role": "assistant", "content": answer}]
    return messages, thinking, reference, {}


_RESPONSE_KEYS = ("prompt", "response", "reasoning_content", "reference_answer")


def _parse_responses(r: _Row) -> tuple[list[dict], str | None, str | None, dict]:
    pid = r.text("id", key=r.fields.get("id", "problem_id"))
    k = r.data.get("sample_index", 0)
    if not isinstance(k, int) or isinstance(k, bool):
        raise r.error("sample_index", f"expected an int, got {type(k).__name__}", "wrong_type")
    status = r.data.get("status", "ok")
    if status not in ("ok", "failed"):
        raise r.error("status", f"expected 'ok' or 'failed', got {status!r}", "wrong_type")
    prompt = r.text("problem", key=r.fields.get("problem", "prompt"))
    failed = status == "failed"
    response = r.text("response", key=r.fields.get("response", "response"), required=not failed) or ""
    separate = r.text("thinking", key=r.fields.get("thinking", "reasoning_content"), required=False)
    inline, answer = split_thinking(response)
    thinking = inline
    if separate and separate.strip():
        thinking = separate.strip() if inline is None else f"{separate.strip()}\n\n{inline}"
    reference = r.text("reference", key=r.fields.get("reference", "reference_answer"), required=False)
    meta = {k_: v for k_, v in r.data.items() if k_ not in _RESPONSE_KEYS and k_ != "system"}
    meta["problem_id"], meta["sample_index"] = pid, k
    system = r.data.get("system")
    head = [{"role": "system", "content": _content(r, system, "system")}] if system else []
    return head + [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], thinking, reference, meta


_PARSERS = {
    "responses": _parse_responses, "openai": _parse_openai, "sharegpt": _parse_sharegpt,
    "problem_solution": _parse_problem_solution, "am": _parse_am,
}


def to_record(row: dict, layout: str, fields: dict[str, str] | None, path: str, line: int, source: str = "") -> Record:
    """Parses one row of a known layout into a Record; raises DataError naming file, line and field."""
    if layout not in _PARSERS:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    r = _Row(row, fields or {}, path, line)
    messages, thinking, reference, meta = _PARSERS[layout](r)
    if layout == "responses":
        rid = f"{meta['problem_id']}#{meta['sample_index']}"
    else:
        rid = r.text("id", required=False) if r.key("id") else None
        rid = rid or f"{os.path.basename(str(path))}:{line}"
    src = source or str(meta.get("source") or r.get("source") or os.path.basename(str(path)))
    meta.setdefault("source", src)
    return Record(id=rid, messages=messages, thinking=thinking, reference=reference, source=src, meta=meta, raw=row, file=str(path), line=line)


def parse_fields(items: list[str] | None) -> dict[str, str]:
    """["problem=question", ...] -> {"problem": "question"}; canonical names are checked."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--field {item!r}: expected CANONICAL=SOURCE_KEY, e.g. problem=question")
        canon, key = (s.strip() for s in item.split("=", 1))
        if canon not in CANONICAL:
            raise ValueError(f"--field {item!r}: unknown field {canon!r}; canonical fields: {', '.join(CANONICAL)}")
        out[canon] = key
    return out


def read_records(
    path: str,
    *,
    layout: str = "auto",
    fields: dict[str, str] | None = None,
    policy: Policy = "skip",
    drops: DropLog | None = None,
    source: str = "",
) -> Iterator[Record]:
    """Yields normalised Records from a file or folder; bad rows are counted in `drops` or raised."""
    check_policy(policy)
    if layout != "auto" and layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from auto, {', '.join(LAYOUTS)}")
    for file in list_files(path):
        file_layout = None if layout == "auto" else layout
        for line, row in read_rows(file, policy=policy, drops=drops):
            current = file_layout or detect_layout(row, fields)
            if current is None:
                keys = ", ".join(sorted(row)[:12])
                handle(DataError(file, line, None, f"unrecognised layout (keys: {keys}); pass layout= or field mappings", "unknown_layout"), policy, drops)
                continue
            file_layout = current
            try:
                yield to_record(row, current, fields, file, line, source)
            except DataError as e:
                handle(e, policy, drops)
