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
  9. eval       held-out accuracy of the untrained and the trained model
 10. export-hf  a Hugging Face folder with the training chat template

Each stage reads its own section of the YAML (`synthetic`, `distill`, `select`, `eval`, ...;
`lt-jax train` reads model/mesh/data/optim/train/checkpoint/logging); `demo` holds what only the
demo needs. A rerun resumes: every stage skips the work it already finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from typing import Any, Optional

import yaml

from lt_jax import config as config_lib
from lt_jax import storage


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """The demo's own settings; every other stage is configured by its own section."""

    workdir: str = "runs/tiny"
    tokenizer_vocab: int = 1024
    max_length: int = 512  # tokens per SFT example; longer ones are dropped and counted
    teacher_port: int = 0  # 0: any free loopback port


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
    import logging

    from absl import logging as absl_logging

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
            "init": storage.join(self.w, "init"),
            "train": storage.join(self.w, "train"),
            "eval": storage.join(self.w, "eval"),
            "hf": storage.join(self.w, "hf"),
        }
        self.configs = {name: self._write_section(name) for name in STAGE_SECTIONS}

    def run(self) -> int:
        start = time.time()
        p = self.paths
        heldout = storage.join(p["synthetic"], "heldout.jsonl")
        self.step("1. synthetic problems", "synthetic", "--out", p["synthetic"], "--no-responses", *self.conf("synthetic"))
        with TeacherServer(self.configs["synthetic"], self.cfg.teacher_port) as url:
            self.step("2-3. distill from the teacher over HTTP", "distill", *self.conf("distill"),
                      "--input", storage.join(p["synthetic"], "problems.jsonl"), "--output", p["responses"],
                      "--base-url", url, "--model", TeacherServer.MODEL, "--api-key-env", "LT_JAX_DEMO_NO_KEY")
        self.fit_tokenizer()
        self.step("5. grade", "grade", "--in", p["responses"], "--out", p["graded"], "--no-progress", *self.conf("grade"))
        self.step("6. select", "select", "--in", p["graded"], "--out", p["sft"], "--decontam", heldout, *self.conf("select"))
        self.step("7. tokenize", "tokenize", "--in", p["sft"], "--tokenizer", p["tokenizer"], "--out", p["tokens"],
                  "--max-length", str(self.cfg.max_length), "--no-progress")
        train_yaml = self.write_train_config()
        self.save_untrained(train_yaml)
        self.step("8. train", "train", "--config", train_yaml)
        ckpt = storage.join(p["train"], "checkpoints")
        self.step("9. eval: held-out accuracy before and after SFT", "eval", "--checkpoint", p["init"],
                  "--checkpoint", ckpt, "--name", "before", "--name", "after", "--tokenizer", p["tokenizer"],
                  "--benchmarks", f"heldout={heldout}", "--out", p["eval"], "--no-progress", *self.conf("eval"))
        self.step("10. export to Hugging Face", "export-hf", "--checkpoint", ckpt, "--out", p["hf"],
                  "--tokenizer", p["tokenizer"])
        print(self.summary(time.time() - start))
        return 0

    # -- steps --------------------------------------------------------------------------------

    def step(self, title: str, command: str, *argv: str) -> None:
        """Runs one `lt-jax` command in-process; a failing stage stops the demo with its status."""
        from lt_jax import cli

        print(f"\n=== {title}\n$ lt-jax {command} {' '.join(argv)}", flush=True)
        status = cli.main([command, *argv])
        if status:
            raise SystemExit(f"demo: `lt-jax {command}` failed with exit status {status}")

    def conf(self, name: str) -> list[str]:
        return ["--config", self.configs[name]] if self.configs[name] else []

    def fit_tokenizer(self) -> None:
        """Step 4: a BPE over the distilled prompts and responses (skipped when already there)."""
        from lt_jax.data import jsonl, tiny_tokenizer

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

    def write_train_config(self) -> str:
        """The training sections of the YAML, pointed at this run's shards and output folder."""
        from lt_jax.train.config import OTHER_STAGE_SECTIONS

        run = {k: v for k, v in self.sections.items() if k not in OTHER_STAGE_SECTIONS}
        run = config_lib.merge(run, {"data": {"train": self.paths["tokens"]}, "train": {"output_dir": self.paths["train"]}})
        path = storage.join(self.w, "configs", "train.yaml")
        storage.write_text(path, yaml.safe_dump(run, sort_keys=False))
        return path

    def save_untrained(self, train_yaml: str) -> None:
        """The model before SFT (the same init seed `train` starts from), for the 'before' eval."""
        from lt_jax.model.transformer import init_model
        from lt_jax.train import checkpoint
        from lt_jax.train.config import load_run_config

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
        losses = _losses(storage.join(self.paths["train"], "metrics.jsonl"))
        acc = _accuracy(storage.join(self.paths["eval"], "summary.json"))
        lines = [f"\n=== demo finished in {seconds / 60:.1f} min; everything is under {self.w}"]
        if losses:
            lines.append(f"train loss: {losses[0][1]:.3f} at step {losses[0][0]} -> {losses[-1][1]:.3f} at step {losses[-1][0]}")
        for name, value in acc.items():
            lines.append(f"held-out pass@1 {name}: {value:.1%}")
        lines.append(f"Hugging Face folder: {self.paths['hf']}")
        return "\n".join(lines)


def _losses(path: str) -> list[tuple[int, float]]:
    if not storage.exists(path):
        return []
    rows = [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]


def _accuracy(path: str) -> dict[str, float]:
    if not storage.exists(path):
        return {}
    runs = json.loads(storage.read_text(path)).get("runs", {})
    return {name: benches["heldout"]["pass@1"] for name, benches in runs.items() if "heldout" in benches}


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
