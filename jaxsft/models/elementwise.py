"""The layer's elementwise ops (SwiGLU's gating, RMSNorm) with their backward
passes written out, so that each keeps only its inputs for the backward pass.

Axis legend: B batch, T time, D model width, F ffn width (any leading axes
work; RMSNorm normalizes the last).

Why. Differentiated automatically, ``silu(gate) * up`` keeps four [B,T,F]
intermediates beside ``gate`` and ``up`` (the sigmoid, SiLU's output, its
product and more), and RMSNorm keeps fp32 copies of its [B,T,D] input. Under
the layer scan each kept value becomes a stacked residual: written into an
[L,B,T,…] buffer (first zero-filled) in the forward loop and read back in
the backward one. For Llama-3.2-1B (batch 8, seq 2048, full SFT, compiled
for an H200) the writes and fills alone were 12% of the step's estimated time
(33 of 286 ms) and the stacked buffers ~35 GiB of its 56 (docs/BENCHMARKS.md;
now 17 ms and 35.5 GiB in all). Here each op keeps only what
it was given (SwiGLU: ``gate`` and ``up``; RMSNorm: ``x`` and one fp32
scalar per row) and recomputes the rest in its backward pass, inside the
same fused kernel that computes the gradients, at no extra memory traffic.

Values: the forward passes are the same ops as before (bit-identical). The
backward passes compute in fp32 and round once at the end; autodiff rounded
bf16 intermediates (the differences are bf16 rounding; tests/test_models.py).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """``silu(gate) * up`` (SwiGLU's gating), in the inputs' dtype."""
  return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
  return swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, dh):
  gate, up = residuals
  g = gate.astype(jnp.float32)
  sig = jax.nn.sigmoid(g)
  dh = dh.astype(jnp.float32)
  d_up = dh * (g * sig)
  # d silu(g)/dg = sig + g·sig·(1 − sig)
  d_gate = dh * up.astype(jnp.float32) * sig * (1.0 + g * (1.0 - sig))
  return d_gate.astype(gate.dtype), d_up.astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """RMSNorm over the last axis as transformers computes it: normalized in
  fp32, cast to ``x``'s dtype, times ``scale`` cast to ``x``'s dtype."""
  return _rms_norm(x, scale, eps)[0]


def _rms_norm(x, scale, eps):
  x32 = x.astype(jnp.float32)
  inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return scale.astype(x.dtype) * (x32 * inv).astype(x.dtype), inv


def _rms_norm_fwd(x, scale, eps):
  y, inv = _rms_norm(x, scale, eps)
  return y, (x, scale, inv)


def _rms_norm_bwd(eps, residuals, dy):
  del eps  # folded into inv
  x, scale, inv = residuals
  normed = x.astype(jnp.float32) * inv
  dy = dy.astype(jnp.float32)
  # The forward multiplied by scale rounded to x's dtype: so does the backward.
  d_normed = dy * scale.astype(x.dtype).astype(jnp.float32)
  rows = tuple(range(x.ndim - 1))
  d_scale = jnp.sum(dy * normed.astype(x.dtype).astype(jnp.float32), axis=rows)
  # normed = x·inv, inv = (mean(x²) + eps)^-½  ⇒
  # dx = inv · (d_normed − normed · mean(d_normed · normed))
  dx = inv * (d_normed - normed * jnp.mean(d_normed * normed, axis=-1, keepdims=True))
  return dx.astype(x.dtype), d_scale.astype(scale.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)
