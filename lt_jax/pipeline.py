"""`lt-jax demo --config configs/tiny.yaml`: every stage of the recipe, end to end, on one machine.

The story of a run, each step the same `lt-jax` command a user would type (printed before it runs,
so any step can be repeated alone):

  1. synthetic  a long-thought task: problems with reference answers, and a held-out split
  2. serve      a rule-based teacher behind the OpenAI API, on loopback
  3. distill    n teacher samples per problem over HTTP -> responses.jsonl
  4. tokenizer  a small BPE fitted to the distilled text (a real run uses the model's own)
  5. grade      math-verify each response -> graded.jsonl + pass rate / CV per problem
  6. select     DeepDistill rules, dedup, decontamination against the held-out split -> sft.jsonl
  7. tokenize   chat template + assistant-only loss mask -> token shards
  8. train      the model from scratch on packed rows, with checkpoints
  9. eval       held-out accuracy of the untrained and the trained model, by level
 10. export-hf  a Hugging Face folder with the training chat template

With `demo.ablation=true`, step 8b also trains on every teacher response (no selection, same
number of steps) and step 9 evaluates it beside the others: the papers' claim that selection helps,
checked. The run ends with a table of the stages, a loss curve (loss.png) and held-out accuracy by
level (accuracy.png).

Each stage reads its own section of the YAML (`synthetic`, `distill`, `select`, `eval`, ...;
`lt-jax train` reads model/mesh/data/optim/train/checkpoint/logging); `demo` holds what only the
demo needs. A rerun resumes: every stage skips the work it already finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
import time
from typing import Any, Optional

import yaml
from absl import logging as absl_logging

from lt_jax import cli, demo_report, storage
from lt_jax import config as config_lib
from lt_jax.data import jsonl, tiny_tokenizer
from lt_jax.model.transformer import init_model
from lt_jax.train import checkpoint
from lt_jax.train.config import load_run_config


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """The demo's own settings; every other stage is configured by its own section."""

    workdir: str = "runs/tiny"
    tokenizer_vocab: int = 1024
    max_length: int = 512  # tokens per SFT example; longer ones are dropped and counted
    teacher_port: int = 0  # 0: any free loopback port
    ablation: bool = False  # also train on every teacher response (no selection) and compare


# `lt-jax select` overrides that switch selection off for the ablation: every graded response is
# kept (decontamination still runs, so the held-out split stays unseen).
UNFILTERED_SELECT = ("drop_unsolved=false", "cv_threshold=null", "max_per_problem=null")


