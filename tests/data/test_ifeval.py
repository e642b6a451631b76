"""IFEval-style constraint checks: each kind on a satisfying and a violating response, and scoring."""

import pytest

from lt_jax.data import ifeval
from lt_jax.data.verify import get_verifier

CASES = [
    ("keywords:existence", {"keywords": ["river", "Stone"]}, "A stone by the river.", "A stone by the lake."),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "at least"}, "cat and Cat", "one cat"),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "less than"}, "one cat", "cat cat"),
    ("keywords:forbidden_words", {"forbidden_words": ["bad"]}, "a badge is fine", "this is bad"),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 3, "let_relation": "at least"}, "zzZ", "zz"),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"}, "two words", "one two three four five"),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "at least"}, "Hi. Bye!", "Only one."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "one\n***\ntwo", "one\n\ntwo"),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
     "First.\n\nThen, more.", "First.\n\nAfter that."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name] at [address]", "Dear [name]"),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Body.\nP.S. see you", "Body. PS see you"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a\n* b", "* a\n* b\n* c"),
    ("detectable_format:constrained_response", {}, "My answer is yes.", "Yes."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and *two*", "*one* only"),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\na\nSection 2\nb", "Section 1\na"),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', "{a: 1}"),
    ("detectable_format:title", {}, "<<Poem of Joy>>\ntext", "Poem of Joy\ntext"),
    ("combination:two_responses", {}, "A\n******\nB", "A\n******\nA"),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "say hi. Hi!", "Hi!"),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Done. Any other questions?", "Done."),
    ("startend:quotation", {}, '"quoted"', "not quoted"),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "less than"}, "ONE cap", "TWO CAPS"),
    ("change_case:english_capital", {}, "ALL CAPS HERE", "Not all caps"),
    ("change_case:english_lowercase", {}, "all lower here", "Not lower"),
    ("punctuation:no_comma", {}, "no commas here", "a, b"),
]


@pytest.mark.parametrize("cid, kwargs, good, bad", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_each_constraint_kind(cid, kwargs, good, bad):
    assert ifeval.check_all(good, [(cid, kwargs)]) == [(cid, True, None)]
    assert ifeval.check_all(bad, [(cid, kwargs)]) == [(cid, False, None)]


def test_score_is_mean_and_gaps_are_noted():
    verifier = get_verifier("instruction_following")
    rec = {"instruction_id_list": ["punctuation:no_comma", "keywords:existence", "change_case:english_lowercase"],
           "kwargs": [{}, {"keywords": ["tea"], "unused": None}, {}]}
    assert verifier("i like tea", None, rec).score == 1.0
    v = verifier("I like tea, really", None, rec)
    assert v.score == pytest.approx(1 / 3) and v.extracted == "punctuation:no_comma,change_case:english_lowercase"
    gap = verifier("x", None, {"constraints": [{"id": "language:response_language", "language": "fr"},
                                               {"id": "punctuation:no_comma"}]})
    assert gap.score == 0.5 and gap.note == "unsupported constraint language:response_language"
    bad = verifier("x", None, {"constraints": [{"id": "keywords:frequency", "keyword": "x", "frequency": 1, "relation": "about"}]})
    assert bad.score == 0.0 and bad.note.startswith("bad arguments")
    assert verifier("x", None, {}).note == "no constraints"
    assert verifier("x", None, {"instruction_id_list": ["a", "b"], "kwargs": [{}]}).note.startswith("bad constraints")
