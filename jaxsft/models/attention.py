"""Rotary embeddings, attention masks, and the one attention dispatch point.

Axis legend: B batch, T query time, S key time, N query heads, K kv heads,
G = N/K query heads per kv head, H head dim.

Masks are built from three per-token arrays so that training, packed rows and
KV-cache decoding share one rule: a query attends to a key when
  * the key's slot is not after the query's slot (causal),
  * both carry the same non-zero segment id (packed examples never see each
    other; segment 0 marks padding and empty cache slots),
  * and, with a sliding window W, their positions differ by less than W.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft import sharding
from jaxsft.models.model_config import ModelConfig

# Finite, so fully masked rows (padding) give a uniform softmax instead of NaN.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


# ----------------------------------------------------------------------------- RoPE

def _base_inv_freq(theta: float, dim: int) -> np.ndarray:
  # float32 as transformers computes it, so fp32 parity holds at long positions.
  return (1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
          ).astype(np.float32)


def _yarn(cfg: ModelConfig, rope: dict) -> tuple[np.ndarray, float]:
  dim, base, factor = cfg.head_dim, cfg.rope_theta, rope["factor"]
  orig = rope.get("original_max_position_embeddings") or cfg.max_position_embeddings

  def mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  attention_factor = rope.get("attention_factor")
  if attention_factor is None:
    if rope.get("mscale") and rope.get("mscale_all_dim"):
      attention_factor = mscale(factor, rope["mscale"]) / mscale(factor, rope["mscale_all_dim"])
    else:
      attention_factor = mscale(factor)
  beta_fast = rope.get("beta_fast") or 32
  beta_slow = rope.get("beta_slow") or 1

  def correction_dim(rotations):
    return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if rope.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  extrapolation_weight = 1 - ramp
  pos_freqs = np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
  inv_freq = ((1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight)
              + (1.0 / pos_freqs) * extrapolation_weight)
  return inv_freq.astype(np.float32), float(attention_factor)


def _llama3(cfg: ModelConfig, rope: dict) -> np.ndarray:
  inv_freq = _base_inv_freq(cfg.rope_theta, cfg.head_dim)
  factor, lo, hi = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
  old_len = rope["original_max_position_embeddings"]
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - lo) / (hi - lo)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < old_len / hi) & ~(wavelen > old_len / lo)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos and sin tables [B, T, H] (fp32) for integer ``positions`` [B, T].

  Matches transformers' rope types for these families, including the dynamic
  NTK variant, whose base grows with the largest position in the call.
  """
  rope = cfg.rope_dict()
  kind = rope.get("rope_type", "default")
  scale = 1.0
  pos = positions.astype(jnp.float32)
  if kind == "dynamic":
    dim, factor, max_pos = cfg.head_dim, rope["factor"], cfg.max_position_embeddings
    seq_len = jnp.maximum(jnp.max(positions) + 1, max_pos).astype(jnp.float32)
    base = cfg.rope_theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  else:
    if kind == "default":
      inv = _base_inv_freq(cfg.rope_theta, cfg.head_dim)
    elif kind == "linear":
      inv = _base_inv_freq(cfg.rope_theta, cfg.head_dim)
      pos = pos / rope["factor"]
    elif kind == "yarn":
      inv, scale = _yarn(cfg, rope)
    elif kind == "llama3":
      inv = _llama3(cfg, rope)
    else:
      raise AssertionError(kind)  # ModelConfig validates rope types
    inv_freq = jnp.asarray(inv)
  freqs = pos[..., None] * inv_freq  # [B, T, H/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb) * scale, jnp.sin(emb) * scale


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate ``x`` [B, T, heads, H] in the rotate-half layout HF checkpoints use."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  out = x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
  return out.astype(x.dtype)


# ----------------------------------------------------------------------------- masks

def attention_mask(q_slots, k_slots, q_segments, k_segments, q_positions, k_positions,
                   sliding_window: int | None) -> jax.Array:
  """Boolean mask [B, T, S] from per-token slots, segment ids and positions."""
  mask = k_slots[:, None, :] <= q_slots[:, :, None]
  mask &= q_segments[:, :, None] == k_segments[:, None, :]
  mask &= k_segments[:, None, :] != 0
  if sliding_window is not None:
    mask &= (q_positions[:, :, None] - k_positions[:, None, :]) < sliding_window
  return mask


