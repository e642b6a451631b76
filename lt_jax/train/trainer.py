"""`lt-jax train`: supervised fine-tuning on packed rows, resumable, on one or many hosts.

The story of a run (`train`):
  1. Build the mesh and open the data: the loader packs the tokenized shards into global batches
     of `train.global_batch` rows of `data.seq_len` tokens; the run length is `train.steps`, or
     `train.epochs` passes over the packed rows.
  2. Resolve the model config (the YAML's `model` section, over the imported checkpoint's config
     when `train.init_from` is set) and the optimizer (AdamW + schedule over the run length).
  3. Resume from the latest complete checkpoint in the output folder if there is one (parameters,
     optimizer, step, RNG and the loader's cursor); otherwise load `train.init_from` or initialise
     from scratch, straight into the mesh's shardings.
  4. Loop: next batch -> jitted step -> metrics every `logging.every` steps (loss, grad norm, lr,
     tokens/s, MFU, step time, data wait, ETA), eval loss every `train.eval_every` steps, an async
     checkpoint every `checkpoint.every` steps and at the end.
  5. Preemption: SIGTERM (one process), or JAX's preemption sync point (several processes, where
     every host agrees on the step), makes the run save a checkpoint, wait for it, and exit with
     status PREEMPTED_EXIT_CODE (42), so a launcher can tell "preempted, restart me" from success (0)
     and failure (1). Restarting the same command resumes.

Only process 0 prints and writes metrics; every process takes part in checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import signal
import time
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from lt_jax import storage
from lt_jax.config import to_dict
from lt_jax.train.config import RunConfig, load_run_config
from lt_jax.train.hooks import Hook, HookFn

if TYPE_CHECKING:  # the heavy modules load in `setup`, so `lt-jax --help` stays free of jax
    import jax
    from flax import nnx

    from lt_jax.data.loader import Loader
    from lt_jax.model.config import ModelConfig
    from lt_jax.train.checkpoint import TrainCheckpointer
    from lt_jax.train.metrics import MetricsWriter
    from lt_jax.train.step import TrainState

PREEMPTED_EXIT_CODE = 42

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
    """What the loop works with; built by `setup`."""

    cfg: RunConfig
    mesh: "jax.sharding.Mesh"
    model_config: "ModelConfig"
    graphdef: "nnx.GraphDef"
    state: "TrainState"
    loader: "Loader"
    eval_loader: Optional["Loader"]
    train_step: Callable[["TrainState", dict], tuple["TrainState", dict]]  # (state, batch) -> (state, metrics)
    eval_step: Callable[[dict, dict], dict]  # (params, batch) -> {"nll_sum", "loss_tokens"}
    checkpointer: "TrainCheckpointer"
    writer: "MetricsWriter"
    total_steps: int
    start_step: int
    hooks: list[Hook] = dataclasses.field(default_factory=list)  # added with add_hook, run after the built-in ones

    def add_hook(self, fn: HookFn, every: int = 1, name: Optional[str] = None, **when) -> Hook:
        """Runs `fn(run, step)` after every `every`-th step (`at_start`/`at_end`/`paused` as in Hook)."""
        hook = Hook(name or getattr(fn, "__name__", "hook"), fn, every, **when)
        self.hooks.append(hook)
        return hook


# ---------------------------------------------------------------------------------------------
# Setup


def total_steps(cfg: RunConfig, loader) -> int:
    if cfg.train.steps is not None:
        return cfg.train.steps
    return sum(loader.batches_in_epoch(e) for e in range(cfg.train.epochs))


def _check_vocab(source, model_config, path: str) -> None:
    vocab = (source.manifest.get("tokenizer") or {}).get("vocab_size")
    if vocab is not None and vocab > model_config.vocab_size:
        raise ValueError(
            f"{path}: its tokenizer has {vocab} tokens but model.vocab_size is {model_config.vocab_size}; "
            "token ids past the embedding would be silently clipped"
        )


def _check_batch(cfg: RunConfig, mesh, batch_sharding) -> None:
    from lt_jax.model import sharding as shd

    axes = batch_sharding.spec[0] or ()
    shards = shd.axes_size(mesh, axes)
    micro = cfg.train.global_batch // cfg.train.grad_accum
    if micro % shards:
        raise ValueError(
            f"train.global_batch / train.grad_accum = {micro} rows per micro-batch cannot be split over the "
            f"{shards} batch shards of mesh {dict(mesh.shape)} ({axes}); make it a multiple of {shards}"
        )


def resolve_model_config(cfg: RunConfig, resume_dir: Optional[str], resume_step: Optional[int]):
    """The ModelConfig of this run: from the resumed checkpoint, the init checkpoint, or the YAML."""
    from lt_jax.train import checkpoint as ckpt

    if resume_step is not None:
        return cfg.model_config(ckpt.load_model_config(resume_dir, resume_step), source=resume_dir)
    if cfg.train.init_from:
        return cfg.model_config(ckpt.load_model_config(cfg.train.init_from), source=cfg.train.init_from)
    return cfg.model_config()


def initial_params(cfg: RunConfig, model_config, mesh):
    """(graphdef, params) for a fresh run: `train.init_from`'s weights or a random init."""
    from lt_jax.model import transformer as tfm
    from lt_jax.train import checkpoint as ckpt
    from lt_jax.train import step as st

    if cfg.train.init_from:
        runtime = {k: getattr(model_config, k) for k in ("param_dtype", "compute_dtype", "remat", "attention", "max_segments")}
        model = ckpt.load_model_checkpoint(cfg.train.init_from, mesh=mesh, **runtime)
    else:
        model = tfm.init_model(model_config, mesh, seed=cfg.train.seed)
    return st.split_model(model)


