"""Scaling out: ahead-of-time fit checks for TPU slices and GPU nodes (`lt-jax compile`) and the
target descriptions they compile for. Launch scripts live in tpu_scripts/ (TPU VMs, queued
resources, multi-slice) and tpu_scripts/gpu/ (Slurm and a plain multi-node launcher); context
parallelism for long rows is lt_jax/model/context_parallel.py."""
