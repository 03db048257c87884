"""The decoder family: Llama 2/3, Yi, Mistral, Qwen1.5/Qwen2, and (with an MoE
feed-forward from ``mixtral.py``) Mixtral.

Axis legend: B batch, T time, S cache time, D model width, N query heads,
K kv heads, H head dim, F ffn width, V vocab, E experts, L layers.
Parameter names end in their axes (``q_dnh``); layers are stacked on a leading
L axis and run under ``nn.scan``, so compile time does not grow with depth.

The public surface is functional: ``init_params``, ``abstract_params``,
``forward`` (logits), ``hidden_states`` and ``unembedding`` (for chunked
losses), and ``decode_step`` over an explicit KV cache (``init_cache``).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxsft.models import attention as attn_lib
from jaxsft.models import mixtral
from jaxsft.models.model_config import ModelConfig

_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
}


def _dense_init(cfg: ModelConfig):
  return nn.initializers.normal(stddev=cfg.initializer_range)


class RMSNorm(nn.Module):
  """RMSNorm computed in fp32, scaled in the input dtype (as transformers does)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale_d", nn.initializers.ones, (self.cfg.hidden_size,),
                       jnp.dtype(self.cfg.param_dtype))
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.rms_norm_eps)
    return scale.astype(x.dtype) * x32.astype(x.dtype)


def _proj(x, w, spec, dtype):
  return jnp.einsum(spec, x.astype(dtype), w.astype(dtype))


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, cos, sin, segment_ids, positions, layer_cache, decode):
    cfg = self.cfg
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    init = _dense_init(cfg)
    q = _proj(x, self.param("q_dnh", init, (d, n, h), pdt), "BTD,DNH->BTNH", dt)
    key = _proj(x, self.param("k_dkh", init, (d, k, h), pdt), "BTD,DKH->BTKH", dt)
    val = _proj(x, self.param("v_dkh", init, (d, k, h), pdt), "BTD,DKH->BTKH", dt)
    if cfg.qkv_bias:
      q = q + self.param("q_bias_nh", nn.initializers.zeros, (n, h), pdt).astype(dt)
      key = key + self.param("k_bias_kh", nn.initializers.zeros, (k, h), pdt).astype(dt)
      val = val + self.param("v_bias_kh", nn.initializers.zeros, (k, h), pdt).astype(dt)
    q = attn_lib.apply_rope(q, cos, sin)
    key = attn_lib.apply_rope(key, cos, sin)

    if decode is None:
      out = attn_lib.dot_product_attention(
          q, key, val, segment_ids=segment_ids, positions=positions,
          sliding_window=cfg.sliding_window, impl=cfg.attention)
      new_cache = None
    else:
      k_cache, v_cache = layer_cache
      index = decode["index"]
      k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, key.astype(k_cache.dtype), index, 1)
      v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, val.astype(v_cache.dtype), index, 1)
      out = attn_lib.cached_attention(
          q, k_cache.astype(dt), v_cache.astype(dt), q_slots=decode["q_slots"],
          q_positions=positions, k_positions=decode["positions"], k_valid=decode["valid"],
          sliding_window=cfg.sliding_window)
      new_cache = (k_cache, v_cache)
    out = checkpoint_name(out, "attention_out")
    y = _proj(out, self.param("o_nhd", init, (n, h, d), pdt), "BTNH,NHD->BTD", dt)
    if cfg.o_bias:
      y = y + self.param("o_bias_d", nn.initializers.zeros, (d,), pdt).astype(dt)
    return y, new_cache


class MLP(nn.Module):
  """SwiGLU feed-forward."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    d, f = cfg.hidden_size, cfg.intermediate_size
    pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    init = _dense_init(cfg)
    gate = _proj(x, self.param("gate_df", init, (d, f), pdt), "BTD,DF->BTF", dt)
    up = _proj(x, self.param("up_df", init, (d, f), pdt), "BTD,DF->BTF", dt)
    if cfg.mlp_bias:
      gate = gate + self.param("gate_bias_f", nn.initializers.zeros, (f,), pdt).astype(dt)
      up = up + self.param("up_bias_f", nn.initializers.zeros, (f,), pdt).astype(dt)
    y = _proj(jax.nn.silu(gate) * up, self.param("down_fd", init, (f, d), pdt), "BTF,FD->BTD", dt)
    if cfg.mlp_bias:
      y = y + self.param("down_bias_d", nn.initializers.zeros, (d,), pdt).astype(dt)
    return y


class DecoderLayer(nn.Module):
  """One pre-norm block; the scan body (carry = hidden states)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, cos, sin, segment_ids, positions, decode, layer_cache):
    cfg = self.cfg
    h, new_cache = Attention(cfg, name="attn")(
        RMSNorm(cfg, name="attn_norm")(x), cos, sin, segment_ids, positions, layer_cache, decode)
    x = x + h
    normed = RMSNorm(cfg, name="mlp_norm")(x)
    if cfg.is_moe:
      valid = jnp.ones(x.shape[:2], bool) if segment_ids is None else segment_ids != 0
      h, stats = mixtral.MoE(cfg, name="moe")(normed, valid)
    else:
      h, stats = MLP(cfg, name="mlp")(normed), None
    return x + h, (new_cache, stats)


class Embed(nn.Module):
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embedding_vd = self.param("embedding_vd", _dense_init(cfg),
                                   (cfg.vocab_size, cfg.hidden_size), jnp.dtype(cfg.param_dtype))


class LMHead(nn.Module):
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.kernel_dv = self.param("kernel_dv", _dense_init(cfg),
                                (cfg.hidden_size, cfg.vocab_size), jnp.dtype(cfg.param_dtype))