def setup(cfg: RunConfig, printer=print, accept_config_changes: bool = False) -> Run:
    import jax

    from lt_jax.data import loader as loader_lib
    from lt_jax.data.source import TokenizedSource
    from lt_jax.model import sharding as shd
    from lt_jax.model import transformer as tfm
    from lt_jax.train import checkpoint as ckpt
    from lt_jax.train import distributed, metrics, optim
    from lt_jax.train import step as st

    mesh = shd.make_mesh(cfg.mesh)
    batch_sharding = loader_lib.batch_sharding(mesh)
    _check_batch(cfg, mesh, batch_sharding)
    source = TokenizedSource(cfg.data.train)
    checkpointer = ckpt.TrainCheckpointer(
        cfg.checkpoint_dir, keep=cfg.checkpoint.keep, keep_every=cfg.checkpoint.keep_every,
        async_save=cfg.checkpoint.async_save,
    )
    resume = checkpointer.latest_step()
    if resume is not None:  # before any restore: a refused change costs nothing
        from lt_jax.train.resume_check import check_resume

        stored = checkpointer.run_config(resume).get("run", {})
        for line in check_resume(stored, cfg, accept=accept_config_changes, where=f"{cfg.checkpoint_dir} step {resume}"):
            printer(f"resuming with a changed config: {line}", flush=True)
    model_config = resolve_model_config(cfg, cfg.checkpoint_dir, resume)
    # Rows never hold more segments than the attention was built for (cuDNN's packed layout).
    max_segments = model_config.max_segments
    loader = loader_lib.Loader(
        source, loader_lib.LoaderOptions.from_data_config(cfg.data, cfg.train.global_batch, max_segments=max_segments),
        batch_sharding,
    )
    eval_loader = None
    if cfg.data.eval:
        eval_opts = loader_lib.LoaderOptions.from_data_config(
            cfg.data, cfg.train.global_batch, epochs=1, drop_remainder=False, max_segments=max_segments
        )
        eval_loader = loader_lib.Loader(
            TokenizedSource(cfg.data.eval), dataclasses.replace(eval_opts, shuffle=False), batch_sharding
        )
    steps = total_steps(cfg, loader)
    _check_vocab(source, model_config, cfg.data.train)
    optimizer, schedule = optim.make_optimizer(cfg.optim, steps)
    graphdef, abstract_params = st.split_model(tfm.abstract_model(model_config, mesh))
    shardings = st.state_shardings(abstract_params, optimizer, mesh)
    with jax.set_mesh(mesh):
        if resume is not None:
            state, loader_state, _ = checkpointer.restore(resume, st.abstract_state(abstract_params, optimizer, shardings))
            loader.set_state(loader_state)
        else:
            graphdef, params = initial_params(cfg, model_config, mesh)
            state = st.init_state(params, optimizer, shardings, cfg.train.seed)
    options = st.StepOptions(cfg.train.grad_accum, cfg.train.z_loss, cfg.train.lm_head_chunk)
    start = int(jax.device_get(state.step))
    writer = metrics.MetricsWriter(
        cfg.train.output_dir, start_step=start, jsonl=cfg.logging.jsonl, tensorboard=cfg.logging.tensorboard,
        active=distributed.is_primary(), printer=printer, sinks=_extra_sinks(cfg, model_config),
    )
    return Run(
        cfg=cfg, mesh=mesh, model_config=model_config, graphdef=graphdef, state=state, loader=loader,
        eval_loader=eval_loader,
        train_step=st.jit_train_step(graphdef, optimizer, schedule, options, shardings, batch_sharding),
        eval_step=st.jit_eval_step(graphdef, options, shardings.params, batch_sharding),
        checkpointer=checkpointer, writer=writer, total_steps=steps, start_step=start,
    )


