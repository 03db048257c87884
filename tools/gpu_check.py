"""Checks jaxsft's attention paths on a GPU: cuDNN fused attention against XLA.

    python tools/gpu_check.py [--cpu-smoke] [--no-timing]

For every case, ``jaxsft.models.attention.dot_product_attention`` with
``impl="cudnn"`` and with ``impl="xla"``, both in bf16, are compared with an
fp32 XLA reference (same inputs cast up): the forward output and the
gradients of q, k and v, on the rows that attend to something (padding rows,
segment 0, are arbitrary by contract and carry no cotangent). A case PASSes
when cuDNN's largest error is at most 2× XLA-bf16's own plus 2e-2 (bf16 has 8
bits of mantissa; the two paths round differently, neither is "the" answer).

Cases (GQA everywhere: 8 query heads over 2 kv heads, head dim 64):
  causal            one example per row, segment_ids None (plain is_causal)
  packed            segments of several lengths per row, padding (0) at the end
  window            causal with a sliding window of 64
  packed_window     segments and the window together
  packed_offsets    EXPERIMENTAL: cuDNN's packed-sequence layout (per-row
                    segment offsets and lengths, jax's private cuDNN API) for
                    packed rows, instead of a [B,1,T,T] mask; measured here so
                    attention.py can adopt it if it is correct and faster

Then, unless --no-timing, forward+backward time at the Llama-3.2-1B attention
shape (B 8, T 2048, 32 heads over 8, head dim 64, bf16) of: XLA, cuDNN causal,
cuDNN with an SFT-like packed mask, and the packed-offsets variant.

Last, whether an array that JAX has copied to the host (as a checkpoint save
does) can still be donated to a jitted function (as the train step donates its
state): on a CPU, JAX 0.11 keeps such an array and copies it instead, so the
step after each checkpoint holds the state twice. ``donated_after_host_copy``
in the summary says whether this GPU does the same.

Prints PASS/FAIL/ERROR/SKIP per case, then one JSON line (the summary).
``--cpu-smoke`` runs the XLA parts only, so the script itself is checked on a
machine without a GPU (every cuDNN case then reports SKIP).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from jaxsft.models import attention as attn_lib  # noqa: E402

B, T, N, K, H = 2, 256, 8, 2, 64
WINDOW = 64


def packed_segments(batch: int, t: int, lengths: list[int]) -> np.ndarray:
  """Rows of consecutive segments 1, 2, … of ``lengths`` (cycled), padding 0 at the end."""
  seg = np.zeros((batch, t), np.int32)
  for b in range(batch):
    at, s = 0, 1
    while True:
      n = lengths[(b + s) % len(lengths)]
      if at + n > t - 8:  # leave some padding at the end
        break
      seg[b, at:at + n] = s
      at, s = at + n, s + 1
  return seg


def positions_of(seg: np.ndarray) -> np.ndarray:
  pos = np.zeros_like(seg)
  for b in range(seg.shape[0]):
    for s in np.unique(seg[b]):
      idx = np.nonzero(seg[b] == s)[0]
      pos[b, idx] = np.arange(len(idx))
  return pos


def cudnn_packed_offsets(q, k, v, segment_ids, sliding_window, max_segments: int):
  """Packed rows through cuDNN's segment offsets (experimental; private API)."""
  from jax._src.cudnn import fused_attention_stablehlo as fa  # noqa: PLC0415

  ids = jnp.arange(1, max_segments + 1, dtype=jnp.int32)
  hit = segment_ids[:, :, None] == ids[None, None, :]  # [B,T,M]
  lengths = jnp.sum(hit, axis=1, dtype=jnp.int32)  # [B,M]
  starts = jnp.argmax(hit, axis=1).astype(jnp.int32)
  present = lengths > 0
  seqlen = jnp.where(present, lengths, -1)
  offsets = jnp.concatenate([jnp.where(present, starts, -1),
                             jnp.full((q.shape[0], 1), -1, jnp.int32)], axis=1)
  return fa.dot_product_attention(
      q, k, v, q_seqlen=seqlen, kv_seqlen=seqlen, q_offsets=offsets, kv_offsets=offsets,
      scale=1.0 / math.sqrt(q.shape[-1]), mask_type=fa.MaskType.PADDING_CAUSAL,
      sliding_window_length=sliding_window)


