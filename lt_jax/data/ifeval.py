"""The "instruction_following" verifier: IFEval-style verifiable constraints, checked by rule.

A record carries its constraints the way google/IFEval publishes them, `instruction_id_list`
(e.g. ["punctuation:no_comma", "length_constraints:number_words"]) plus a parallel `kwargs` list of
argument dicts, or as `constraints: [{"id": ..., **arguments}]`. Score = the share of constraints
the final answer satisfies (strict: the response as written); a response passes above 0.99, i.e.
all of them. A constraint id we do not implement scores as failed with the note "unsupported
constraint ID" (so a gap never passes silently), and malformed arguments are noted too.

Why our own code: the package index has no maintained, self-contained implementation. The
candidates either pull a whole evaluation harness and dataset loader (lm-eval, if-verifiable) or,
like Google's reference code they wrap, need NLTK tokenizer data downloaded at run time. The
kinds below are IFEval's common ones; sentences are split on end punctuation, words on word
characters, which can differ from NLTK's tokenizers at the edges (abbreviations).
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from lt_jax.data.verify import Verdict, register_verifier

Check = Callable[..., bool]
_CHECKS: dict[str, Check] = {}


def check(name: str) -> Callable[[Check], Check]:
    def add(fn: Check) -> Check:
        _CHECKS[name] = fn
        return fn
    return add


def supported() -> list[str]:
    return sorted(_CHECKS)


def _compare(value: int, relation: str, target: int) -> bool:
    rel = relation.strip().lower()
    if rel in ("less than", "<"):
        return value < target
    if rel in ("at least", ">="):
        return value >= target
    raise ValueError(f"unknown relation {relation!r}; IFEval uses 'less than' and 'at least'")


def words(text: str) -> list[str]:
    return re.findall(r"\w+(?:['’]\w+)*", text)


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if re.search(r"\w", s)]


def paragraphs(text: str, splitter: str = r"\s*\*\*\*\s*") -> list[str]:
    return [p for p in re.split(splitter, text.strip()) if p.strip()]


@check("keywords:existence")
def _existence(r: str, keywords: list[str]) -> bool:
    return all(re.search(re.escape(k), r, re.IGNORECASE) for k in keywords)


@check("keywords:frequency")
def _frequency(r: str, keyword: str, frequency: int, relation: str) -> bool:
    return _compare(len(re.findall(re.escape(keyword), r, re.IGNORECASE)), relation, frequency)


@check("keywords:forbidden_words")
def _forbidden(r: str, forbidden_words: list[str]) -> bool:
    return not any(re.search(rf"\b{re.escape(w)}\b", r, re.IGNORECASE) for w in forbidden_words)


@check("keywords:letter_frequency")
def _letters(r: str, letter: str, let_frequency: int, let_relation: str) -> bool:
    return _compare(r.lower().count(letter.lower()), let_relation, let_frequency)


@check("length_constraints:number_words")
def _n_words(r: str, num_words: int, relation: str) -> bool:
    return _compare(len(words(r)), relation, num_words)


@check("length_constraints:number_sentences")
def _n_sentences(r: str, num_sentences: int, relation: str) -> bool:
    return _compare(len(sentences(r)), relation, num_sentences)


@check("length_constraints:number_paragraphs")
def _n_paragraphs(r: str, num_paragraphs: int) -> bool:
    return len(paragraphs(r)) == num_paragraphs


@check("length_constraints:nth_paragraph_first_word")
def _nth_first(r: str, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    paras = paragraphs(r, r"\n\s*\n")
    if len(paras) != num_paragraphs or not 1 <= nth_paragraph <= len(paras):
        return False
    first = words(paras[nth_paragraph - 1])
    return bool(first) and first[0].lower() == first_word.lower()


@check("detectable_content:number_placeholders")
def _placeholders(r: str, num_placeholders: int) -> bool:
    return len(re.findall(r"\[[^\[\]]+\]", r)) >= num_placeholders


@check("detectable_content:postscript")
def _postscript(r: str, postscript_marker: str) -> bool:
    return re.search(rf"^\s*{re.escape(postscript_marker)}", r, re.MULTILINE | re.IGNORECASE) is not None


@check("detectable_format:number_bullet_lists")
def _bullets(r: str, num_bullets: int) -> bool:
    return len(re.findall(r"^\s*[*-]\s", r, re.MULTILINE)) == num_bullets


@check("detectable_format:constrained_response")
def _constrained(r: str) -> bool:
    options = ("My answer is yes.", "My answer is no.", "My answer is maybe.")
    return any(o in r.strip() for o in options)


@check("detectable_format:number_highlighted_sections")
def _highlights(r: str, num_highlights: int) -> bool:
    marks = re.findall(r"\*[^\n*]+\*", r) + re.findall(r"\*\*[^\n*]+\*\*", r)
    return sum(1 for m in marks if m.strip("*").strip()) >= num_highlights


@check("detectable_format:multiple_sections")
def _sections(r: str, section_spliter: str, num_sections: int) -> bool:
    parts = re.split(rf"\s?{re.escape(section_spliter)}\s?\d+\s?", r)
    return len(parts) - 1 >= num_sections


@check("detectable_format:json_format")
def _json(r: str) -> bool:
    body = re.sub(r"^```(?:json)?\s*|\s*```$", "", r.strip(), flags=re.IGNORECASE)
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


@check("detectable_format:title")
def _title(r: str) -> bool:
    return any(t.strip() for t in re.findall(r"<<([^\n]+?)>>", r))


@check("combination:two_responses")
def _two(r: str) -> bool:
    parts = [p.strip() for p in r.split("******")]
    return len(parts) == 2 and all(parts) and parts[0] != parts[1]


@check("combination:repeat_prompt")
def _repeat(r: str, prompt_to_repeat: str) -> bool:
    return r.strip().lower().startswith(prompt_to_repeat.strip().lower())


@check("startend:end_checker")
def _end(r: str, end_phrase: str) -> bool:
    return r.strip().lower().endswith(end_phrase.strip().lower())


@check("startend:quotation")
def _quoted(r: str) -> bool:
    s = r.strip()
    return len(s) > 1 and s[0] == s[-1] == '"'


@check("change_case:capital_word_frequency")
def _capitals(r: str, capital_frequency: int, capital_relation: str) -> bool:
    return _compare(sum(1 for w in words(r) if w.isupper()), capital_relation, capital_frequency)


@check("change_case:english_capital")
def _all_caps(r: str) -> bool:
    return r == r.upper() and any(c.isalpha() for c in r)


@check("change_case:english_lowercase")
def _all_lower(r: str) -> bool:
    return r == r.lower() and any(c.isalpha() for c in r)


@check("punctuation:no_comma")
def _no_comma(r: str) -> bool:
    return "," not in r and "，" not in r


def constraints_of(record: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """[(instruction id, arguments)] from `instruction_id_list` + `kwargs`, or from `constraints`."""
    if record.get("constraints") is not None:
        items = record["constraints"]
        items = json.loads(items) if isinstance(items, str) else items
        return [(str(c["id"]), {k: v for k, v in c.items() if k != "id"}) for c in items]
    ids = record.get("instruction_id_list") or []
    kwargs = record.get("kwargs") or [{} for _ in ids]
    if len(kwargs) != len(ids):
        raise ValueError(f"{len(ids)} instruction ids but {len(kwargs)} kwargs entries")
    return [(str(i), {k: v for k, v in (kw or {}).items() if v is not None}) for i, kw in zip(ids, kwargs)]


def check_all(response: str, constraints: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, bool, str | None]]:
    """(id, satisfied, problem) per constraint; unknown ids and bad arguments count as unsatisfied."""
    out = []
    for cid, args in constraints:
        fn = _CHECKS.get(cid)
        if fn is None:
            out.append((cid, False, f"unsupported constraint {cid}"))
            continue
        try:
            out.append((cid, bool(fn(response, **args)), None))
        except (TypeError, ValueError) as e:
            out.append((cid, False, f"bad arguments for {cid}: {e}"[:160]))
    return out


def ifeval_verifier(answer_text: str, reference: str | None, record: dict[str, Any]) -> Verdict:
    """Mean satisfaction over the record's constraints (strict)."""
    try:
        constraints = constraints_of(record)
    except (ValueError, KeyError, TypeError) as e:
        return Verdict(0.0, None, f"bad constraints: {e}"[:160])
    if not constraints:
        return Verdict(0.0, None, "no constraints")
    results = check_all(answer_text, constraints)
    problem = next((p for _, _, p in results if p), None)
    failed = [cid for cid, ok, _ in results if not ok]
    return Verdict(sum(ok for _, ok, _ in results) / len(results), ",".join(failed) or None, problem)


register_verifier("instruction_following", ifeval_verifier)
