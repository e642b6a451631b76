"""Training metrics: FLOP accounting for MFU, and one writer for the console, JSONL and TensorBoard.

FLOPs counted per optimizer step (the "model FLOPs" of MFU: what the math needs, not what the
hardware runs; rematerialisation and padding are not counted):
  matmuls    6 * N_matmul * tokens, where N_matmul is every weight used in a matmul, including the
             LM head (also when tied to the embedding) and excluding the embedding lookup;
  attention  12 * L * Nq * D * pairs, where pairs = sum over packed segments of n(n+1)/2 (each
             query against the keys at or before it in its segment): 2 matmuls (QK^T, PV) of
             2 FLOPs per multiply-add, times 3 for forward + backward.
MFU = FLOPs / step time / (devices * peak FLOP/s per device). Peak numbers are dense bf16 from the
vendors' data sheets; a CPU has no entry, so MFU is reported there only if
`logging.peak_flops_per_device` is set.

Only process 0 writes. On a resumed run, JSONL lines and TensorBoard events past the resumed step
are discarded (the JSONL is rewritten; TensorBoard gets a purge_step), so every step appears once.
For gs:// output the files are written to a local staging folder and uploaded whole at every
`flush()` (GCS objects cannot be appended to).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from typing import Any, Optional, Sequence

import numpy as np

from lt_jax import storage
from lt_jax.model import families
from lt_jax.model.config import ModelConfig

# Dense bf16 peak FLOP/s per device, matched as substrings of jax's `device_kind` (first match wins).
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
)


def matmul_params(cfg: ModelConfig) -> int:
    """Weights used in matmuls per token (the LM head included, the embedding lookup not; of a
    mixture of experts, the experts a token is routed to)."""
    n = cfg.num_params(include_embeddings=False, active=True)
    return n + (cfg.vocab_size * cfg.hidden_size if cfg.tie_word_embeddings else 0)


def moe_fields(record: dict[str, Any]) -> dict[str, float]:
    """A MoE step's router metrics as scalars: moe_aux_loss (the load-balancing loss before its
    coefficient), moe_dropped (fraction of slots over capacity), moe_load_max (the busiest
    expert's share x E; 1.0 is perfect balance) and moe_load/<e> (each expert's share of slots)."""
    if "moe_expert_load" not in record:
        return {}
    load = np.asarray(record["moe_expert_load"], np.float64)
    out = {"moe_aux_loss": float(record["moe_aux_loss"]), "moe_dropped": float(record["moe_dropped"]),
           "moe_load_max": float(load.max() * load.size)}
    out.update({f"moe_load/{e}": float(x) for e, x in enumerate(load)})
    return out


def step_flops(cfg: ModelConfig, tokens: float, attention_pairs: float) -> float:
    """Model FLOPs of one training step (forward + backward) over `tokens` real tokens: the family
    spec's FLOPs per token (lt_jax.model.families) times the tokens."""
    if not tokens:
        return 0.0
    return families.get(cfg.family).flops_per_token(cfg, attention_pairs / tokens) * tokens


def peak_flops_per_device(device_kind: str, override: Optional[float] = None) -> Optional[float]:
    if override:
        return override
    for key, flops in PEAK_FLOPS:
        if key.lower() in device_kind.lower():
            return flops
    return None


def device_memory(devices) -> dict[str, float]:
    """{memory_in_use_gb, memory_peak_gb}: the most over `devices`, where the platform reports it (TPU,
    GPU); empty on CPU, whose devices report nothing."""
    stats = [d.memory_stats() for d in devices]
    stats = [s for s in stats if s and "bytes_in_use" in s]
    if not stats:
        return {}
    out = {"memory_in_use_gb": max(s["bytes_in_use"] for s in stats) / 2**30}
    peaks = [s["peak_bytes_in_use"] for s in stats if "peak_bytes_in_use" in s]
    if peaks:
        out["memory_peak_gb"] = max(peaks) / 2**30
    return out


def peak_memory_gib(device) -> Optional[float]:
    """The device allocator's peak bytes in use, in GiB (None where the backend keeps no stats, e.g. CPU)."""
    return device_memory([device]).get("memory_peak_gb")


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.1f}"


