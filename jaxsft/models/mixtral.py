"""Mixtral's sparse mixture-of-experts feed-forward and its router losses.

Axis legend: B batch, T time, D model width, F ffn width, E experts, k routing
slots per token (``num_experts_per_tok``), N = B·T flattened tokens, M = N·k
(token, slot) assignments.

Routing follows transformers: softmax over all experts, keep the top-k, and
renormalize the kept weights (= a softmax over the selected logits). Padding
tokens (segment 0) are routed like any other token, as in transformers, and
computed too except by the bucketed and grouped dispatches (their outputs
are never used); the router statistics count only real tokens.

Four dispatches compute the same function (``ModelConfig.moe_dispatch``):

* ``dense``: every expert runs on every token and a mostly-zero combine matrix
  keeps the chosen k — E/k times the needed FLOPs, but plain einsums that XLA
  fuses well; the reference.
* ``bucketed``: each expert gets a bucket of C = capacity_factor · N·k/E rows
  (``moe_capacity_factor``, default 2); a token's assignment takes the next
  free row of its expert's bucket (a cumulative count, no sort), the buckets
  [E,C,D] go through batched einsums and a gather brings each assignment's
  row back: capacity_factor · k/E of the dense dispatch's expert FLOPs (half
  of it at E=8, k=2, factor 2). Exact, never dropping: when an expert gets
  more than C assignments, that call runs with buckets of 1.5C, 2.25C, ... up to N
  rows, the smallest that fits (``lax.switch``; the share of such calls is
  the ``moe_bucket_overflow`` metric, a hint to raise the factor). Padding
  tokens (segment 0) skip the experts: their MoE output is 0 (it is never
  used), so a padded batch's alike pad tokens cannot crowd one expert.
* ``dropless``: the M assignments are sorted by expert and each expert's rows
  go through its weights with grouped matmuls (``jax.lax.ragged_dot``); no
  token is dropped and no capacity factor is needed.
* ``grouped``: dropless's sort, then the groups go through in row tiles, one
  (tile, expert) pair per step of a ``lax.scan`` (``_tiled_expert_ffn``): the
  routed rows' FLOPs plus at most E − 1 tiles, with no capacity factor and
  no grouped-GEMM kernel. Padding tokens skip the experts, as in bucketed.
* ``auto``: ``dropless`` on TPU, where ``ragged_dot`` lowers to a grouped
  matmul; ``grouped`` on CPU; ``bucketed`` on GPU (grouped is not yet
  measured there). Off TPU XLA rewrites ``ragged_dot`` into a dense product
  over a group-masked copy of the rows for every group (JAX's CPU lowering;
  XLA's RaggedDotRewriter on NVIDIA unless its experimental cuDNN fusion is
  on), so dropless does k times the dense dispatch's FLOPs: measured on CPU
  in docs/BENCHMARKS.md. ``_expert_ffn`` is the one place a grouped-GEMM
  kernel goes when one is available there.

On a mesh, bucketed, dropless and grouped run under ``shard_map``
(``_sharded``): each device handles only its own tokens' routing, the tokens
of an expert-parallel group are gathered, each device computes its local
experts, and a reduce-scatter returns every token's sum.

With LoRA on the experts (``expert_gate_up``/``expert_down``, see
jaxsft/peft/lora.py) every dispatch adds the per-expert low-rank path: two
more einsums (dense, bucketed) or two more ``ragged_dot``s with A [E,D,r] and
B [E,r,F] over the same groups (dropless); the factors shard their E axis
like the weights.

The auxiliary loss is transformers' ``load_balancing_loss_func``: over the
tokens of all layers together, E · Σ_e (fraction of routing slots sent to e) ·
(mean router probability of e), counting only non-padding tokens. The z-loss
(ST-MoE) is the mean over real tokens and layers of logsumexp(router logits)².
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxsft import sharding as sharding_lib
from jaxsft.models import elementwise
from jaxsft.models.model_config import ModelConfig
from jaxsft.peft import lora as lora_lib


def resolve_dispatch(cfg: ModelConfig) -> str:
  """The dispatch ``cfg.moe_dispatch`` means on the current backend."""
  if cfg.moe_dispatch != "auto":
    return cfg.moe_dispatch
  # Only TPU lowers ragged_dot to a grouped matmul (see the module docstring);
  # grouped is measured faster than bucketed on CPU only (docs/BENCHMARKS.md).
  return {"tpu": "dropless", "cpu": "grouped"}.get(sharding_lib.compute_platform(), "bucketed")


class MoE(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, token_valid):
    """x [B,T,D], token_valid [B,T] → (y [B,T,D], router statistics of this layer)."""
    cfg = self.cfg
    d, f, e, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.num_experts_per_tok
    pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    init = nn.initializers.normal(stddev=cfg.initializer_range)
    router = self.param("router_de", init, (d, e), pdt)
    w_gate = self.param("gate_edf", init, (e, d, f), pdt)
    w_up = self.param("up_edf", init, (e, d, f), pdt)
    w_down = self.param("down_efd", init, (e, f, d), pdt)
    lora = lora_lib.expert_factors(
        self, cfg.adapters, {"gate_edf": w_gate, "up_edf": w_up, "down_efd": w_down}, pdt)
    lora = {name: v.astype(dt) for name, v in lora.items()}
    scale = cfg.adapters.lora_scale if lora else 0.0

    xd = x.astype(dt)
    router_logits = jnp.einsum("BTD,DE->BTE", xd, router.astype(dt)).astype(jnp.float32)
    probs = jax.nn.softmax(router_logits, axis=-1)
    top_w, top_i = jax.lax.top_k(probs, k)
    top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
    chosen = jax.nn.one_hot(top_i, e, dtype=jnp.float32)  # [B,T,k,E]

    weights = (w_gate.astype(dt), w_up.astype(dt), w_down.astype(dt))
    dispatch = resolve_dispatch(cfg)
    overflow = None
    if dispatch == "dense":
      y = _dense(xd, top_w, chosen, *weights, lora, scale)
    elif dispatch == "bucketed":
      local = functools.partial(_bucketed_local, capacity_factor=cfg.moe_capacity_factor,
                                num_experts=e)
      y, overflow = _routed(local, xd, token_valid, top_i, top_w, *weights, lora, scale)
    elif dispatch == "grouped":
      local = functools.partial(_dropless_local, ffn=_tiled_expert_ffn, skip_padding=True)
      y, _ = _routed(local, xd, token_valid, top_i, top_w, *weights, lora, scale)
    else:
      y, _ = _routed(_dropless_local, xd, token_valid, top_i, top_w, *weights, lora, scale)

    valid = token_valid.astype(jnp.float32)
    stats = {
        "slot_counts": jnp.einsum("BTkE,BT->kE", chosen, valid),  # [k, E]
        "prob_sums": jnp.sum(probs * valid[..., None], axis=(0, 1)),  # [E]
        "z_sum": jnp.sum(jnp.square(jax.nn.logsumexp(router_logits, axis=-1)) * valid),
    }
    if overflow is not None:
      stats["bucket_overflow"] = overflow
    return y, stats


def _dense(x, top_w, chosen, w_gate, w_up, w_down, lora=None, scale=0.0):
  """The reference: every expert on every token, combined by a [B,T,E] matrix;
  ``lora`` holds expert LoRA factors by name (``lora_lib.EXPERT_FACTORS``)."""
  lora = lora or {}
  combine = jnp.einsum("BTk,BTkE->BTE", top_w, chosen).astype(x.dtype)
  h = _swiglu_hidden(x, w_gate, w_up, lora, scale, "BTD", "BTEF")
  y = jnp.einsum("BTEF,EFD,BTE->BTD", h, w_down, combine)
  if "down_lora_a_efr" in lora:
    ha = jnp.einsum("BTEF,EFR->BTER", h, lora["down_lora_a_efr"])
    y = y + scale * jnp.einsum("BTER,ERD,BTE->BTD", ha, lora["down_lora_b_erd"], combine)
  return y


def _swiglu_hidden(x, w_gate, w_up, lora, scale, x_axes: str, h_axes: str):
  """silu(x·W_gate) ⊙ (x·W_up) for every expert, with the expert LoRA path
  when ``lora`` has it; ``x_axes``/``h_axes`` name x's and the result's axes
  in einsum letters ("BTD" → "BTEF" for dense, "ECD" → "ECF" for buckets)."""
  xa_axes = h_axes[:-1] + "R"
  gate = jnp.einsum(f"{x_axes},EDF->{h_axes}", x, w_gate)
  up = jnp.einsum(f"{x_axes},EDF->{h_axes}", x, w_up)
  if "gate_up_lora_a_edr" in lora:
    xa = jnp.einsum(f"{x_axes},EDR->{xa_axes}", x, lora["gate_up_lora_a_edr"])
    gate = gate + scale * jnp.einsum(f"{xa_axes},ERF->{h_axes}", xa, lora["gate_lora_b_erf"])
    up = up + scale * jnp.einsum(f"{xa_axes},ERF->{h_axes}", xa, lora["up_lora_b_erf"])
  return elementwise.swiglu(gate, up)


def _expert_ffn(x_sorted, group_sizes, w_gate, w_up, w_down, lora=None, scale=0.0):
  """SwiGLU of rows grouped by expert: rows [Σ_{j<e} g_j, Σ_{j≤e} g_j) of
  ``x_sorted`` [M,D] use expert e's weights ([E,D,F], [E,D,F], [E,F,D]);
  ``group_sizes`` [E] int32. Rows past Σ g are undefined (callers mask them).
  ``lora``: expert LoRA factors by name, each one more ``ragged_dot`` over the
  same groups (A [E,in,r], then B [E,r,out])."""
  lora = lora or {}
  rd = lambda a, w: jax.lax.ragged_dot(a, w, group_sizes)  # noqa: E731
  gate, up = rd(x_sorted, w_gate), rd(x_sorted, w_up)
  if "gate_up_lora_a_edr" in lora:
    xa = rd(x_sorted, lora["gate_up_lora_a_edr"])
    gate = gate + scale * rd(xa, lora["gate_lora_b_erf"])
    up = up + scale * rd(xa, lora["up_lora_b_erf"])
  h = elementwise.swiglu(gate, up)
  y = rd(h, w_down)
  if "down_lora_a_efr" in lora:
    y = y + scale * rd(rd(h, lora["down_lora_a_efr"]), lora["down_lora_b_erd"])
  return y


def _tiled_expert_ffn(x_sorted, group_sizes, w_gate, w_up, w_down, lora=None, scale=0.0):
  """``_expert_ffn`` at the cost of the routed rows, where ``ragged_dot`` has
  no grouped kernel (CPU, GPU): the rows go through in tiles of ``_tile(M, E)``
  rows, one (tile, expert) pair at a time in a ``lax.scan``, each pair one
  ``_bucket_ffn`` of the tile with that expert's weights, masked to the
  expert's rows. A tile spanning a group boundary runs once per expert in it,
  so there are at most ⌈M/tile⌉ + E − 1 pairs: the groups' FLOPs plus at
  most E − 1 tiles (rows past Σ g are in no group and computed by no pair).
  Each row is computed by exactly one pair, so the result is exact; autodiff
  accumulates each pair's weight gradient into its expert's slice in place."""
  lora = lora or {}
  m, e = x_sorted.shape[0], w_gate.shape[0]
  tile = _tile(m, e)
  n_tiles = -(-m // tile)
  x = jnp.pad(x_sorted, ((0, n_tiles * tile - m), (0, 0)))
  ends = jnp.cumsum(group_sizes)
  row_expert = jnp.searchsorted(ends, jnp.arange(n_tiles * tile), side="right")  # e: no group
  first = row_expert[::tile]
  last = jnp.minimum(row_expert[tile - 1::tile], e - 1)
  counts = jnp.where(first < e, last - first + 1, 0)  # experts each tile holds rows of
  starts = jnp.cumsum(counts) - counts
  pair = jnp.arange(n_tiles + e - 1)
  pair_tile = jnp.minimum(jnp.searchsorted(starts + counts, pair, side="right"), n_tiles - 1)
  live = pair < jnp.sum(counts)
  # -1: a pair past the last live one (the scan runs them all) matches no row.
  pair_expert = jnp.where(live, first[pair_tile] + pair - starts[pair_tile], -1)

  def body(_, pair):
    t, ex = pair
    rows = jax.lax.dynamic_slice_in_dim(x, t * tile, tile)
    mine = jax.lax.dynamic_slice_in_dim(row_expert, t * tile, tile) == ex
    one = lambda w: jax.lax.dynamic_slice_in_dim(w, jnp.maximum(ex, 0), 1)  # noqa: E731
    y = _bucket_ffn(rows[None], one(w_gate), one(w_up), one(w_down),
                    {name: one(v) for name, v in lora.items()}, scale)[0]
    return None, jnp.where(mine[:, None], y, 0)

  # Each pair's tile comes out of the scan (no carried output: under
  # shard_map a carry would have to be typed as varying over the mesh axes
  # up front); the pairs of one tile add their disjoint rows: exact.
  _, ys = jax.lax.scan(body, None, (pair_tile, pair_expert))
  out = jnp.zeros((n_tiles,) + ys.shape[1:], ys.dtype).at[pair_tile].add(ys)
  return out.reshape(n_tiles * tile, -1)[:m]


def _tile(m: int, e: int) -> int:
  """Rows per tile of ``_tiled_expert_ffn`` for M rows over E experts: a
  quarter of an even group, a multiple of 8, between 8 and ``MAX_TILE``.
  Fewer, bigger tiles won on CPU (each scan step has a fixed cost) though
  the E − 1 boundary tiles then add up to a quarter of the FLOPs (the tile
  sweep in docs/BENCHMARKS.md, grouped vs bucketed)."""
  return max(8, min(MAX_TILE, -(-m // (4 * e)) // 8 * 8))


# Big enough that each tile's matmuls run efficiently on a GPU; bigger ones
# would waste more rows where a tile spans two experts.
MAX_TILE = 512


def _dropless_local(x, valid, top_i, top_w, w_gate, w_up, w_down, lora=None, scale=0.0,
                    first_expert=0, *, ffn=_expert_ffn, skip_padding=False):
  """Sum over a token's slots of weight · expert(token), for the experts held
  here: ``w_*`` (and the LoRA factors in ``lora``) hold experts
  [first_expert, first_expert + E_local).

  x [N,D], valid [N], top_i/top_w [N,k] → ([N,D], 0.0: no buckets to
  overflow). Assignments to other experts sort last, into rows past the
  groups, and contribute nothing; so do padding tokens' with
  ``skip_padding`` (their output is then 0, never used), else padding is
  computed like any token. ``ffn``: ``_expert_ffn`` (dropless) or
  ``_tiled_expert_ffn`` (grouped).
  """
  k = top_i.shape[1]
  e_local = w_gate.shape[0]
  local = top_i.reshape(-1) - first_expert  # [M]
  here = (local >= 0) & (local < e_local)
  if skip_padding:
    here = here & jnp.repeat(valid, k)
  key = jnp.where(here, local, e_local)
  order = jnp.argsort(key, stable=True)  # assignment index of each sorted row
  group_sizes = jnp.sum(key[:, None] == jnp.arange(e_local)[None], axis=0, dtype=jnp.int32)
  y_sorted = ffn(x[order // k], group_sizes, w_gate, w_up, w_down, lora, scale)
  # Unsort by gathering (deterministic; a scatter-add would not be on GPU).
  unsort = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
  return _combine_slots(y_sorted[unsort], here, top_w), jnp.zeros((), jnp.float32)


def _combine_slots(y, here, top_w):
  """Each token's output: its k slots' expert outputs y [N·k, D] (token-major),
  weighted by ``top_w`` [N,k]; slots not computed here (``here`` [N·k] false)
  add nothing."""
  y = jnp.where(here[:, None], y, 0).reshape(*top_w.shape, -1)
  return jnp.einsum("NkD,Nk->ND", y, top_w.astype(y.dtype))


def bucket_capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
  """Rows per expert bucket for ``num_tokens`` tokens when routing is within
  ``capacity_factor`` of even: that multiple of an even share of the N·k
  assignments, rounded up to a multiple of 8, and never more than N (a
  token's k experts are distinct, so no expert gets more)."""
  share = math.ceil(capacity_factor * num_tokens * k / num_experts)
  return min(num_tokens, -(-share // 8) * 8)


def _bucket_ffn(xb, w_gate, w_up, w_down, lora, scale):
  """SwiGLU of every expert on its own bucket: xb [E,C,D] → [E,C,D] (expert
  LoRA factors in ``lora`` as in ``_dense``)."""
  h = _swiglu_hidden(xb, w_gate, w_up, lora, scale, "ECD", "ECF")
  y = jnp.einsum("ECF,EFD->ECD", h, w_down)
  if "down_lora_a_efr" in lora:
    ha = jnp.einsum("ECF,EFR->ECR", h, lora["down_lora_a_efr"])
    y = y + scale * jnp.einsum("ECR,ERD->ECD", ha, lora["down_lora_b_erd"])
  return y


def _bucketed_local(x, valid, top_i, top_w, w_gate, w_up, w_down, lora=None, scale=0.0,
                    first_expert=0, *, capacity_factor, num_experts):
  """Bucketed dispatch for the experts held here (``w_*`` hold experts
  [first_expert, first_expert + E_local) of ``num_experts``).

  x [N,D], valid [N] (padding skips the experts), top_i/top_w [N,k] →
  ([N,D], 1.0 if an expert overflowed the capacity_factor bucket and a bigger
  one ran, else 0.0).
  """
  lora = lora or {}
  n, k = top_i.shape
  e_local = w_gate.shape[0]
  local = top_i.reshape(-1) - first_expert  # [M]
  here = jnp.repeat(valid, k) & (local >= 0) & (local < e_local)
  # Row of each assignment in its expert's bucket: how many assignments to the
  # same expert come before it (token-major order, as GShard's dispatch).
  onehot = (local[:, None] == jnp.arange(e_local)[None]) & here[:, None]  # [M, E_local]
  row = jnp.sum((jnp.cumsum(onehot, axis=0, dtype=jnp.int32) - 1) * onehot, axis=1)
  most = jnp.max(jnp.sum(onehot, axis=0, dtype=jnp.int32))

  def bucketed(cap, x, top_w, w_gate, w_up, w_down, lora):
    slot = jnp.where(here, local * cap + row, e_local * cap)  # past the end: nowhere
    # Token of each bucket row; empty rows read an appended zero row.
    src = jnp.full((e_local * cap,), n, jnp.int32).at[slot].set(
        jnp.arange(n * k, dtype=jnp.int32) // k, mode="drop", unique_indices=True)
    xb = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])[src]
    yb = _bucket_ffn(xb.reshape(e_local, cap, -1), w_gate, w_up, w_down, lora, scale)
    return _combine_slots(yb.reshape(e_local * cap, -1)[jnp.minimum(slot, e_local * cap - 1)],
                          here, top_w)

  # Bucket sizes to choose from at run time: the capacity factor's, then 1.5
  # times bigger each (rounded up to 8) until every token fits (N rows: no
  # expert can get more), so nothing is ever dropped. Steps of 1.5 rather
  # than 2 ran the CPU bench, where a quarter of the calls overflow, 15%
  # faster at the same compile time. The bigger ones are rematerialized:
  # under autodiff a switch keeps every branch's residuals, and those would
  # be dense-sized.
  caps = [bucket_capacity(n, k, num_experts, capacity_factor)]
  while caps[-1] < n:
    caps.append(min(n, -(-3 * caps[-1] // 16) * 8))
  branches = [functools.partial(bucketed, cap) for cap in caps]
  branches[1:] = [jax.checkpoint(b) for b in branches[1:]]
  args = (x, top_w, w_gate, w_up, w_down, lora)
  if len(caps) == 1:
    return branches[0](*args), jnp.zeros((), jnp.float32)
  index = jnp.sum(jnp.asarray(caps[:-1]) < most)  # the smallest bucket that fits
  return jax.lax.switch(index, branches, *args), (index > 0).astype(jnp.float32)


def _routed(local_fn, x, valid, top_i, top_w, w_gate, w_up, w_down, lora=None, scale=0.0):
  """x [B,T,D] through ``local_fn`` (``_bucketed_local`` or ``_dropless_local``,
  plain or tiled) → (y [B,T,D], bucket-overflow flag); under a mesh (``jax.set_mesh``) each
  device routes its own tokens (``_sharded``)."""
  b, t, d = x.shape
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.size > 1:
    return _sharded(mesh, local_fn, x, valid, top_i, top_w, w_gate, w_up, w_down, lora or {},
                    scale)
  y, overflow = local_fn(x.reshape(b * t, d), valid.reshape(b * t), top_i.reshape(b * t, -1),
                         top_w.reshape(b * t, -1), w_gate, w_up, w_down, lora, scale)
  return y.reshape(b, t, d), overflow


def _axes(entry) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _sharded(mesh, local_fn, x, valid, top_i, top_w, w_gate, w_up, w_down, lora, scale):
  """Expert-parallel bucketed or dropless dispatch (``local_fn``) under ``shard_map``.

  Tokens stay sharded by rows over the batch axes (data, fsdp, expert: the
  trainer's batch sharding). Expert weights keep their sharding from the rule
  table (E over ``expert``, D over ``fsdp``, F over ``tensor``): inside, D is
  gathered (as FSDP does for any weight), the tokens of the devices of one
  expert group are gathered, each device runs its E/ep local experts on them,
  and a reduce-scatter over ``expert`` (plus a sum over ``tensor`` for the
  F-sharded partial products) hands every device the full output of its own
  rows. Communication per layer: an all-gather and a reduce-scatter of the
  group's activations, the same volume as the all-to-all pair of GShard for
  k = ep, with static shapes and nothing dropped. Each device picks the
  bucket size its own experts need (no collective runs inside the branches);
  the overflow flag returned is the max over devices. Expert LoRA factors
  (``lora``) are sharded and gathered by the same rules as the weights (E over
  ``expert``; F over ``tensor`` stays sharded: the products it feeds are
  partial sums, summed over ``tensor`` with the rest).
  """
  b = x.shape[0]
  batch = [a for a in ("data", "fsdp", "expert") if mesh.shape.get(a, 1) > 1]
  while batch and b % _size(mesh, batch):
    batch.pop()  # rows that do not split evenly stay replicated over the rest
  row_spec = P(tuple(batch) or None, None, None)
  specs = [sharding_lib.spec_for(("moe", name), w.shape, mesh)
           for name, w in (("gate_edf", w_gate), ("up_edf", w_up), ("down_efd", w_down))]
  lora_specs = {name: sharding_lib.spec_for(("moe", name), v.shape, mesh)
                for name, v in lora.items()}
  expert_axes = _axes(specs[0][0])
  ffn_axes = _axes(specs[0][2])
  assert _axes(specs[1][2]) == _axes(specs[2][1]) == ffn_axes, specs

  def gathered_outside(spec):
    # Over a mesh axis the rows are not split on (a batch that does not divide,
    # e.g. decoding one prompt), every device computes the same output: its
    # weight shards are gathered on the way in, so shard_map sees the output
    # as replicated there (a gather inside would leave it typed as varying).
    entries = list(spec)
    for dim, entry in enumerate(entries):
      axes = _axes(entry)
      if dim and axes and axes != ffn_axes:
        kept = tuple(a for a in axes if a in batch)
        entries[dim] = kept[0] if len(kept) == 1 else (kept or None)
    return P(*entries)

  specs = [gathered_outside(spec) for spec in specs]
  lora_specs = {name: gathered_outside(spec) for name, spec in lora_specs.items()}
  gather_experts = "expert" in expert_axes and "expert" in batch
  e_local = w_gate.shape[0] // _size(mesh, expert_axes)

  def gather(w, spec):
    for dim, entry in enumerate(spec):
      axes = _axes(entry)
      if dim and axes and axes != ffn_axes:  # FSDP: gather the full weight
        w = jax.lax.all_gather(w, axes, axis=dim, tiled=True)
    return w

  def body(x, valid, top_i, top_w, w_gate, w_up, w_down, lora):
    gathered = [gather(w, spec) for w, spec in zip((w_gate, w_up, w_down), specs)]
    lora = {name: gather(v, lora_specs[name]) for name, v in lora.items()}
    if gather_experts:  # the expert group's tokens, for this device's experts
      x, valid, top_i, top_w = (jax.lax.all_gather(a, "expert", axis=0, tiled=True)
                                for a in (x, valid, top_i, top_w))
    first = 0
    if expert_axes:
      first = jax.lax.axis_index(expert_axes) * e_local
    bb, t, d = x.shape
    y, overflow = local_fn(x.reshape(bb * t, d), valid.reshape(bb * t),
                           top_i.reshape(bb * t, -1), top_w.reshape(bb * t, -1), *gathered,
                           lora, scale, first_expert=first)
    y = y.reshape(bb, t, d)
    if gather_experts:
      y = jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True)
    elif expert_axes:
      y = jax.lax.psum(y, expert_axes)
    if ffn_axes:
      y = jax.lax.psum(y, ffn_axes)
    # Each device's own overflow, maxed outside: a pmax over every mesh axis
    # is refused by newer JAX (0.11) where the value is already invariant
    # (e.g. over tensor), and which axes those are depends on the specs.
    return y, overflow[None]

  y, overflow = jax.shard_map(
      body, mesh=mesh,
      in_specs=(row_spec, P(*row_spec[:2])) + (row_spec,) * 2 + tuple(specs) + (lora_specs,),
      out_specs=(row_spec, P(tuple(mesh.axis_names))))(
          x, valid, top_i, top_w, w_gate, w_up, w_down, lora)
  return y, jnp.max(overflow)


def _size(mesh, axes) -> int:
  n = 1
  for a in axes:
    n *= mesh.shape[a]
  return n


def bucket_hint(cfg: ModelConfig, overflow: Sequence[float],
                fraction_max: Sequence[float]) -> str | None:
  """What to tell a user whose bucketed MoE layers kept overflowing, from a
  stage's logged ``moe_bucket_overflow`` and ``expert_fraction_max`` values;
  None when they mostly fit (at most a quarter of the calls overflowed) or
  another dispatch ran.

  The busiest (layer, expert) pair's share of the routing slots times E is
  how many even shares it got; a capacity factor of that much, rounded up to
  a quarter, holds it (real tokens only: with padding, a bit less suffices).
  """
  if resolve_dispatch(cfg) != "bucketed" or not overflow:
    return None
  share = sum(overflow) / len(overflow)
  if share <= 0.25:
    return None
  busiest = max(fraction_max) * cfg.num_experts
  suggest = max(math.ceil(busiest * 4) / 4, cfg.moe_capacity_factor + 0.25)
  return (f"{share:.0%} of the MoE layer calls overflowed the bucketed dispatch's first "
          f"buckets (model.moe_capacity_factor={cfg.moe_capacity_factor:g}) and ran bigger, "
          f"slower ones (the result is the same); the busiest expert got up to "
          f"{busiest:.2f}x an even share of the routing slots: "
          f"--config.model.moe_capacity_factor={suggest:g} would hold it (or, if the "
          f"router is collapsing, see expert_fraction_max and router_aux_loss_coef)")


def aux_outputs(cfg: ModelConfig, stats, segment_ids) -> dict:
  """Router losses and statistics from stacked per-layer stats: the
  load-balancing loss (unscaled, as transformers' ``aux_loss``), the z-loss,
  the fraction of routing slots each expert received over all layers
  (``expert_fractions`` [E]) and per layer (``layer_expert_fractions`` [L,E]:
  a collapse in one layer shows here even when the pooled fractions look even),
  and the fraction of layer calls where an expert overflowed the bucketed
  dispatch's capacity-factor bucket (``moe_bucket_overflow``; 0 for the other
  dispatches)."""
  tokens = jnp.maximum(jnp.sum(segment_ids != 0), 1)
  num_tokens = tokens * cfg.num_layers
  tokens_per_expert = jnp.sum(stats["slot_counts"], axis=0) / num_tokens  # [k, E]
  router_prob_per_expert = jnp.sum(stats["prob_sums"], axis=0) / num_tokens  # [E]
  aux_loss = cfg.num_experts * jnp.sum(tokens_per_expert * router_prob_per_expert[None])
  k = cfg.num_experts_per_tok
  return {
      "aux_loss": aux_loss,
      "z_loss": jnp.sum(stats["z_sum"]) / num_tokens,
      "expert_fractions": jnp.sum(tokens_per_expert, axis=0) / k,
      "layer_expert_fractions": jnp.sum(stats["slot_counts"], axis=1) / (tokens * k),
      "moe_bucket_overflow": (jnp.mean(stats["bucket_overflow"]) if "bucket_overflow" in stats
                              else jnp.zeros((), jnp.float32)),
  }