# ----------------------------------------------------------------------------- dispatch

def _xla_attention(q, k, v, mask, scale):
  b, t, n, h = q.shape
  kv = k.shape[2]
  qg = q.reshape(b, t, kv, n // kv, h)
  logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask[:, None, None], logits, _MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, n, h).astype(q.dtype)


def _xla_blocks_kv_major(q, k, v, masks, bounds, scale):
  """``_xla_attention`` over the query blocks ``bounds`` (q0, q1, k0), heads first (CPU).

  q [B,T,N,H] is laid out once as [B,K,T,G,H] and k/v once as [B,K,S,H]:
  a block of queries is then a contiguous slice whose [T_block·G, H] rows
  multiply [S, H] keys as a plain batched matmul over (B, K), and the
  probabilities [T_block·G, S] multiply [S, H] values the same way, forward
  and backward. Block by block in the [B,T,K,G,H] layout, XLA:CPU instead
  transposed q, k, v, the probabilities and their cotangents around every
  einsum: per step of the tiny benchmark 5% less CPU time this way (and 30%
  less compile time), same values up to summation order (the same products
  and softmax, in the same dtypes). GPU/TPU keep ``_xla_attention`` per block, as measured there.
  """
  b, t, n, h = q.shape
  kv = k.shape[2]
  g = n // kv
  qt = q.reshape(b, t, kv, g, h).transpose(0, 2, 1, 3, 4)
  kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  outs = []
  for (q0, q1, k0), mask in zip(bounds, masks):
    m = q1 - q0
    qb = qt[:, :, q0:q1].reshape(b, kv, m * g, h)
    logits = jnp.einsum("BKMH,BKSH->BKMS", qb, kt[:, :, k0:q1],
                        preferred_element_type=jnp.float32) * scale
    logits = logits.reshape(b, kv, m, g, q1 - k0)
    logits = jnp.where(mask[:, None, :, None, :], logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(b, kv, m * g, q1 - k0)
    out = jnp.einsum("BKMS,BKSH->BKMH", probs, vt[:, :, k0:q1],
                     preferred_element_type=jnp.float32)
    outs.append(out.reshape(b, kv, m, g, h))
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
  return out.transpose(0, 2, 1, 3, 4).reshape(b, t, n, h).astype(q.dtype)


def resolve_impl(requested: str, dtype=None) -> str:
  """"auto" → cuDNN fused attention on GPU for 16-bit inputs, XLA elsewhere
  (cuDNN's kernel takes bf16/fp16 only, so fp32 compute stays on XLA)."""
  if requested != "auto":
    return requested
  sixteen_bit = dtype is None or jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
  return "cudnn" if sharding.compute_platform() == "gpu" and sixteen_bit else "xla"


def _causal_blocks(t: int) -> int:
  """How many query blocks the XLA path splits a row of ``t`` tokens into.

  Query block i attends only to keys up to its own end, so the causal upper
  triangle of the T×T scores is mostly never computed: with n blocks,
  (n+1)/(2n) of them are (62.5% at n = 4, 56% at n = 8). Blocks of at least
  128 tokens keep each matmul big enough to run at speed; at most 8 blocks
  bound the unrolled ops. 1 = one block (short rows, or no even split).
  """
  for n in range(min(8, t // 128), 1, -1):
    if t % n == 0:
      return n
  return 1


def dot_product_attention(q, k, v, *, segment_ids, positions, sliding_window, impl):
  """Causal self-attention over one (possibly packed) row: q [B,T,N,H], k/v [B,T,K,H].

  ``segment_ids`` [B,T] mark packed examples (0 = padding), or None: one
  example per row and no padding, which needs no mask beyond causality.

  The single dispatch point. On GPU, cuDNN's fused flash attention: with
  ``segment_ids`` None, plain ``is_causal`` (the fastest kernel: no mask is
  read); with segments, the segment mask [B,1,T,T] as well (JAX turns it
  into an additive bias that the kernel reads; tools/gpu_check.py measures it
  against cuDNN's packed-sequence offsets). Elsewhere the XLA path, which
  skips key blocks that the causal (and sliding-window) mask hides from a
  whole query block (``_causal_blocks``). Rows that attend to nothing
  (padding, segment 0) get some average of values, never used.
  """
  scale = 1.0 / math.sqrt(q.shape[-1])
  if resolve_impl(impl, q.dtype) == "cudnn":
    if q.dtype not in (jnp.bfloat16, jnp.float16):
      raise ValueError(f"attention='cudnn' needs bfloat16/float16 compute, got {q.dtype}; use "
                       "model.dtype=bfloat16 or attention='auto'/'xla'")
    seg_mask = None
    if segment_ids is not None:
      seg_mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    window = None if sliding_window is None else (sliding_window - 1, 0)
    return jax.nn.dot_product_attention(
        q, k, v, mask=seg_mask, scale=scale, is_causal=True, local_window_size=window,
        implementation="cudnn")
  b, t = q.shape[:2]
  slots = jnp.broadcast_to(jnp.arange(t), (b, t))
  ones = jnp.ones((b, t), jnp.int32)
  segments = ones if segment_ids is None else segment_ids
  n = _causal_blocks(t)
  size = t // n
  masks, bounds = [], []
  for i in range(n):
    q0, q1 = i * size, (i + 1) * size
    # Keys before the block's first query minus the window are hidden from
    # every query of the block: slots differ by at least W there, and so do
    # positions within a segment.
    k0 = 0 if sliding_window is None else max(0, q0 - sliding_window + 1) // size * size
    mask = attention_mask(slots[:, q0:q1], slots[:, k0:q1], segments[:, q0:q1],
                          segments[:, k0:q1], positions[:, q0:q1], positions[:, k0:q1],
                          sliding_window)
    masks.append(mask)
    bounds.append((q0, q1, k0))
  if jax.default_backend() == "cpu":  # _xla_blocks_kv_major's doc
    return _xla_blocks_kv_major(q, k, v, masks, bounds, scale)
  outs = [_xla_attention(q[:, q0:q1], k[:, k0:q1], v[:, k0:q1], mask, scale)
          for (q0, q1, k0), mask in zip(bounds, masks)]
  return outs[0] if n == 1 else jnp.concatenate(outs, axis=1)


def cached_attention(q, k_cache, v_cache, *, q_slots, q_positions, k_positions, k_valid,
                     sliding_window):
  """Attention of new queries against a KV cache [B, S, K, H] (decoding; XLA path).

  ``k_valid`` [B, S] marks written, non-padding cache slots.
  """
  b, t = q.shape[:2]
  s = k_cache.shape[1]
  k_slots = jnp.broadcast_to(jnp.arange(s), (b, s))
  mask = attention_mask(q_slots, k_slots, jnp.ones((b, t), jnp.int32), k_valid.astype(jnp.int32),
                        q_positions, k_positions, sliding_window)
  return _xla_attention(q, k_cache, v_cache, mask, 1.0 / math.sqrt(q.shape[-1]))


def prefix_attention(q, k, v, prefix_k, prefix_v, *, segment_ids, positions, sliding_window):
  """``dot_product_attention`` (XLA path) with P extra key/value slots that every
  query sees: prefix tuning. ``prefix_k``/``prefix_v`` [B, P, K, H] sit at
  positions 0..P-1 (``positions`` of the real tokens start at P), before every
  packed segment; the sliding window applies to them as to any key.
  ``segment_ids`` None: one example per row, no padding."""
  if segment_ids is None:
    segment_ids = jnp.ones(q.shape[:2], jnp.int32)
  b, t = segment_ids.shape
  p = prefix_k.shape[1]
  slots = jnp.broadcast_to(jnp.arange(t), (b, t))
  own = attention_mask(slots, slots, segment_ids, segment_ids, positions, positions,
                       sliding_window)
  prefix = jnp.ones((b, t, p), bool)
  if sliding_window is not None:
    prefix &= (positions[:, :, None] - jnp.arange(p)[None, None, :]) < sliding_window
  mask = jnp.concatenate([prefix, own], axis=-1)
  keys = jnp.concatenate([prefix_k.astype(k.dtype), k], axis=1)
  values = jnp.concatenate([prefix_v.astype(v.dtype), v], axis=1)
  return _xla_attention(q, keys, values, mask, 1.0 / math.sqrt(q.shape[-1]))
