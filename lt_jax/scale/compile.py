"""`lt-jax compile`: will this recipe fit on that slice? An ahead-of-time check without the hardware.

    lt-jax compile --config configs/qwen2.5-7b-32k.yaml --topology v5p:4x4x4 [--slices 2]
    lt-jax compile --config run.yaml --gpu h100x8            (on a GPU node: its attached GPUs)
    lt-jax compile --config run.yaml --topology v5p:4x4x4 --sampler mesh.context=4 data.seq_len=131072

The real training step (`lt_jax.train.step.jit_train_step`: forward, backward, accumulation,
clipping, AdamW) is traced over abstract inputs (ShapeDtypeStructs carrying their shardings: the
parameters, the optimizer state and one global batch), lowered and compiled for the target's
devices. Nothing is allocated. XLA's `memory_analysis()` then gives the per-device bytes of
arguments, outputs, temporaries and code; they are set against the chip's HBM, with the headroom
left. `cost_analysis()` gives the compiled FLOPs where XLA reports them. `--sampler` compiles the
generation engine's prefill chunk and decode chunk the same way, with the shapes the engine itself
derives from its config (`lt_jax.sample.engine.abstract_calls`: --sample-batch slots, sequences of
--prompt-len + --max-new-tokens).

Exit status: 0 fits with at least `--min-headroom`, 3 does not, 1 on errors. A compiler that runs
out of HBM (RESOURCE_EXHAUSTED) is the clearest "does not fit": exit 3, with the bytes it needed
against the chip's, per device, and what to change.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lt_jax import config as config_lib
from lt_jax.data.loader import BATCH_KEYS, batch_sharding
from lt_jax.model import sharding as shd
from lt_jax.model import transformer as tfm
from lt_jax.sample import engine as eng
from lt_jax.scale import topology
from lt_jax.train import checkpoint as ckpt
from lt_jax.train import metrics, optim
from lt_jax.train import step as st
from lt_jax.train.config import load_run_config

log = logging.getLogger(__name__)

NOT_FIT_EXIT_CODE = 3
_PLACEHOLDER_DATA = "<not read by lt-jax compile>"
_NOMINAL_STEPS = 1000  # the schedule's length changes values, not shapes or memory


@dataclasses.dataclass(frozen=True)
class SampleShape:
    """The sampler call to compile: rows, prompt bucket and new tokens."""

    batch: int = 64
    prompt_len: int = 1024
    max_new_tokens: int = 32768


# ---------------------------------------------------------------------------------------------
# Configs


def load_config(path: str, overrides) -> Any:
    """The run config; `data.train` may be absent (the check reads no data)."""
    data = config_lib.load_yaml(path) if path else {}
    extra = [] if (data.get("data") or {}).get("train") else [f"data.train={_PLACEHOLDER_DATA}"]
    return load_run_config(path, [*extra, *overrides])


ARCH_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads")


def resolve_model(cfg, platform: str, printer=print):
    """The ModelConfig to compile: the YAML's model section when it names the architecture (the
    shapes are all memory depends on, so no checkpoint is read), else `train.init_from`'s config
    under the section. `attention: auto` becomes the target's fused kernel, since this host's
    backend is not the target's."""
    missing = [k for k in ARCH_KEYS if k not in cfg.model]
    if not missing or not cfg.train.init_from:
        model = cfg.model_config()
    else:
        printer(f"model: {', '.join(missing)} not in the YAML; reading {cfg.train.init_from}")
        model = cfg.model_config(ckpt.load_model_config(cfg.train.init_from), source=cfg.train.init_from)
    if model.attention == "auto" and platform in ("tpu", "gpu"):
        model = dataclasses.replace(model, attention="splash" if platform == "tpu" else "cudnn")
    return model


# ---------------------------------------------------------------------------------------------
# Compilation


def abstract_batch(global_batch: int, seq_len: int, sharding) -> dict:
    return {k: jax.ShapeDtypeStruct((global_batch, seq_len), jnp.int32, sharding=sharding) for k in BATCH_KEYS}


