"""Evaluation: benchmarks shipped with the package, a resumable harness, metrics, judge evals, reports.

    from lt_jax.eval import benchmarks, harness
    bench = benchmarks.load_benchmark("aime24")
    summary = harness.evaluate_benchmark(generator, bench, harness.EvalConfig(), "out/run/aime24")

`generator` is anything with `generate(prompts, n, params, seeds=None)` (see generators.py):
this project's sampler on a checkpoint, an OpenAI-compatible endpoint, or a stand-in in tests.
The command line is `lt-jax eval` (cli.py).
"""