class Transformer(nn.Module):
  """Embeddings → scanned decoder layers → final norm (→ logits via ``logits``)."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    layer = DecoderLayer
    if cfg.remat != "none":
      layer = nn.remat(layer, policy=_REMAT[cfg.remat], prevent_cse=False)
    self.layers = nn.scan(
        layer, variable_axes={"params": 0}, split_rngs={"params": True},
        in_axes=(nn.broadcast,) * 5 + (0,), length=cfg.num_layers)(cfg)
    self.embed = Embed(cfg)
    self.final_norm = RMSNorm(cfg)
    if not cfg.tie_word_embeddings:
      self.lm_head = LMHead(cfg)

  def __call__(self, tokens, positions, segment_ids, decode=None, cache=None):
    """Final hidden states [B,T,D], the updated per-layer (k, v) cache, MoE stats."""
    cfg = self.cfg
    x = self.embed.embedding_vd[tokens].astype(jnp.dtype(cfg.dtype))
    cos, sin = attn_lib.rope_tables(cfg, positions)
    x, (new_cache, stats) = self.layers(x, cos, sin, segment_ids, positions, decode, cache)
    return self.final_norm(x), new_cache, stats

  def unembedding(self):
    """The [D, V] output projection (the embedding's transpose when tied)."""
    if self.cfg.tie_word_embeddings:
      return self.embed.embedding_vd.T
    return self.lm_head.kernel_dv

  def forward_logits(self, tokens, positions, segment_ids):
    hidden, _, stats = self(tokens, positions, segment_ids)
    return self.logits(hidden), stats

  def logits(self, hidden):
    w = self.unembedding()
    dt = jnp.dtype(self.cfg.dtype)
    return jnp.einsum("BTD,DV->BTV", hidden.astype(dt), w.astype(dt),
                      preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------- functional API

def _defaults(tokens, positions, segment_ids):
  # segment_ids None stays None: one example per row and no padding, which
  # attention can run without any mask beyond causality (models/attention.py).
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  return positions, segment_ids


def init_params(cfg: ModelConfig, rng: jax.Array) -> dict:
  """Randomly initialized parameters (normal(initializer_range), unit norms, zero biases)."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return Transformer(cfg).init(rng, tokens, *_defaults(tokens, None, None),
                               method=Transformer.forward_logits)["params"]


def abstract_params(cfg: ModelConfig) -> dict:
  """Shapes and dtypes of the parameters, without materializing any."""
  return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def hidden_states(cfg: ModelConfig, params, tokens, positions=None, segment_ids=None):
  """Final-norm hidden states [B,T,D] and auxiliary outputs (MoE router stats).

  ``segment_ids`` [B,T] mark packed examples (0 = padding); ``positions``
  restart at 0 in each segment. Defaults: one segment, positions 0..T-1.
  """
  positions, segment_ids = _defaults(tokens, positions, segment_ids)
  hidden, _, stats = Transformer(cfg).apply({"params": params}, tokens, positions, segment_ids)
  return hidden, _aux(cfg, stats, tokens, segment_ids)


def unembedding(cfg: ModelConfig, params) -> jax.Array:
  """The [D, V] matrix mapping hidden states to logits."""
  return Transformer(cfg).apply({"params": params}, method=Transformer.unembedding)


def forward(cfg: ModelConfig, params, tokens, positions=None, segment_ids=None):
  """fp32 logits [B,T,V] and auxiliary outputs; see ``hidden_states``."""
  positions, segment_ids = _defaults(tokens, positions, segment_ids)
  logits, stats = Transformer(cfg).apply({"params": params}, tokens, positions, segment_ids,
                                         method=Transformer.forward_logits)
  return logits, _aux(cfg, stats, tokens, segment_ids)


def _aux(cfg: ModelConfig, stats, tokens, segment_ids) -> dict[str, Any]:
  if not cfg.is_moe:
    return {}
  if segment_ids is None:
    segment_ids = jnp.ones(tokens.shape, jnp.int32)
  return mixtral.aux_outputs(cfg, stats, segment_ids)


# ----------------------------------------------------------------------------- decoding

def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
  """An empty KV cache for ``max_len`` slots: k/v [L,B,S,K,H], slot positions and validity."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  return {
      "k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
      "positions": jnp.zeros((batch, max_len), jnp.int32),
      "valid": jnp.zeros((batch, max_len), bool),
      "index": jnp.zeros((), jnp.int32),
  }


def decode_step(cfg: ModelConfig, params, cache: dict, tokens, positions, valid):
  """Run ``tokens`` [B,T] (a prompt chunk or one new token) against the cache.

  ``valid`` [B,T] is False for left padding. Writes T slots at ``cache['index']``
  and returns (fp32 logits [B,T,V], the new cache).
  """
  b, t = tokens.shape
  index = cache["index"]
  slot_positions = jax.lax.dynamic_update_slice_in_dim(cache["positions"], positions, index, 1)
  slot_valid = jax.lax.dynamic_update_slice_in_dim(cache["valid"], valid, index, 1)
  decode = {
      "index": index,
      "q_slots": jnp.broadcast_to(index + jnp.arange(t, dtype=jnp.int32), (b, t)),
      "positions": slot_positions,
      "valid": slot_valid,
  }
  model = Transformer(cfg)
  hidden, (k, v), _ = model.apply({"params": params}, tokens, positions,
                                  valid.astype(jnp.int32), decode, (cache["k"], cache["v"]))
  logits = model.apply({"params": params}, hidden, method=Transformer.logits)
  new_cache = {"k": k, "v": v, "positions": slot_positions, "valid": slot_valid,
               "index": index + t}
  return logits, new_cache