def attention(impl, q, k, v, seg, pos, window, max_segments=None):
  if impl == "cudnn_offsets":
    return cudnn_packed_offsets(q, k, v, seg, window, max_segments)
  return attn_lib.dot_product_attention(q, k, v, segment_ids=seg, positions=pos,
                                        sliding_window=window, impl=impl)


def errors(impl, inputs, seg, pos, window, cotangent, valid, max_segments=None):
  """Max abs errors of impl (bf16) vs the fp32 XLA reference: output, dq, dk, dv."""
  def run(impl, dtype):
    def f(q, k, v):
      out = attention(impl, q, k, v, seg, pos, window, max_segments)
      return jnp.sum(out.astype(jnp.float32) * cotangent * valid), out
    grads, out = jax.jit(jax.grad(f, argnums=(0, 1, 2), has_aux=True))(
        *(x.astype(dtype) for x in inputs))
    return [np.asarray(x, np.float32) for x in (out, *grads)]

  ref = run("xla", jnp.float32)
  got = run(impl, jnp.bfloat16)
  mask = np.asarray(valid)
  out_err = float(np.max(np.abs((got[0] - ref[0]) * mask))) if mask.any() else 0.0
  return [out_err] + [float(np.max(np.abs(g - r))) for g, r in zip(got[1:], ref[1:])]


def check_cases(on_gpu: bool) -> list[dict]:
  rng = np.random.default_rng(0)
  inputs = tuple(jnp.asarray(rng.normal(size=shape), jnp.float32)
                 for shape in ((B, T, N, H), (B, T, K, H), (B, T, K, H)))
  cotangent = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
  packed = packed_segments(B, T, [37, 80, 5, 61, 19, 48])
  cases = {
      "causal": (None, None),
      "packed": (packed, None),
      "window": (None, WINDOW),
      "packed_window": (packed, WINDOW),
      "packed_offsets": (packed, None),
  }
  results = []
  for name, (seg, window) in cases.items():
    impl = "cudnn_offsets" if name == "packed_offsets" else "cudnn"
    seg_j = None if seg is None else jnp.asarray(seg)
    pos = jnp.asarray(positions_of(seg) if seg is not None else
                      np.broadcast_to(np.arange(T), (B, T)).astype(np.int32))
    valid = jnp.ones((B, T, 1, 1)) if seg is None else jnp.asarray(seg != 0)[:, :, None, None]
    row = {"case": name, "impl": impl}
    try:
      xla = errors("xla", inputs, seg_j, pos, window, cotangent, valid)
      row["xla_bf16_err"] = xla
      if not on_gpu:
        row["status"] = "SKIP"
        row["why"] = "no GPU: only the XLA path ran"
      else:
        got = errors(impl, inputs, seg_j, pos, window, cotangent, valid,
                     max_segments=int(packed.max()))
        row["cudnn_err"] = got
        ok = all(g <= 2 * x + 2e-2 for g, x in zip(got, xla))
        row["status"] = "PASS" if ok else "FAIL"
    except Exception as e:  # noqa: BLE001  (report and go on to the next case)
      row["status"] = "ERROR"
      row["why"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
      traceback.print_exc(limit=3)
    print(f"{row['status']:5s} {name:15s} {impl:14s} "
          + " ".join(f"{k}={v}" for k, v in row.items() if k not in ("status", "case", "impl")),
          flush=True)
    results.append(row)
  return results


def time_fwd_bwd(impl, q, k, v, seg, pos, max_segments=None, reps=10) -> float:
  f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(
      attention(impl, q, k, v, seg, pos, None, max_segments).astype(jnp.float32)),
      argnums=(0, 1, 2)))
  jax.block_until_ready(f(q, k, v))
  jax.block_until_ready(f(q, k, v))
  t0 = time.perf_counter()
  for _ in range(reps):
    out = f(q, k, v)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / reps * 1e3


