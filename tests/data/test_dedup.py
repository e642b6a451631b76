"""Normalisation, near-duplicate removal and decontamination against the shared eval sets."""

from __future__ import annotations

import json
import os

import pytest

from lt_jax import storage
from lt_jax.data import dedup, synthetic
from lt_jax.data.select import SelectConfig, select_file


@pytest.mark.parametrize(
    "a, b",
    [
        ("Find $\\frac{1}{2}+x$.", "find \\frac {1} {2} + x ."),
        ("Let $x^{2} = 4$.", "Let  x ^ {2}=4 ."),
        ("What is $18^6$?", "What is $18 ^ {6}$?"),  # braces around one exponent token group nothing
        ("$90^{\\circ}$", "$90^\\circ$"),
        ("\\left( \\dfrac{a}{b} \\right)", "(\\frac{a}{b})"),
        ("a\\,b\\quad c", "a b c"),
        ("ＡＢＣ", "abc"),  # NFKC folds full-width letters
    ],
)
def test_normalisation_equates_variants(a, b):
    assert dedup.exact_key(a) == dedup.exact_key(b)


def test_normalisation_keeps_real_differences():
    assert dedup.exact_key("Compute 4 + 1.") != dedup.exact_key("Compute 4 * 1.")
    assert dedup.tokens("Compute 4 * 1.") == ["compute", "4", "*", "1"]
    assert dedup.tokens("计算 x") == ["计", "算", "x"]


def test_strip_common_affixes():
    texts = ["Q: add 1 and 2.\nAnswer in a box.", "Q: sum 3 and 4.\nAnswer in a box.", "Q: add 1 and 2.\nAnswer in a box."]
    assert dedup.strip_common_affixes(texts) == ["add 1 and 2.", "sum 3 and 4.", "add 1 and 2."]
    assert dedup.strip_common_affixes(["only one text"]) == ["only one text"]


def test_near_duplicates():
    base = ("A bag contains 5 red marbles, 7 blue marbles and 9 green marbles. Three marbles are drawn at random without "
            "replacement. What is the probability that all three marbles have different colours, and how does this "
            "probability change when a fourth colour with 3 yellow marbles is added to the bag before drawing?")
    near = dedup.NearDuplicates(threshold=0.85)
    assert near.add("p0", base) is None
    assert near.add("p1", "Compute 4 + 1.") is None
    match = near.add("p2", base.replace("  ", " ") + " Give your answer as a common fraction.")
    assert match is not None and match[0] == "p0" and 0.85 <= match[1] < 1.0
    assert near.add("p3", base.replace("5 red", "6 red").replace("7 blue", "2 blue").replace("9 green", "4 green").replace("3 yellow", "8 yellow")) is None
    assert near.add("p4", "Compute 4 * 1.") is None


def _words_window(text: str, start: int, n: int) -> str:
    return " ".join(dedup.tokens(text)[start : start + n])


@pytest.fixture(scope="module")
def decontaminator(benchmark_specs):
    return dedup.Decontaminator([it for s in benchmark_specs for it in dedup.load_benchmark(s)])


def test_planted_copies_found_and_unrelated_problems_not_flagged(tmp_path, jl, benchmark_data_dir, benchmark_items, benchmark_specs):
    aime24, aime25, math500 = benchmark_items["aime24"], benchmark_items["aime25"], benchmark_items["math500"]
    frac_item = next(p for p, _ in math500 if "\\frac{" in p and "$" in p)
    long_item = max((p for p, _ in aime25), key=lambda p: len(dedup.tokens(p)))
    planted = {
        "exact": aime24[3][0],
        "whitespace": "  " + "\n\n".join(aime24[7][0].split(" ")).upper() + "  ",
        "latex": frac_item.replace("\\frac{", "\\dfrac {").replace("}{", "} {").replace("$", ""),
        "ngram13": "Here is a new question that reuses a passage: " + _words_window(long_item, 10, 13) + " zebra quokka?",
        "cn_math": benchmark_items["cn_math_2024"][2][0],
    }
    unrelated = [p["problem"] for p in synthetic.make_problems(synthetic.SyntheticConfig(num_problems=150, num_heldout=0))]
    unrelated += [
        "A frog jumps along the integers starting at 0; each jump is +1 or +2 with equal probability. Find the expected number of jumps to pass 10.",
        "Evaluate the sum of the reciprocals of the first twenty triangular numbers and express the result as a fraction.",
        "Let $f(x) = x^3 - 6x^2 + 11x - 6$. Find all real roots of $f$ and their sum.",
        "Here is a new question that reuses a passage: " + _words_window(long_item, 10, 12) + " zebra quokka?",  # only 12 tokens shared
    ]
    rows = []
    for i, text in enumerate(list(planted.values()) + unrelated):
        rows.append({"problem_id": f"t{i}", "sample_index": 0, "prompt": text, "response": "<think>t</think>\\boxed{1}",
                     "reasoning_content": None, "reference_answer": "1", "status": "ok", "verdict": True, "score": 1.0})
    src = jl.write(tmp_path / "graded.jsonl", rows)
    report = select_file(src, str(tmp_path / "sft.jsonl"), SelectConfig(decontam=tuple(benchmark_specs), dedup_near=False))
    hits = {h["problem_id"]: h for h in report["contamination"]["items"]}
    names = list(planted)
    assert sorted(hits) == sorted(f"t{i}" for i in range(len(planted)))
    assert hits["t0"]["benchmark"] == "aime24/test.jsonl" and hits["t0"]["kind"] == "exact"
    with open(os.path.join(benchmark_data_dir, "aime24/test.jsonl")) as f:
        assert hits["t0"]["item"] == str(json.loads(f.readlines()[3])["id"])
    assert hits["t1"]["kind"] == "exact" and hits["t2"]["kind"] == "exact" and hits["t2"]["benchmark"] == "math500/test.jsonl"
    assert hits["t3"]["kind"] == "ngram" and hits["t3"]["benchmark"] == "aime25/aime25.jsonl"
    assert hits["t3"]["ngram"] == _words_window(long_item, 10, 13)
    assert hits["t4"]["benchmark"] == "cn_math_2024/test.jsonl"
    assert report["dropped"] == {"contaminated": len(names)}
    assert report["records_out"] == len(unrelated)


