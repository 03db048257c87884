"""Keep the host memory that XLA:CPU frees after each step, for the next step.

Why. XLA:CPU allocates one temporary buffer per execution of a compiled
program (every activation and residual of the step: 786 MB for the tiny
benchmark's step, seq 512, batch 8) and frees it when the step ends. glibc
serves an allocation that large with a fresh ``mmap`` and returns it with
``munmap``, so every step the kernel hands out and zero-fills ~192,000 new
pages on first touch: 0.5 s of system time in a 3 s step (16%), measured with
``getrusage`` (docs/BENCHMARKS.md, issue #8, third pass).

What. Before JAX creates its backends, on a glibc host whose JAX has no
accelerator to use:
  * ``jax_cpu_enable_async_dispatch=False``: the CPU client runs a program on
    the calling (main) thread. Its allocations then come from glibc's main
    arena; on a worker thread's arena, an allocation larger than that arena's
    64 MB heap is always ``mmap``-ed whatever the settings below.
  * ``mallopt(M_MMAP_MAX, 0)``: the main arena takes large blocks from its
    heap instead of ``mmap``; ``mallopt(M_TRIM_THRESHOLD, INT_MAX)``: freed
    heap memory is kept rather than given back, so the next step's buffer
    reuses pages that are already mapped (0 page faults per step instead of
    192,000).
The process keeps its peak host memory for its lifetime: what a training
process needs again at the next step anyway.

Not applied on GPU/TPU hosts: the step's buffers live on the device there,
and a host that loads or saves large checkpoints should give that memory back.
Async dispatch buys nothing on a CPU backend that computes on every core
while the Python loop waits for the step's metrics.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import logging
import sys

import jax

log = logging.getLogger(__name__)

# glibc's <malloc.h> parameter numbers.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1

_applied = False


def _accelerator_possible() -> bool:
  """Whether JAX could pick a GPU/TPU backend here (without starting one)."""
  platforms = jax.config.jax_platforms
  if platforms:
    return any(p.strip() not in ("cpu", "") for p in platforms.split(","))
  if importlib.util.find_spec("libtpu") is not None:
    return True
  if list(importlib.metadata.entry_points(group="jax_plugins")):
    return True
  namespace = importlib.util.find_spec("jax_plugins")
  return namespace is not None and any(True for _ in (namespace.submodule_search_locations or []))


def _backends_started() -> bool:
  from jax._src import xla_bridge  # noqa: PLC0415  (no public query for this)
  return bool(getattr(xla_bridge, "_backends", None))


def reuse_freed_memory() -> bool:
  """Make a CPU-only process reuse the host memory each step frees (module doc).

  Call once, before the first JAX computation (it is a no-op afterwards, on
  hosts with an accelerator, and off glibc). Returns whether it took effect.
  """
  global _applied
  if _applied:
    return True
  if not sys.platform.startswith("linux") or _backends_started() or _accelerator_possible():
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc (e.g. musl): leave the allocator alone
    return False
  if not (mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, _INT_MAX)):
    return False
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  _applied = True
  log.debug("host memory: XLA:CPU runs steps inline; freed memory is kept for reuse")
  return True
