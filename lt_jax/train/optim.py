"""Optax: AdamW with global-norm clipping, weight decay masked off norms and biases, LR schedules.

Schedules (all start at 0 and warm up linearly to `lr` over the warmup steps, as HF's do):
  cosine    cosine decay from lr to lr * min_lr_ratio at the last step
  linear    linear decay from lr to lr * min_lr_ratio at the last step
  constant  lr after warmup
  wsd       warmup-stable-decay: lr until the final `decay_fraction` of steps, then linear to the floor
Warmup is `warmup_steps`, or `warmup_fraction` of the run's total steps.

Precision: the optimizer state follows the parameters (fp32 master weights give fp32 Adam moments);
`mu_dtype` may store the first moment in bf16 to save memory.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from lt_jax.train.config import OptimConfig


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    """`warmup_steps`, or `warmup_fraction` of the run rounded, but at least 1 when the fraction is positive."""
    if cfg.warmup_steps:
        return cfg.warmup_steps
    return max(int(round(cfg.warmup_fraction * total_steps)), 1 if cfg.warmup_fraction > 0 else 0)


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """The learning rate as a function of the step (0-based: the update made by step k uses lr(k))."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warm = min(warmup_steps(cfg, total_steps), total_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    rest = max(total_steps - warm, 1)
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, rest, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(cfg.lr, floor, rest)
    elif cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "wsd":
        decay = max(1, int(round(cfg.decay_fraction * total_steps)))
        stable = max(total_steps - warm - decay, 0)
        after = optax.join_schedules(
            [optax.constant_schedule(cfg.lr), optax.linear_schedule(cfg.lr, floor, decay)], [stable]
        )
    else:
        raise ValueError(f"optim.schedule {cfg.schedule!r}; allowed: cosine, linear, constant, wsd")
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), after], [warm])


def decay_mask(params: Any, decay_embeddings: bool = True) -> Any:
    """True where weight decay applies: matrices, not norm scales or biases (nor embeddings if off)."""

    def decays(path, _):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        leaf = names[-1] if names else ""
        if leaf in ("scale", "bias"):
            return False
        if leaf == "embedding" and not decay_embeddings:
            return False
        return True

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(clip -> AdamW with masked decay, the schedule it follows)."""
    schedule = make_schedule(cfg, total_steps)
    mu_dtype = None if cfg.mu_dtype is None else jnp.dtype(cfg.mu_dtype)
    adamw = optax.adamw(
        schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mu_dtype=mu_dtype,
        mask=lambda p: decay_mask(p, cfg.decay_embeddings),
    )
    parts = [] if cfg.clip_norm is None else [optax.clip_by_global_norm(cfg.clip_norm)]
    return optax.chain(*parts, adamw), schedule


__all__ = ["make_schedule", "make_optimizer", "decay_mask", "warmup_steps"]