BOILER = "That chance equals $\\frac{m}{n}$, where $m$ and $n$ are relatively prime positive integers. Find $m+n$."


def test_boilerplate_ngrams_do_not_flag(decontaminator, benchmark_specs):
    """The probe shares only boilerplate 13-grams with the eval sets: flagged with the filter off, not with it on."""
    assert decontaminator.boilerplate_ngrams > 0  # instructions shared by several AIME items
    probe = f"A jar holds 3 red and 4 blue pens and two are picked at once. The chance both are red is p. {BOILER}"
    assert decontaminator.check(probe) is None
    items = [it for s in benchmark_specs for it in dedup.load_benchmark(s)]
    unfiltered = dedup.Decontaminator(items, boilerplate_items=0).check(probe)
    assert unfiltered is not None and unfiltered.kind == "ngram" and "relatively prime" in unfiltered.ngram


def test_boilerplate_counts_distinct_texts_not_copies(tmp_path, jl):
    """The same benchmark as .jsonl, .json and .parquet is one text per item, so its n-grams still match."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"problem": "Twelve knights sit at a round table and each one lies or tells the truth about the "
                        "colour of the dragon guarding the northern tower of the castle."}]
    folder = tmp_path / "bench"
    folder.mkdir()
    jl.write(folder / "a.jsonl", rows)
    (folder / "a.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), str(folder / "a.parquet"))
    d = dedup.Decontaminator(dedup.load_benchmark(str(folder)))
    assert len(d.items) == 3 and d.boilerplate_ngrams == 0
    hit = d.check("Story time: twelve knights sit at a round table and each one lies or tells the truth about the colour of it.")
    assert hit is not None and hit.kind == "ngram"


def test_short_items_match_whole_inside_longer_text(decontaminator, benchmark_items):
    short = [p for p, _ in benchmark_items["math500"] if dedup.MIN_WHOLE_TOKENS <= len(dedup.tokens(p)) < 13]
    assert len(short) >= 30  # MATH-500 items with no 13-token window (35 by the count)
    for item in short:
        hit = decontaminator.check("Solve the following: " + item + " Show your work.")
        assert hit is not None and hit.kind in ("whole", "exact", "ngram"), item
    assert decontaminator.check("Solve the following: Compute 4 + 1 then add seven.") is None
    # Exponent braces are grouping only: "$18^6$" and "$18 ^ {6}$" are the same item.
    d = dedup.Decontaminator([dedup.BenchItem("b", "1", "What is the units digit of $18^6$?")])
    assert d.check("What is the units digit of $18 ^ {6}$ ?").kind == "exact"
    assert dedup.tokens("$x_{\\alpha} 9$") == dedup.tokens("$x_\\alpha 9$") == ["x", "alpha", "9"]  # folding joins no tokens


def test_decontam_folder_and_gcs(tmp_path, jl, gcs_bucket):
    bench = [{"question": "What is the smallest prime larger than one hundred and twenty three thousand?"}]
    storage_path = f"{gcs_bucket}/evals/mine/test.jsonl"
    storage.write_text(storage_path, json.dumps(bench[0]) + "\n")
    items = dedup.load_benchmark(f"{gcs_bucket}/evals")
    assert [(i.benchmark, i.item) for i in items] == [("mine/test.jsonl", "line 1")]
    d = dedup.Decontaminator(items)
    hit = d.check("WHAT is the smallest prime\n larger than one hundred and twenty three thousand ?")
    assert hit is not None and hit.kind == "exact"
    hit = d.check("Tell me: what is the smallest prime larger than one hundred and twenty three thousand, please")
    assert hit is not None and hit.kind == "ngram"
    with pytest.raises(ValueError, match="no text field"):
        jl.write(tmp_path / "b.jsonl", [{"foo": "bar"}])
        dedup.load_benchmark(str(tmp_path / "b.jsonl"))