def compile_train_step(cfg, model_config, mesh):
    """(compiled train step, {"lower_s", "compile_s"}) for `cfg` on `mesh`; nothing is allocated."""
    optimizer, schedule = optim.make_optimizer(cfg.optim, cfg.train.steps or _NOMINAL_STEPS)
    graphdef, params = st.split_model(tfm.abstract_model(model_config, mesh))
    shardings = st.state_shardings(params, optimizer, mesh)
    state = st.abstract_state(params, optimizer, shardings)
    batch_sh = batch_sharding(mesh)
    batch = abstract_batch(cfg.train.global_batch, cfg.data.seq_len, batch_sh)
    options = st.StepOptions(cfg.train.grad_accum, cfg.train.z_loss, cfg.train.lm_head_chunk)
    step = st.jit_train_step(graphdef, optimizer, schedule, options, shardings, batch_sh)
    return _lower_and_compile(step, mesh, state, batch)


def _lower_and_compile(fn, mesh, *args, **kwargs):
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = fn.trace(*args, **kwargs).lower()
        t1 = time.perf_counter()
        compiled = lowered.compile()
    return compiled, {"lower_s": t1 - t0, "compile_s": time.perf_counter() - t1}


def compile_sampler(model_config, mesh, shape: SampleShape, chunk: int = 16) -> dict[str, tuple]:
    """{"prefill": (compiled, times), "decode": (compiled, times)} of the generation engine's device
    calls for `shape` (slots = batch, sequences of prompt_len + max_new_tokens), with the shapes the
    engine itself derives (`engine.abstract_calls`); parameters in the compute dtype, as an
    exported checkpoint is served."""
    cfg = dataclasses.replace(model_config, param_dtype=model_config.compute_dtype, remat="none")
    graphdef, params = nnx.split(tfm.abstract_model(cfg, mesh))
    rep = NamedSharding(mesh, PartitionSpec())
    sds = lambda shape_, dtype: jax.ShapeDtypeStruct(shape_, dtype, sharding=rep)  # noqa: E731
    config = eng.EngineConfig(num_slots=shape.batch, max_len=shape.prompt_len + shape.max_new_tokens,
                              decode_steps=chunk, prefill_chunk=min(256, 1 << (shape.prompt_len - 1).bit_length()))
    calls = eng.abstract_calls(cfg, config, graphdef, params, sds)
    return {name: _lower_and_compile(fn, mesh, *args, **kwargs) for name, (fn, args, kwargs) in calls.items()}


# ---------------------------------------------------------------------------------------------
# Reports


def memory_report(compiled, capacity: Optional[int]) -> dict[str, Any]:
    """Per-device bytes from XLA's memory analysis, the peak estimate and the headroom left."""
    ma = compiled.memory_analysis()
    fields = {
        "arguments": "argument_size_in_bytes", "outputs": "output_size_in_bytes",
        "temporaries": "temp_size_in_bytes", "generated_code": "generated_code_size_in_bytes",
        "alias": "alias_size_in_bytes", "host_temporaries": "host_temp_size_in_bytes",
    }
    out = {k: int(getattr(ma, attr, 0) or 0) for k, attr in fields.items()}
    # Donated outputs reuse their argument buffers (alias), so they count once.
    out["peak"] = out["arguments"] + out["outputs"] - out["alias"] + out["temporaries"] + out["generated_code"]
    out["capacity"] = capacity
    out["headroom"] = None if not capacity else 1.0 - out["peak"] / capacity
    return out


def cost_report(compiled) -> dict[str, Optional[float]]:
    """Compiled FLOPs and bytes accessed per device, where XLA reports them."""
    try:
        cost = compiled.cost_analysis()
    except Exception as e:  # noqa: BLE001 - some backends do not implement it
        log.info("cost_analysis unavailable: %s", e)
        return {"flops": None, "bytes_accessed": None}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    cost = cost or {}
    flops = cost.get("flops")
    return {"flops": float(flops) if flops and flops > 0 else None,
            "bytes_accessed": float(cost["bytes accessed"]) if cost.get("bytes accessed") else None}


def model_flops(model_config, global_batch: int, seq_len: int) -> float:
    """6N per token plus causal attention, every row one document (the most attention work)."""
    tokens = float(global_batch * seq_len)
    pairs = float(global_batch) * seq_len * (seq_len + 1) / 2
    return metrics.step_flops(model_config, tokens, pairs)


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _gib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def _active(m: dict) -> str:
    """" (3.35B active)" for a mixture of experts: what the FLOPs (and MFU) count."""
    active = m.get("active_params_b")
    return "" if active is None or active == m["params_b"] else f" ({_count(active * 1e9)} active)"


