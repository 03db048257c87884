"""The projection matmul ``x·W`` of every dense layer, with its backward pass
written out for XLA's CPU backend.

Axis legend: B batch, T time, I the weight's input axes flattened, O its
output axes flattened.

Why. Differentiated automatically, a projection's weight gradient
``dW = Σ_BT xᵀ·dy`` reaches XLA:CPU as a dot contracting the token axis, the
major axis of both operands; XLA then writes the cotangent ``dy`` (the wider
operand for the MLP's gate/up projections: F = 2.7·D) transposed into a fresh
buffer, fused with whatever elementwise backward produced it (SiLU's), and
those strided writes cost ~15% of the tiny benchmark's step
(docs/BENCHMARKS.md). Written as the same products on ``[BT, I]`` / ``[BT, O]``
matrices inside a ``custom_vjp`` (saving only x and W, as autodiff does),
XLA keeps the cotangent where it is: one MLP layer's forward + backward runs
in ~25% less CPU time, with the same values (the same products, summed in
the same dtype).

GPU and TPU keep the plain einsum and autodiff, which their compilers lay out
well (the H200 figures in docs/BENCHMARKS.md were measured that way); only
the CPU backend takes this path.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxsft import sharding


def project(x: jax.Array, w: jax.Array, n_in: int) -> jax.Array:
  """``x`` [B, T, in…] times ``w`` [in…, out…] (``n_in`` input axes) → [B, T, out…].

  Same dtype rules as ``jnp.einsum`` of the two (callers cast both to the
  compute dtype first).
  """
  assert x.shape[x.ndim - n_in:] == w.shape[:n_in], (x.shape, w.shape, n_in)
  if sharding.compute_platform() != "cpu":
    return _einsum(x, w, n_in)
  return _project(x, w, n_in)


def _einsum(x, w, n_in):
  letters = "abcdefgh"
  ins, outs = letters[:n_in], letters[n_in:w.ndim]
  return jnp.einsum(f"XY{ins},{ins}{outs}->XY{outs}", x, w)


def _prod(shape) -> int:
  out = 1
  for s in shape:
    out *= s
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _project(x, w, n_in):
  lead, out = x.shape[:x.ndim - n_in], w.shape[n_in:]
  x2 = x.reshape(-1, _prod(w.shape[:n_in]))
  w2 = w.reshape(x2.shape[1], -1)
  return jnp.matmul(x2, w2).reshape(lead + out)


def _project_fwd(x, w, n_in):
  need_x, need_w = x.perturbed, w.perturbed
  x, w = x.value, w.value
  return _project(x, w, n_in), (x if need_w else None, w if need_x else None, x.shape, w.shape)


def _project_bwd(n_in, residuals, dy):
  x, w, x_shape, w_shape = residuals
  if isinstance(dy, jax.custom_derivatives.SymbolicZero):
    return None, None
  i = _prod(w_shape[:n_in])
  dy2 = dy.reshape(-1, _prod(w_shape[n_in:]))
  # dx = dy·Wᵀ and dW = xᵀ·dy, on plain matrices (module doc). A frozen
  # weight (w not perturbed, e.g. under LoRA) gets no weight-gradient matmul.
  dx = None if w is None else jnp.matmul(dy2, w.reshape(i, -1).T).reshape(x_shape)
  dw = None if x is None else jnp.matmul(x.reshape(-1, i).T, dy2).reshape(w_shape)
  return dx, dw


_project.defvjp(_project_fwd, _project_bwd, symbolic_zeros=True)