def timings(on_gpu: bool, smoke: bool) -> dict:
  b, t, n, kv, h = (2, 256, 4, 2, 64) if smoke else (8, 2048, 32, 8, 64)
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=s), jnp.bfloat16)
             for s in ((b, t, n, h), (b, t, kv, h), (b, t, kv, h)))
  # SFT-like packing: lognormal lengths around 250 tokens.
  lengths = np.clip(np.rint(rng.lognormal(np.log(250), 0.8, 64)), 16, t).astype(int).tolist()
  seg_np = packed_segments(b, t, lengths)
  seg, pos = jnp.asarray(seg_np), jnp.asarray(positions_of(seg_np))
  ar = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  runs = {"xla_causal": ("xla", None, ar), "xla_packed": ("xla", seg, pos)}
  if on_gpu:
    runs.update({"cudnn_causal": ("cudnn", None, ar), "cudnn_packed_mask": ("cudnn", seg, pos),
                 "cudnn_packed_offsets": ("cudnn_offsets", seg, pos)})
  out = {"shape": [b, t, n, kv, h], "segments_per_row": int(seg_np.max())}
  for name, (impl, s, p) in runs.items():
    try:
      out[name + "_ms"] = time_fwd_bwd(impl, q, k, v, s, p, int(seg_np.max()),
                                       reps=2 if smoke else 10)
    except Exception as e:  # noqa: BLE001
      out[name + "_ms"] = None
      out[name + "_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    print(f"time  {name:22s} {out[name + '_ms']}", flush=True)
  return out


def donation_after_host_copy() -> dict:
  """Whether a fresh device array donates to a jitted function, and whether
  one still does after ``jax.device_get`` (what orbax's save does to every
  leaf of the state)."""
  step = jax.jit(lambda x: x + 1, donate_argnums=0)
  out = {}
  for name, touch in (("fresh", lambda x: None), ("after_device_get", jax.device_get)):
    x = jnp.zeros((1024, 1024), jnp.float32) + 1
    touch(x)
    step(x).block_until_ready()
    out[name] = x.is_deleted()
  print(f"donate fresh={out['fresh']} after_device_get={out['after_device_get']}", flush=True)
  return out


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--cpu-smoke", action="store_true", help="XLA parts only, small shapes")
  p.add_argument("--no-timing", action="store_true")
  args = p.parse_args(argv)
  backend = jax.default_backend()
  on_gpu = backend == "gpu"
  if not on_gpu and not args.cpu_smoke:
    raise SystemExit(f"error: no GPU (JAX backend {backend!r}); use --cpu-smoke to check the "
                     "script on a CPU")
  info = {"backend": backend, "device": jax.devices()[0].device_kind,
          "jax_version": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")}
  if on_gpu:
    try:
      from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version  # noqa: PLC0415
      info["cudnn_version"] = check_cudnn_version()
    except Exception as e:  # noqa: BLE001
      info["cudnn_version"] = f"unknown ({type(e).__name__})"
  print(json.dumps(info), flush=True)
  cases = check_cases(on_gpu)
  summary = {"gpu_check": True, **info, "cases": cases,
             "passed": sum(c["status"] == "PASS" for c in cases),
             "failed": [c["case"] for c in cases if c["status"] in ("FAIL", "ERROR")]}
  if not args.no_timing:
    summary["timing"] = timings(on_gpu, args.cpu_smoke)
  donation = donation_after_host_copy()
  summary["donated_fresh"] = donation["fresh"]
  summary["donated_after_host_copy"] = donation["after_device_get"]
  print(json.dumps(summary))
  return summary


if __name__ == "__main__":
  main()