def format_report(report: dict) -> str:
    """The human-readable fit table."""
    t, m = report["target"], report["model"]
    lines = [
        f"target  {t['name']}: {t['devices']} x {t['device_kind']} ({t['slices']} slice(s)), mesh {t['mesh']}",
        f"model   {m['family']} {_count(m['params_b'] * 1e9)} params{_active(m)}, {m['num_layers']} layers, "
        f"param {m['param_dtype']}, compute {m['compute_dtype']}, remat {m['remat']}, attention {m['attention']}",
    ]
    for name, part in report["compiled"].items():
        mem, cost = part["memory"], part["cost"]
        if "compiler" in part:  # the compiler ran out of HBM: no memory analysis, only its numbers
            lines.append(f"{name:<7} {part['shape']}: per device needs {_gib(mem['peak'])} GiB, "
                         f"{_gib(mem['capacity'])} GiB available; compiler: {part['compiler']}")
            continue
        head = "-" if mem["headroom"] is None else f"{100 * mem['headroom']:.1f}%"
        lines.append(
            f"{name:<7} {part['shape']}: per device {_gib(mem['peak'])} / {_gib(mem['capacity'])} GiB "
            f"(headroom {head}) = args {_gib(mem['arguments'])} + out {_gib(mem['outputs'])} "
            f"- alias {_gib(mem['alias'])} + temp {_gib(mem['temporaries'])} + code {_gib(mem['generated_code'])}; "
            f"lower {part['times']['lower_s']:.1f}s, compile {part['times']['compile_s']:.1f}s"
        )
        if cost["flops"]:
            # XLA counts a while-loop body once (the layer scan, accumulation, decode loop).
            lines.append(f"        XLA cost analysis: {cost['flops'] / 1e12:.4g} TFLOP per device per call "
                         "(loop bodies counted once)")
    if "model_tflops_per_step" in report:
        lines.append(f"model   {report['model_tflops_per_step']:.4g} TFLOP per train step; at 100% of peak "
                     f"{report.get('ideal_step_s') or float('nan'):.2f}s per step")
    lines.append(report["verdict"])
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The command


def check(cfg, target, *, sampler: Optional[SampleShape] = None, train: bool = True,
          min_headroom: float = 0.10, printer=print) -> dict:
    """Compiles what is asked for `target` and returns the report (see module doc)."""
    devices = topology.target_devices(target)
    kind = devices[0].device_kind
    if target.num_slices > 1 and cfg.mesh.dcn_data == 1:  # as tpu_scripts/tpu.py launch does
        printer(f"mesh.dcn_data={target.num_slices}: the batch is split across the {target.num_slices} slices")
        cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, dcn_data=target.num_slices))
    capacity = topology.capacity_bytes(target, kind)
    model_config = resolve_model(cfg, target.platform, printer)
    mesh = shd.make_mesh(cfg.mesh, devices)
    report: dict[str, Any] = {
        "target": {"name": target.name, "platform": target.platform, "devices": len(devices), "device_kind": kind,
                   "slices": target.num_slices, "mesh": dict(mesh.shape), "capacity_bytes": capacity},
        "model": {**dataclasses.asdict(model_config), "params_b": model_config.num_params() / 1e9,
                  "active_params_b": model_config.num_params(active=True) / 1e9},
        "compiled": {},
    }
    if train:
        check_divisible(cfg, mesh)
        printer(f"compiling the train step for {target.name} ({len(devices)} x {kind}), mesh {dict(mesh.shape)} ...")
        shape = f"batch {cfg.train.global_batch} x {cfg.data.seq_len} (accum {cfg.train.grad_accum})"
        try:
            compiled, times = compile_train_step(cfg, model_config, mesh)
            report["compiled"]["train"] = _part(compiled, times, capacity, shape)
        except Exception as e:  # noqa: BLE001 - XLA raises its runtime error type; only OOM is an answer
            report["compiled"]["train"] = out_of_memory_part(e, capacity, shape)
        flops = model_flops(model_config, cfg.train.global_batch, cfg.data.seq_len)
        peak = metrics.peak_flops_per_device(kind)
        report["model_tflops_per_step"] = flops / 1e12
        report["ideal_step_s"] = flops / (peak * len(devices)) if peak else None
    if sampler is not None:
        printer(f"compiling the sampler (batch {sampler.batch}, prompt {sampler.prompt_len}, "
                f"+{sampler.max_new_tokens} tokens) ...")
        shape = (f"batch {sampler.batch}, prompt {sampler.prompt_len}, cache for +{sampler.max_new_tokens}, "
                 f"params {model_config.compute_dtype}")
        try:
            parts = compile_sampler(model_config, mesh, sampler)
        except Exception as e:  # noqa: BLE001 - as for the train step: only running out of HBM is an answer
            parts = {"sampler": out_of_memory_part(e, capacity, shape)}
        for name, part in parts.items():
            report["compiled"][name] = part if isinstance(part, dict) else _part(*part, capacity, shape)
    report["verdict"], report["fits"] = _verdict(report, min_headroom)
    return report