# Top-level sections written to per-stage YAML files (`--config`) for the stage commands.
STAGE_SECTIONS = config_lib.STAGE_SECTIONS


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--config", default="configs/tiny.yaml", help="pipeline YAML (default configs/tiny.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for any section, e.g. train.steps=20")


def run(args: argparse.Namespace) -> int:
    data = config_lib.merge(config_lib.load_yaml(args.config), config_lib.parse_overrides(args.overrides))
    demo = config_lib.from_dict(DemoConfig, data.get("demo"), prefix="demo")
    _quiet_libraries()
    return Demo(demo, data).run()


def _quiet_libraries() -> None:
    """Orbax and absl log every checkpoint operation at INFO; the demo's story is the stage output."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    for name in ("absl", "orbax", "jax", "grain"):
        logging.getLogger(name).setLevel(logging.WARNING)


class Demo:
    """Runs the stages in order inside `workdir`, each through the `lt-jax` CLI."""

    def __init__(self, demo: DemoConfig, sections: dict[str, Any]):
        self.cfg, self.sections = demo, sections
        self.w = demo.workdir
        self.paths = {
            "synthetic": storage.join(self.w, "synthetic"),
            "responses": storage.join(self.w, "responses.jsonl"),
            "tokenizer": storage.join(self.w, "tokenizer"),
            "graded": storage.join(self.w, "graded.jsonl"),
            "sft": storage.join(self.w, "sft.jsonl"),
            "tokens": storage.join(self.w, "tokens", "train"),
            "sft_all": storage.join(self.w, "sft_unfiltered.jsonl"),
            "tokens_all": storage.join(self.w, "tokens", "unfiltered"),
            "train_all": storage.join(self.w, "train_unfiltered"),
            "init": storage.join(self.w, "init"),
            "train": storage.join(self.w, "train"),
            "eval": storage.join(self.w, "eval"),
            "hf": storage.join(self.w, "hf"),
        }
        self.configs = {name: self._write_section(name) for name in STAGE_SECTIONS}
        self.stages: list[demo_report.StageRecord] = []

    def run(self) -> int:
        start = time.time()
        p = self.paths
        heldout = storage.join(p["synthetic"], "heldout.jsonl")
        problems = storage.join(p["synthetic"], "problems.jsonl")
        self.step("1. synthetic problems", "synthetic", "--out", p["synthetic"], "--no-responses", *self.conf("synthetic"),
                  counts=(None, problems))
        with TeacherServer(self.configs["synthetic"], self.cfg.teacher_port) as url:
            self.step("2-3. distill from the teacher over HTTP", "distill", *self.conf("distill"),
                      "--input", problems, "--output", p["responses"],
                      "--base-url", url, "--model", TeacherServer.MODEL, "--api-key-env", "LT_JAX_DEMO_NO_KEY",
                      counts=(problems, p["responses"]))
        self.timed("4. tokenizer", self.fit_tokenizer)
        self.step("5. grade", "grade", "--in", p["responses"], "--out", p["graded"], "--no-progress", *self.conf("grade"),
                  counts=(p["responses"], p["graded"]))
        self.step("6. select", "select", "--in", p["graded"], "--out", p["sft"], "--decontam", heldout, *self.conf("select"),
                  counts=(p["graded"], p["sft"]))
        self.step("7. tokenize", "tokenize", "--in", p["sft"], "--tokenizer", p["tokenizer"], "--out", p["tokens"],
                  "--max-length", str(self.cfg.max_length), "--no-progress", counts=(p["sft"], p["tokens"]))
        train_yaml = self.write_train_config(p["tokens"], p["train"])
        self.timed("untrained model", lambda: self.save_untrained(train_yaml))
        self.step("8. train", "train", "--config", train_yaml, counts=(p["tokens"], None))
        runs = [("before", p["init"]), ("after", storage.join(p["train"], "checkpoints"))]
        if self.cfg.ablation:
            runs.append(("unfiltered", self.ablation(heldout)))
        checkpoints = [a for _, ckpt in runs for a in ("--checkpoint", ckpt)]
        names = [a for name, _ in runs for a in ("--name", name)]
        self.step("9. eval: held-out accuracy before and after SFT", "eval", *checkpoints, *names,
                  "--tokenizer", p["tokenizer"], "--benchmarks", f"heldout={heldout}", "--out", p["eval"],
                  "--no-progress", *self.conf("eval"), counts=(heldout, None))
        self.step("10. export to Hugging Face", "export-hf", "--checkpoint", runs[1][1], "--out", p["hf"],
                  "--tokenizer", p["tokenizer"])
        print(self.summary(time.time() - start))
        return 0

    def ablation(self, heldout: str) -> str:
        """The papers' claim, checked: the same training on every teacher response, unselected.

        Selection is switched off (no pass-rate or CV rule, no per-problem cap) but decontamination
        stays, and the run takes as many optimizer steps as the selected one, so both get the same
        compute. Returns the unfiltered run's checkpoint folder.
        """
        p = self.paths
        self.step("8b. ablation: select nothing (every teacher response)", "select", "--in", p["graded"],
                  "--out", p["sft_all"], "--decontam", heldout, *self.conf("select"), *UNFILTERED_SELECT,
                  counts=(p["graded"], p["sft_all"]))
        self.step("8b. ablation: tokenize", "tokenize", "--in", p["sft_all"], "--tokenizer", p["tokenizer"],
                  "--out", p["tokens_all"], "--max-length", str(self.cfg.max_length), "--no-progress",
                  counts=(p["sft_all"], p["tokens_all"]))
        steps = max((step for step, _ in demo_report.read_losses(self.metrics(p["train"]))["train"]), default=0)
        train_yaml = self.write_train_config(p["tokens_all"], p["train_all"], steps=steps or None)
        self.step("8b. ablation: train on the unfiltered responses", "train", "--config", train_yaml,
                  counts=(p["tokens_all"], None))
        return storage.join(p["train_all"], "checkpoints")

    # -- steps --------------------------------------------------------------------------------

    def step(self, title: str, command: str, *argv: str, counts: tuple = (None, None)) -> None:
        """Runs one `lt-jax` command in-process; a failing stage stops the demo with its status.

        `counts` = (input, output) paths whose records the closing table reports.
        """
        print(f"\n=== {title}\n$ lt-jax {command} {' '.join(argv)}", flush=True)
        started = time.time()
        status = cli.main([command, *argv])
        if status:
            raise SystemExit(f"demo: `lt-jax {command}` failed with exit status {status}")
        self.stages.append(demo_report.StageRecord(title, time.time() - started, *(_count(c) for c in counts)))

    def timed(self, title: str, fn) -> None:
        """Runs an in-process step (no CLI command) and records its time."""
        started = time.time()
        fn()
        self.stages.append(demo_report.StageRecord(title, time.time() - started))

    def conf(self, name: str) -> list[str]:
        return ["--config", self.configs[name]] if self.configs[name] else []

    def fit_tokenizer(self) -> None:
        """Step 4: a BPE over the distilled prompts and responses (skipped when already there)."""
        out = self.paths["tokenizer"]
        print(f"\n=== 4. tokenizer: byte-level BPE, {self.cfg.tokenizer_vocab} tokens, fitted to the distilled text -> {out}")
        if storage.exists(storage.join(out, "tokenizer.json")):
            print("already there; kept")
            return
        texts = []
        for _, rec in jsonl.read_jsonl(self.paths["responses"]):
            if rec.get("status") == "ok":
                texts += [rec.get("prompt") or "", rec.get("response") or "", rec.get("reasoning_content") or ""]
        if not texts:
            raise SystemExit(f"demo: no successful teacher responses in {self.paths['responses']}; see distill's summary")
        tiny_tokenizer.build_tokenizer(texts, out, vocab_size=self.cfg.tokenizer_vocab)

    def write_train_config(self, tokens: str, output_dir: str, steps: Optional[int] = None) -> str:
        """The training sections of the YAML, pointed at `tokens` and `output_dir` (and `steps` if set)."""
        run = {k: v for k, v in self.sections.items() if k not in config_lib.OTHER_STAGE_SECTIONS}
        train = {"output_dir": output_dir} | ({"steps": steps} if steps else {})
        run = config_lib.merge(run, {"data": {"train": tokens}, "train": train})
        name = os.path.basename(output_dir.rstrip("/"))
        path = storage.join(self.w, "configs", f"{name}.yaml")
        storage.write_text(path, yaml.safe_dump(run, sort_keys=False))
        return path

    def metrics(self, train_dir: str) -> str:
        return storage.join(train_dir, "metrics.jsonl")

    def save_untrained(self, train_yaml: str) -> None:
        """The model before SFT (the same init seed `train` starts from), for the 'before' eval."""
        if storage.exists(self.paths["init"]) and checkpoint.all_steps(self.paths["init"]):
            return
        cfg = load_run_config(train_yaml)
        model = init_model(cfg.model_config(), seed=cfg.train.seed)
        checkpoint.save_model_checkpoint(model, self.paths["init"], step=0)

    def _write_section(self, name: str) -> Optional[str]:
        if not self.sections.get(name):
            return None
        path = storage.join(self.w, "configs", f"{name}.yaml")
        storage.write_text(path, yaml.safe_dump(self.sections[name], sort_keys=False))
        return path

    # -- the closing summary ------------------------------------------------------------------

    def summary(self, seconds: float) -> str:
        """The closing lines: the stage table, losses, accuracy by level, and where the pictures are."""
        p = self.paths
        curves = {"selected": demo_report.read_losses(self.metrics(p["train"]))}
        if self.cfg.ablation:
            curves["unfiltered"] = demo_report.read_losses(self.metrics(p["train_all"]))
        acc = demo_report.accuracy_by_level(storage.join(p["eval"], "summary.json"))
        loss_png, acc_png = storage.join(self.w, "loss.png"), storage.join(self.w, "accuracy.png")
        storage.write_bytes(loss_png, demo_report.loss_curve_png(curves))
        if acc:
            storage.write_bytes(acc_png, demo_report.accuracy_png(acc))
        lines = [f"\n=== demo finished in {seconds / 60:.1f} min; everything is under {self.w}",
                 demo_report.stage_table(self.stages)]
        for run, losses in curves.items():
            if losses["train"]:
                (s0, l0), (s1, l1) = losses["train"][0], losses["train"][-1]
                lines.append(f"train loss ({run} data): {l0:.3f} at step {s0} -> {l1:.3f} at step {s1}")
        lines += demo_report.accuracy_lines(acc)
        lines += [f"pictures: {loss_png} (training loss)" + (f", {acc_png} (held-out accuracy by level)" if acc else ""),
                  f"eval report: {storage.join(p['eval'], 'results.md')}", f"Hugging Face folder: {p['hf']}"]
        return "\n".join(lines)


def _count(path: Optional[str]) -> Optional[int]:
    """Records in a stage's file: lines of a JSONL file, or a token folder's manifest count."""
    if path is None:
        return None
    manifest = storage.join(path, "manifest.json")
    if storage.exists(manifest):
        return int(json.loads(storage.read_text(manifest))["num_records"])
    if storage.exists(path) and not storage.isdir(path):
        return sum(1 for line in storage.read_text(path).splitlines() if line.strip())
    return None


class TeacherServer:
    """`lt-jax serve --teacher synthetic` as a child process on loopback; yields its /v1 URL."""

    MODEL = "synthetic-teacher"

    def __init__(self, synthetic_yaml: Optional[str], port: int):
        self.argv = [sys.executable, "-m", "lt_jax.cli", "serve", "--teacher", "synthetic", "--model-name", self.MODEL,
                     "--port", str(port)]
        if synthetic_yaml:
            self.argv += ["--synthetic-config", synthetic_yaml]
        self.proc: Optional[subprocess.Popen] = None

    def __enter__(self) -> str:
        print(f"\n=== 2. teacher\n$ {' '.join(self.argv[2:]).replace('lt_jax.cli', 'lt-jax')}", flush=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        deadline = time.time() + 120
        for line in self.proc.stdout:
            match = re.search(r"serving \S+ at (http://\S+)", line)
            if match:
                url = match.group(1).rstrip("/")
                print(line.rstrip(), flush=True)
                return url if url.endswith("/v1") else url + "/v1"
            if time.time() > deadline:
                break
        self.__exit__()
        raise SystemExit(f"demo: the teacher server did not start: {' '.join(self.argv)}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