def console_line(step: int, total: int, m: dict[str, float]) -> str:
    """One human line per log interval."""
    parts = [f"step {step}/{total}", f"loss {m['loss']:.4f}"]
    if "eval_loss" in m:
        parts.append(f"eval {m['eval_loss']:.4f}")
    if "grad_norm" in m:
        parts += [f"gnorm {m['grad_norm']:.3f}", f"lr {m['lr']:.2e}"]
    if "tokens_per_s" in m:
        parts.append(f"{_si(m['tokens_per_s'])} tok/s ({_si(m['tokens_per_s_per_device'])}/dev)")
    if m.get("mfu") is not None:
        parts.append(f"MFU {100 * m['mfu']:.1f}%")
    if "step_time_s" in m:
        parts.append(f"step {m['step_time_s']:.3f}s (data {m['data_wait_s']:.3f}s)")
    if "eta_s" in m:
        parts.append(f"ETA {format_duration(m['eta_s'])}")
    if "memory_in_use_gb" in m:
        peak = f" (peak {m['memory_peak_gb']:.1f})" if "memory_peak_gb" in m else ""
        parts.append(f"mem {m['memory_in_use_gb']:.1f}{peak} GiB")
    return " | ".join(parts)


class MetricsWriter:
    """Console + metrics.jsonl + TensorBoard under `output_dir`, plus any `sinks` (objects with
    `log(step, kind, metrics)` and `close()`, e.g. lt_jax.train.wandb_logger.WandbLogger); inert on
    processes other than 0."""

    def __init__(self, output_dir: str, *, start_step: int, jsonl: bool = True, tensorboard: bool = True,
                 active: bool = True, printer=print, sinks: Sequence[Any] = ()):
        self.output_dir, self.active, self.printer = output_dir, active, printer
        self.sinks = list(sinks) if active else []
        self.remote = storage.is_remote(output_dir)
        self._stage = tempfile.mkdtemp(prefix="lt_jax_metrics_") if (self.remote and active) else None
        self._jsonl_path = self._tb = None
        if not active:
            return
        if jsonl:
            self._jsonl_path = self._local("metrics.jsonl")
            self._rewrite_jsonl(start_step)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError as e:
                raise ImportError("logging.tensorboard needs the tensorboardX package: pip install tensorboardX, "
                                  "or set logging.tensorboard=false") from e

            # purge_step makes TensorBoard drop the killed run's events from the first re-run step on.
            self._tb = SummaryWriter(self._local("tensorboard"), purge_step=start_step + 1 if start_step else None)

    def _local(self, name: str) -> str:
        if self._stage is not None:
            return os.path.join(self._stage, name)
        storage.makedirs(self.output_dir)
        return os.path.join(self.output_dir, name)

    def _rewrite_jsonl(self, start_step: int) -> None:
        source = storage.join(self.output_dir, "metrics.jsonl")
        kept = []
        if storage.exists(source):
            for line in storage.read_text(source).splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if record.get("step", 0) <= start_step:
                    kept.append(json.dumps(record, sort_keys=True))
        with open(self._jsonl_path, "w") as f:
            f.write("".join(k + "\n" for k in kept))

    def write(self, step: int, metrics: dict[str, Any], *, kind: str = "train", console: Optional[str] = None) -> None:
        """Records `metrics` at `step`; `kind` prefixes TensorBoard tags ("train/loss")."""
        if not self.active:
            return
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        if console:
            self.printer(console, flush=True)
        if self._jsonl_path:
            with open(self._jsonl_path, "a") as f:
                f.write(json.dumps({"step": step, "kind": kind, "time": time.time(), **clean}, sort_keys=True) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(f"{kind}/{k}", v, step)
        for sink in self.sinks:
            sink.log(step, kind, clean)

    def text(self, message: str) -> None:
        if self.active:
            self.printer(message, flush=True)

    def flush(self) -> None:
        """Makes everything written so far durable at `output_dir`."""
        if not self.active:
            return
        if self._tb is not None:
            self._tb.flush()
        if self._stage is not None:
            storage.copy_local_to(self._stage, self.output_dir)

    def close(self) -> None:
        if not self.active:
            return
        if self._tb is not None:
            self._tb.close()
        for sink in self.sinks:
            sink.close()
        self.flush()


__all__ = ["MetricsWriter", "device_memory", "step_flops", "matmul_params", "peak_flops_per_device", "console_line", "PEAK_FLOPS"]
