"""LoRA and DoRA on the model's projections, with PEFT's semantics.

A targeted projection ``y = x·W`` (W laid out ``[in axes…, out axes…]``, e.g.
``q_dnh``) gains two factors ``A [in…, r]`` and ``B [r, out…]``:

    LoRA:  y = x·W + s · (drop(x)·A)·B,          s = alpha/r  (alpha/√r with rsLoRA)
    DoRA:  y = x·W + (g - 1) ⊙ drop(x)·W + g ⊙ s · (drop(x)·A)·B,
           g = m / ‖W + s·A·B‖  (per output unit; the norm is detached)

exactly as ``peft``'s ``Linear`` and ``DoraLinearLayer`` compute them: PEFT's
``lora_A.weight`` is ``Aᵀ`` flattened to ``[r, in]``, ``lora_B.weight`` is
``Bᵀ`` flattened to ``[out, r]``, and DoRA's ``lora_magnitude_vector`` is ``m``
flattened to ``[out]`` (the norm of each row of HF's ``[out, in]`` weight).

B starts at zero, so a new adapter computes exactly the base model; or, with
PiSSA or OLoRA (``principal_factors``), both factors come from the weight and
the base becomes the residual, which computes the same function. The
unmerged form is what trains: the frozen W then needs no weight-gradient
matmul. ``merge`` folds the factors into W for export.

Parameter names follow the weight: ``q_dnh`` → ``q_lora_a_dr``,
``q_lora_b_rnh``, ``q_lora_m_nh`` (the axis letters end the name; r is the
rank axis, never sharded).

MoE experts (targets ``expert_gate_up``, ``expert_down``) get per-expert
factors with a leading E axis, laid out as PEFT's LoRA on transformers' fused
expert parameters (``target_parameters``, peft's ``ParamWrapper``). Its
``gate_up_proj`` [E, 2F, D] has one A per expert for gate and up together, so
here gate and up share ``gate_up_lora_a_edr`` [E, D, r] and each has its own B
(``gate_lora_b_erf``, ``up_lora_b_erf``: the two halves of PEFT's B); ``down_efd``
has ``down_lora_a_efr`` and ``down_lora_b_erd``. For expert e:
``W_e + s·A_e·B_e``, with the attention's scale s. Both MoE dispatches add the
low-rank path (models/mixtral.py); PEFT's expert LoRA has no dropout and no
DoRA, and neither is offered here.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.models import dense
from jaxsft.peft import nf4
from jaxsft.models.model_config import Adapters

# Base weight name -> (PEFT/HF module name, number of leading input axes).
WEIGHTS: dict[str, tuple[str, int]] = {
    "q_dnh": ("q_proj", 1),
    "k_dkh": ("k_proj", 1),
    "v_dkh": ("v_proj", 1),
    "o_nhd": ("o_proj", 2),
    "gate_df": ("gate_proj", 1),
    "up_df": ("up_proj", 1),
    "down_fd": ("down_proj", 1),
    "kernel_dv": ("lm_head", 1),
}
MODULE_OF = {w: m for w, (m, _) in WEIGHTS.items()}


def split_name(weight: str) -> tuple[str, str, str]:
  """``"o_nhd"`` → (stem ``"o"``, input letters ``"nh"``, output letters ``"d"``)."""
  stem, letters = weight.rsplit("_", 1)
  n_in = WEIGHTS[weight][1]
  return stem, letters[:n_in], letters[n_in:]


def factor_names(weight: str) -> tuple[str, str, str]:
  """Names of the A, B and DoRA magnitude parameters of ``weight``."""
  stem, ins, outs = split_name(weight)
  return f"{stem}_lora_a_{ins}r", f"{stem}_lora_b_r{outs}", f"{stem}_lora_m_{outs}"


def targets(adapters: Adapters | None, weight: str) -> bool:
  return adapters is not None and MODULE_OF.get(weight) in adapters.lora_targets


def principal_factors(w, a, b, n_in: int, adapters: Adapters):
  """PiSSA's and OLoRA's start (PEFT's ``init_lora_weights="pissa"`` / ``"olora"``):
  the factors (A, B) from the weight ``w`` itself and the residual base
  ``w - s·A·B``, so the model computes the same function as before. In PEFT's
  [out, in] layout W': PiSSA takes the top-r singular triplets, W' = V S Uh,
  A' = √(S_r/s)·Uh_r, B' = V_r·√(S_r/s); OLoRA the QR factors, W' = Q R,
  A' = R_r, B' = Q_r. ``a``, ``b``: the factors' current values, for their
  shapes and dtypes (any leading axes, e.g. L, are a batch). Computed in fp32,
  as PEFT does."""
  lead = a.ndim - n_in - 1
  batch, r, s = a.shape[:lead], adapters.lora_rank, adapters.lora_scale
  n_inputs = int(np.prod(a.shape[lead:-1]))
  wt = jnp.swapaxes(w.astype(jnp.float32).reshape(batch + (n_inputs, -1)), -1, -2)  # [.., out, in]
  if min(wt.shape[-2:]) < r:
    raise ValueError(f"LoRA rank {r} exceeds the smallest side of a {tuple(wt.shape[-2:])} "
                     f"weight: {adapters.lora_init} takes its factors from the weight's "
                     f"rank-{r} part; lower peft.rank")
  if adapters.lora_init == "pissa":
    v, sv, uh = jnp.linalg.svd(wt, full_matrices=False)
    root = jnp.sqrt(sv[..., :r] / s)
    a_t, b_t = root[..., :, None] * uh[..., :r, :], v[..., :, :r] * root[..., None, :]
  else:
    q, rr = _qr(wt)
    a_t, b_t = rr[..., :r, :], q[..., :, :r]
  residual = wt - s * jnp.matmul(b_t, a_t)
  return (jnp.swapaxes(a_t, -1, -2).reshape(a.shape).astype(a.dtype),
          jnp.swapaxes(b_t, -1, -2).reshape(b.shape).astype(b.dtype),
          jnp.swapaxes(residual, -1, -2).reshape(w.shape).astype(w.dtype))


def _qr(x):
  """The reduced QR of ``x`` [..., m, n]. On a CPU through numpy on the host:
  XLA:CPU's batched QR (jax 0.10.2) hung now and then inside the compiled
  init (about 1 run in 5 of tests/test_lora_init.py's OLoRA case, no Python
  frame moving); numpy's LAPACK computes the same factors."""
  if jax.default_backend() != "cpu":
    return jnp.linalg.qr(x)
  m, n = x.shape[-2:]
  k = min(m, n)
  shapes = (jax.ShapeDtypeStruct(x.shape[:-2] + (m, k), x.dtype),
            jax.ShapeDtypeStruct(x.shape[:-2] + (k, n), x.dtype))
  return jax.pure_callback(
      lambda v: tuple(np.asarray(t, v.dtype) for t in np.linalg.qr(np.asarray(v))), shapes, x)


def a_init(adapters: Adapters, lead: int = 0):
  """PEFT's init of A: kaiming-uniform (bound 1/√fan_in), or normal(1/r);
  ``lead`` leading axes (experts) are a batch of separate factors."""
  def init(rng, shape, dtype):
    fan_in = int(np.prod(shape[lead:-1]))
    if adapters.lora_init == "gaussian":
      return jax.random.normal(rng, shape, dtype) / adapters.lora_rank
    bound = 1.0 / np.sqrt(fan_in)
    return jax.random.uniform(rng, shape, dtype, -bound, bound)
  return init


def delta(a: jax.Array, b: jax.Array, n_in: int) -> jax.Array:
  """A·B laid out like the weight: [in…, out…] (leading batch axes, e.g. L, kept)."""
  lead = a.ndim - n_in - 1
  a2 = a.reshape(a.shape[:lead] + (-1, a.shape[-1]))
  b2 = b.reshape(b.shape[:lead + 1] + (-1,))
  d = jnp.matmul(a2, b2)
  return d.reshape(a.shape[:-1] + b.shape[lead + 1:])


def weight_norm(w, a, b, scale: float, n_in: int) -> jax.Array:
  """‖W + s·A·B‖ over the input axes (fp32): one value per output unit."""
  lead = a.ndim - n_in - 1
  full = w.astype(jnp.float32) + scale * delta(a.astype(jnp.float32), b.astype(jnp.float32), n_in)
  axes = tuple(range(lead, lead + n_in))
  return jnp.sqrt(jnp.sum(jnp.square(full), axis=axes))


def project(mdl: nn.Module, x: jax.Array, w: jax.Array, weight: str, adapters: Adapters | None,
            dtype, param_dtype) -> jax.Array:
  """``x·w`` for weight ``weight`` (x: [B, T, in…]), plus its LoRA/DoRA term when
  ``adapters`` target it. Called inside ``mdl``'s compact ``__call__``, so the
  factors are parameters of ``mdl``. Dropout applies when ``mdl`` was given a
  ``"dropout"`` rng (training), never otherwise."""
  _, ins, outs = split_name(weight)
  i, o = ins.upper(), outs.upper()
  xd = x.astype(dtype)
  if isinstance(w, nf4.StoredWeight):  # QLoRA's 4-bit frozen base
    base_of = lambda v: w.project(v, len(ins), dtype)  # noqa: E731
  else:
    wd = w.astype(dtype)
    base_of = lambda v: dense.project(v, wd, len(ins))  # noqa: E731
  y = base_of(xd)
  if not targets(adapters, weight):
    return y
  n_in, r = len(ins), adapters.lora_rank
  name_a, name_b, name_m = factor_names(weight)
  a = mdl.param(name_a, a_init(adapters), w.shape[:n_in] + (r,), param_dtype)
  b = mdl.param(name_b, nn.initializers.zeros, (r,) + w.shape[n_in:], param_dtype)
  xin = xd
  if adapters.lora_dropout > 0 and mdl.has_rng("dropout"):
    keep = 1.0 - adapters.lora_dropout
    mask = jax.random.bernoulli(mdl.make_rng("dropout"), keep, xd.shape)
    xin = jnp.where(mask, xd / keep, 0).astype(dtype)
  lora = jnp.einsum(f"BTR,R{o}->BT{o}",
                    jnp.einsum(f"BT{i},{i}R->BTR", xin, a.astype(dtype)), b.astype(dtype))
  s = adapters.lora_scale
  if not adapters.dora:
    return y + s * lora
  m = mdl.param(name_m, lambda *_: weight_norm(w, jnp.zeros(a.shape), jnp.zeros(b.shape), 0.0,
                                               n_in).astype(param_dtype),
                w.shape[n_in:], param_dtype)
  g = (m.astype(jnp.float32) / jax.lax.stop_gradient(weight_norm(w, a, b, s, n_in))).astype(dtype)
  base = y if xin is xd else base_of(xin)
  return y + (g - 1) * base + g * (s * lora)


def merged_weight(w, a, b, m, adapters: Adapters, n_in: int) -> jax.Array:
  """The plain weight that computes what ``project`` computes (without dropout):
  W + s·A·B, and for DoRA its rows rescaled to the learned magnitudes."""
  s = adapters.lora_scale
  full = w.astype(jnp.float32) + s * delta(a.astype(jnp.float32), b.astype(jnp.float32), n_in)
  if adapters.dora:
    lead = a.ndim - n_in - 1
    norm = weight_norm(w, a, b, s, n_in)
    g = m.astype(jnp.float32) / norm
    g = g.reshape(g.shape[:lead] + (1,) * n_in + g.shape[lead:])
    full = full * g
  return full.astype(w.dtype)


# ----------------------------------------------------------------------------- MoE experts

# Expert target -> (transformers' parameter under ``mlp.experts``, A's name,
# {B's name: the expert weight it updates}).
EXPERT_FACTORS: dict[str, tuple[str, str, dict[str, str]]] = {
    "expert_gate_up": ("gate_up_proj", "gate_up_lora_a_edr",
                       {"gate_lora_b_erf": "gate_edf", "up_lora_b_erf": "up_edf"}),
    "expert_down": ("down_proj", "down_lora_a_efr", {"down_lora_b_erd": "down_efd"}),
}


def expert_factors(mdl: nn.Module, adapters: Adapters | None, weights: dict[str, jax.Array],
                   param_dtype) -> dict[str, jax.Array]:
  """The expert LoRA factors ``adapters`` ask for, created as parameters of
  ``mdl`` (the MoE layer) next to ``weights`` (name → [E, in, out]); {} when
  the experts are not targeted. A is initialized per expert as PEFT does (its
  fan-in is one expert's input width), B at zero."""
  out: dict[str, jax.Array] = {}
  if adapters is None:
    return out
  r = adapters.lora_rank
  for target, (_, name_a, bs) in EXPERT_FACTORS.items():
    if target not in adapters.lora_targets:
      continue
    w = weights[next(iter(bs.values()))]
    out[name_a] = mdl.param(name_a, a_init(adapters, lead=1), w.shape[:2] + (r,), param_dtype)
    for name_b, weight in bs.items():
      e, _, f = weights[weight].shape
      out[name_b] = mdl.param(name_b, nn.initializers.zeros, (e, r, f), param_dtype)
  return out


def merge_experts(module: dict, adapters: Adapters) -> dict:
  """``module`` (an MoE layer's parameters, any leading axes) with its expert
  factors folded into the expert weights: W_e + s·A_e·B_e."""
  out = dict(module)
  s = adapters.lora_scale
  for _, name_a, bs in EXPERT_FACTORS.values():
    if name_a not in module:
      continue
    a = out.pop(name_a).astype(jnp.float32)
    for name_b, weight in bs.items():
      w = module[weight]
      ab = jnp.einsum("...ir,...ro->...io", a, out.pop(name_b).astype(jnp.float32))
      out[weight] = (w.astype(jnp.float32) + s * ab).astype(w.dtype)
  return out