def _extra_sinks(cfg: RunConfig, model_config) -> list:
    """Metric sinks beside the console, JSONL and TensorBoard: W&B when `logging.wandb` (process 0)."""
    from lt_jax.train import distributed

    if not (cfg.logging.wandb and distributed.is_primary()):
        return []
    from lt_jax.train.wandb_logger import WandbLogger

    lg = cfg.logging
    return [WandbLogger(cfg.train.output_dir, project=lg.wandb_project, name=lg.wandb_name, entity=lg.wandb_entity,
                        config={**to_dict(cfg), "model": to_dict(model_config)})]


# ---------------------------------------------------------------------------------------------
# The loop


class Preemption:
    """SIGTERM -> a flag (one process); JAX's preemption sync point (several processes)."""

    def __init__(self):
        import jax

        self.multi = jax.process_count() > 1
        self.flag = False
        self._old = None
        if not self.multi:  # with jax.distributed, JAX's own notifier owns SIGTERM
            self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.flag = True

    def reached(self, step: int) -> bool:
        if self.multi:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.flag

    def close(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def save(run: Run) -> None:
    run.checkpointer.save(
        run.state, model_config=run.model_config, loader_state=run.loader.get_state(),
        run_config={"run": to_dict(run.cfg), "model": to_dict(run.model_config), "total_steps": run.total_steps},
    )
    run.writer.flush()


def evaluate(run: Run) -> dict[str, float]:
    """Mean NLL per target token over the eval set (or its first `data.eval_batches` batches)."""
    import jax

    run.eval_loader.set_state({**run.eval_loader.get_state(), "epoch": 0, "batch": 0})
    nll, count = 0.0, 0.0
    for i, batch in enumerate(run.eval_loader):
        if run.cfg.data.eval_batches is not None and i >= run.cfg.data.eval_batches:
            break
        out = jax.device_get(run.eval_step(run.state.params, batch))
        nll, count = nll + float(out["nll_sum"]), count + float(out["loss_tokens"])
    return {"eval_loss": nll / max(count, 1.0), "eval_tokens": count}


class Meter:
    """Turns per-step device metrics into per-step records and interval throughput."""

    def __init__(self, run: Run):
        import jax

        from lt_jax.train import metrics

        self.run, self.pending, self.written = run, [], []  # written: records of this interval already on disk
        self.devices = jax.device_count()
        self.peak = metrics.peak_flops_per_device(jax.devices()[0].device_kind, run.cfg.logging.peak_flops_per_device)
        self.restart_clock()

    def restart_clock(self) -> None:
        self.t0, self.data_wait, self.excluded = time.perf_counter(), 0.0, 0.0

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (eval, the blocking part of a checkpoint save) is not step time."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - t

    def _fields(self, r: dict) -> dict[str, float]:
        out = {k: float(r[k]) for k in ("loss", "grad_norm", "lr", "loss_tokens", "tokens")}
        z = self.run.cfg.train.z_loss
        if z > 0:  # the term added to the loss; at weight 0 there is none to report
            out["z_loss"] = z * float(r["z_loss"])
        from lt_jax.train.metrics import moe_fields

        out.update(moe_fields(r))
        return out

    def record(self, extra: dict[str, dict] | None = None) -> None:
        """Writes every waiting step's record now (before a checkpoint commits, so a kill loses none)."""
        import jax

        if not self.pending:
            return
        fetched = jax.device_get([m for _, m in self.pending])
        for (s, _), r in zip(self.pending, fetched):
            self.run.writer.write(s, {**self._fields(r), **(extra or {}).get(s, {})})
            self.written.append(r)
        self.pending = []

    def first_step(self, step: int) -> None:
        """Step 1 of this process compiles: its time is logged as compile time, outside the throughput."""
        import jax

        jax.block_until_ready(self.pending[-1][1])
        seconds = time.perf_counter() - self.t0
        self.record({step: {"compile_time_s": seconds}})
        self.run.writer.text(f"step {step}: compiled and ran in {seconds:.1f}s (not counted in tokens/s)")
        self.written = []
        self.restart_clock()

    def log(self, step: int) -> None:
        """The metrics hook: compile time after this process's first step, else the interval's records."""
        if step == self.run.start_step + 1:  # compile time would distort the first interval
            self.first_step(step)
        else:
            self.flush(step)

    def flush(self, step: int) -> None:
        import jax

        from lt_jax.train import metrics

        fetched = jax.device_get([m for _, m in self.pending])
        records = self.written + list(fetched)
        elapsed = max(time.perf_counter() - self.t0 - self.excluded, 1e-9)
        n = len(records)
        tokens = sum(float(r["tokens"]) for r in records)
        flops = sum(metrics.step_flops(self.run.model_config, float(r["tokens"]), float(r["attention_pairs"])) for r in records)
        speed = {
            "tokens_per_s": tokens / elapsed, "tokens_per_s_per_device": tokens / elapsed / self.devices,
            "step_time_s": elapsed / n, "data_wait_s": self.data_wait / n,
            "mfu": (flops / elapsed / (self.devices * self.peak)) if self.peak else None,
            "eta_s": (self.run.total_steps - step) * elapsed / n,
            **metrics.device_memory(jax.local_devices()),
        }
        for (s, _), r in zip(self.pending, fetched):
            self.run.writer.write(s, {**self._fields(r), **(speed if s == step else {})})
        mean = {k: sum(float(r[k]) for r in records) / n for k in ("loss", "grad_norm")}
        line = metrics.console_line(step, self.run.total_steps, {**mean, "lr": float(records[-1]["lr"]), **speed})
        self.run.writer.text(line)
        self.pending, self.written = [], []
        self.restart_clock()


def loop(run: Run, preemption: "Preemption") -> int:
    """Trains from `run.start_step` to `run.total_steps`; returns the process exit status."""
    import jax

    step = run.start_step
    meter = Meter(run)
    if preemption.reached(step):  # signalled during setup: nothing new to save
        return PREEMPTED_EXIT_CODE
    hooks = default_hooks(run, meter, preemption)
    with jax.set_mesh(run.mesh):
        while step < run.total_steps:
            t = time.perf_counter()
            batch = next(run.loader)
            meter.data_wait += time.perf_counter() - t
            run.state, m = run.train_step(run.state, batch)
            step += 1
            meter.pending.append((step, m))
            for hook in hooks:
                if not hook.due(step, run.start_step, run.total_steps):
                    continue
                with meter.paused() if hook.paused else contextlib.nullcontext():
                    status = hook.fn(run, step)
                if status is not None:
                    return status
    run.checkpointer.wait()
    return 0


def default_hooks(run: Run, meter: "Meter", preemption: "Preemption") -> list[Hook]:
    """The loop's periodic work, in order: metrics, eval, checkpoint, `run.hooks`, preemption, final eval.

    The checkpoint hook writes every waiting step's record first, so a kill after a checkpoint
    commits loses no record it covers. Preemption comes after the user's hooks; the final eval
    (when the cadence did not just run one) after it, so a preempted last step exits at once.
    """
    cfg = run.cfg
    hooks = [Hook("metrics", lambda r, s: meter.log(s), every=cfg.logging.every, at_start=True, at_end=True,
                  paused=False)]
    evals = run.eval_loader is not None
    if evals and cfg.train.eval_every:
        hooks.append(Hook("eval", log_eval, every=cfg.train.eval_every))
    hooks.append(Hook("checkpoint", lambda r, s: checkpoint(r, meter), every=cfg.checkpoint.every, at_end=True))
    hooks += run.hooks
    hooks.append(Hook("preemption", lambda r, s: stop_for_preemption(r, meter, s) if preemption.reached(s) else None,
                      paused=False))
    if evals:
        just_ran = lambda s: cfg.train.eval_every and s % cfg.train.eval_every == 0  # noqa: E731
        hooks.append(Hook("final eval", lambda r, s: None if just_ran(s) else log_eval(r, s), every=0, at_end=True))
    return hooks


def checkpoint(run: Run, meter: "Meter") -> None:
    """Every waiting step's record on disk, then an async save (`save` is looked up at call time)."""
    meter.record()
    save(run)


def stop_for_preemption(run: Run, meter: Meter, step: int) -> int:
    """Saves `step` (unless just saved), waits for the commit, and returns PREEMPTED_EXIT_CODE."""
    if meter.pending:
        meter.flush(step)
    if step % run.cfg.checkpoint.every and step != run.total_steps:
        meter.record()
        save(run)
    run.checkpointer.wait()
    run.writer.text(f"preempted: saved step {step} to {run.cfg.checkpoint_dir}; exit {PREEMPTED_EXIT_CODE}")
    return PREEMPTED_EXIT_CODE


def log_eval(run: Run, step: int) -> None:
    result = evaluate(run)
    line = f"step {step}: eval loss {result['eval_loss']:.4f} over {int(result['eval_tokens'])} tokens"
    run.writer.write(step, result, kind="eval", console=line)


def describe(run: Run) -> None:
    """The run's plan, printed once by process 0."""
    import jax

    cfg, mc = run.cfg, run.model_config
    stats = run.loader.stats(run.loader.epoch)
    w = run.writer.text
    w(f"mesh {dict(run.mesh.shape)} over {jax.device_count()} devices ({jax.process_count()} processes, "
      f"{jax.devices()[0].device_kind})")
    w(f"model {mc.family}: {mc.num_params() / 1e6:.2f}M parameters, {mc.num_layers} layers, hidden {mc.hidden_size}, "
      f"vocab {mc.vocab_size}, params {mc.param_dtype}, compute {mc.compute_dtype}, remat {mc.remat}")
    w(f"data {cfg.data.train}: {stats['examples']} examples -> {stats['rows']} rows of {cfg.data.seq_len} "
      f"(fill {stats['fill']:.3f}); dropped {stats['dropped_overlength']} over-length, truncated {stats['truncated']}, "
      f"skipped {stats['skipped_empty']} empty, {stats['rows_past_last_batch']} rows past the last full batch")
    w(f"batch {cfg.train.global_batch} rows x {cfg.data.seq_len} tokens in {cfg.train.grad_accum} micro-batch(es); "
      f"{stats['batches']} steps per epoch; {run.total_steps} steps")
    if run.start_step:
        w(f"resumed from step {run.start_step} in {cfg.checkpoint_dir}")
    else:
        w(f"started from {cfg.train.init_from or 'random init (seed %d)' % cfg.train.seed}")
    if jax.process_index() == 0:
        import yaml

        text = yaml.safe_dump({**to_dict(cfg), "model": to_dict(mc)}, sort_keys=False)
        storage.write_text(storage.join(cfg.train.output_dir, "config.yaml"), text)
        # Each start and resume keeps its own copy, so a run's config history is never overwritten.
        storage.write_text(storage.join(cfg.train.output_dir, "config_history", f"step-{run.start_step:08d}.yaml"), text)


def train(cfg: RunConfig, printer=print, accept_config_changes: bool = False, hooks: Sequence[Hook] = ()) -> int:
    """Runs (or resumes) the training described by `cfg`; returns the exit status (0 or 42).

    Resuming with a config that differs from the checkpoint's is refused (lt_jax.train.resume_check)
    unless `accept_config_changes`. `hooks` run after the built-in ones (see lt_jax.train.hooks)."""
    preemption = Preemption()  # before setup: restoring and compiling can take minutes on a pod
    try:
        run = setup(cfg, printer, accept_config_changes)
    except BaseException:
        preemption.close()
        raise
    run.hooks.extend(hooks)
    try:
        describe(run)
        return loop(run, preemption)
    finally:
        # The SIGTERM handler stays until the end: a signal during teardown, after the last save, must
        # not kill a run that has finished (the flag it sets is no longer read).
        try:
            run.loader.close()
            if run.eval_loader is not None:
                run.eval_loader.close()
            run.checkpointer.close()
            run.writer.close()
        finally:
            preemption.close()


# ---------------------------------------------------------------------------------------------
# CLI: lt-jax train --config run.yaml [a.b=value ...]


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--config", required=True, help="run YAML (see configs/); local or gs://")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 optim.lr=1e-5")
    parser.add_argument("--coordinator", default=None, help="multi-host: coordinator HOST:PORT (process 0's)")
    parser.add_argument("--num-processes", type=int, default=None, help="multi-host: number of processes")
    parser.add_argument("--process-id", type=int, default=None, help="multi-host: this process's index")
    parser.add_argument("--accept-config-changes", action="store_true",
                        help="resume even though the config differs from the checkpoint's (the changes are printed)")


def run(args: argparse.Namespace) -> int:
    from lt_jax.train import distributed

    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    _quiet_libraries()
    cfg = load_run_config(args.config, args.overrides)
    return train(cfg, accept_config_changes=getattr(args, "accept_config_changes", False))


def _quiet_libraries() -> None:
    import jax

    level = logging.INFO if jax.process_index() == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax", "grain", "etils", "fsspec", "gcsfs"):  # fsspec.caching: a line per read
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:
        pass


def main(argv=None) -> int:
    """`python -m lt_jax.train.trainer ...`: the same as `lt-jax train ...` (handy in launch scripts)."""
    parser = argparse.ArgumentParser(prog="lt_jax.train.trainer", description=__doc__.splitlines()[0])
    add_arguments(parser, "train")
    return run(parser.parse_args(argv))


__all__ = ["train", "setup", "loop", "evaluate", "Hook", "default_hooks", "PREEMPTED_EXIT_CODE", "add_arguments", "run"]


if __name__ == "__main__":
    raise SystemExit(main())
