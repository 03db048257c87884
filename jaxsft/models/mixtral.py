"""Mixtral's sparse mixture-of-experts feed-forward and its load-balancing loss.

Routing follows transformers: softmax over all experts, keep the top-k, and
renormalize the kept weights (= a softmax over the selected logits). The
auxiliary loss is transformers' ``load_balancing_loss_func``: over the tokens of
all layers together, E · Σ_e (fraction of routing slots sent to e) ·
(mean router probability of e), counting only non-padding tokens.

This is the dense reference dispatch (every expert sees every token, weighted
by a mostly-zero combine matrix): exact, and cheap at small shapes.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsft.models.model_config import ModelConfig


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

    xd = x.astype(dt)
    router_logits = jnp.einsum("BTD,DE->BTE", xd, router.astype(dt)).astype(jnp.float32)
    probs = jax.nn.softmax(router_logits, axis=-1)
    top_w, top_i = jax.lax.top_k(probs, k)
    top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
    chosen = jax.nn.one_hot(top_i, e, dtype=jnp.float32)  # [B,T,k,E]
    combine = jnp.einsum("BTk,BTkE->BTE", top_w, chosen).astype(dt)

    gate = jnp.einsum("BTD,EDF->BTEF", xd, w_gate.astype(dt))
    up = jnp.einsum("BTD,EDF->BTEF", xd, w_up.astype(dt))
    y = jnp.einsum("BTEF,EFD,BTE->BTD", jax.nn.silu(gate) * up, w_down.astype(dt), combine)

    valid = token_valid.astype(jnp.float32)[..., None]
    stats = {
        "slot_counts": jnp.einsum("BTkE,BT->kE", chosen, valid[..., 0]),  # [k, E]
        "prob_sums": jnp.sum(probs * valid, axis=(0, 1)),  # [E]
    }
    return y, stats


def aux_outputs(cfg: ModelConfig, stats, segment_ids) -> dict:
  """The load-balancing loss (unscaled, as transformers' ``aux_loss``) and the
  fraction of routing slots each expert received, from stacked per-layer stats."""
  num_tokens = jnp.maximum(jnp.sum(segment_ids != 0), 1) * cfg.num_layers
  tokens_per_expert = jnp.sum(stats["slot_counts"], axis=0) / num_tokens  # [k, E]
  router_prob_per_expert = jnp.sum(stats["prob_sums"], axis=0) / num_tokens  # [E]
  aux_loss = cfg.num_experts * jnp.sum(tokens_per_expert * router_prob_per_expert[None])
  return {
      "aux_loss": aux_loss,
      "expert_fractions": jnp.sum(tokens_per_expert, axis=0) / cfg.num_experts_per_tok,
  }