def check_divisible(cfg, mesh) -> None:
    """Rows per micro-batch must split over the batch axes and rows over `context`; say which fields."""
    shards = shd.axes_size(mesh, ("dcn_data", "data", "fsdp", "expert"))
    micro = cfg.train.global_batch // cfg.train.grad_accum
    if micro % shards:
        raise ValueError(
            f"train.global_batch / train.grad_accum = {micro} rows per micro-batch cannot be split over "
            f"dcn_data*data*fsdp*expert = {shards} devices; change the batch, grad_accum, or move devices to "
            "mesh.tensor / mesh.context"
        )
    context = shd.axis_size(mesh, "context")
    if cfg.data.seq_len % context:
        raise ValueError(f"data.seq_len {cfg.data.seq_len} is not divisible by mesh.context {context}")


def _part(compiled, times, capacity, shape: str) -> dict:
    return {"shape": shape, "memory": memory_report(compiled, capacity), "cost": cost_report(compiled), "times": times}


_SIZE = r"([\d.]+)\s*([KMGT])i?B?"
# XLA's wordings: "... HLO temporaries (236.60G) exceeds available HBM (95.74G)" and "Used 120.5G of 95.74G hbm".
_OOM_PATTERNS = (re.compile(r"\(" + _SIZE + r"\) exceeds available HBM \(" + _SIZE + r"\)"),
                 re.compile(r"Used " + _SIZE + r" of " + _SIZE))
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def out_of_memory_part(error: BaseException, capacity: Optional[int], shape: str) -> dict:
    """The report part of a compile the compiler refused for lack of HBM; other errors are re-raised."""
    message = str(error)
    if "RESOURCE_EXHAUSTED" not in message:
        raise error
    needed = available = None
    for pattern in _OOM_PATTERNS:
        m = pattern.search(message)
        if m:
            needed = float(m.group(1)) * _UNITS[m.group(2)]
            available = float(m.group(3)) * _UNITS[m.group(4)]
            break
    available = available or capacity
    memory = {"peak": needed, "capacity": available,
              "headroom": 1.0 - needed / available if needed and available else -1.0}
    first = next((line.strip() for line in message.splitlines() if "RESOURCE_EXHAUSTED" in line), message[:300])
    return {"shape": shape, "memory": memory, "cost": {"flops": None}, "times": None, "compiler": first}


def _verdict(report: dict, min_headroom: float) -> tuple[str, bool]:
    worst = min(((name, p["memory"]["headroom"]) for name, p in report["compiled"].items()
                 if p["memory"]["headroom"] is not None), key=lambda x: x[1], default=None)
    if worst is None:
        return "verdict: unknown capacity for this device kind; compare the per-device bytes yourself", True
    name, head = worst
    if head >= min_headroom:
        return f"verdict: FITS (least headroom {100 * head:.1f}% in {name}, required {100 * min_headroom:.1f}%)", True
    if head >= 0:
        return (f"verdict: TIGHT ({name} leaves {100 * head:.1f}% < {100 * min_headroom:.1f}%): raise remat, "
                "fsdp or grad_accum, or lower the batch"), False
    mem = report["compiled"][name]["memory"]
    need = (f"{_gib(mem['peak'])} GiB needed per device, {_gib(mem['capacity'])} GiB available"
            if mem.get("peak") else f"needs {100 * -head:.1f}% more than the chip has")
    return (f"verdict: DOES NOT FIT ({name}: {need}). Change one of: more chips (a larger --topology, with "
            "mesh.fsdp / mesh.tensor over them), model.remat=full, a smaller micro-batch (train.grad_accum up or "
            "train.global_batch down), or context parallelism (mesh.context) for long sequences"), False


__all__ = ["check", "compile_train_step", "compile_sampler", "memory_report", "cost_report", "format_report",
           "load_config", "resolve_model", "SampleShape", "NOT_FIT_EXIT_CODE"]
