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

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxsft import sharding as sharding_lib
from jaxsft.models import attention as attn_lib
from jaxsft.models import dense
from jaxsft.models import elementwise
from jaxsft.models import mixtral
from jaxsft.models.model_config import ModelConfig
from jaxsft.peft import adapters as adapters_lib
from jaxsft.peft import lora as lora_lib
from jaxsft.peft import nf4
from jaxsft.peft import prompts as prompts_lib

_SAVE_NAMED_ATTENTION_OUT = jax.checkpoint_policies.save_only_these_names("attention_out")


def _save_attention_out(prim, *avals, **params) -> bool:
  """Keep attention's output and recompute everything else. On XLA's path
  that is the named output; cuDNN's backward kernel also reads the forward's
  softmax statistics, so there all outputs of jax's cuDNN attention
  primitive (matched by name: no public handle) are kept, or the forward
  kernel would run again for them (Llama-3-8B LoRA, batch 4, compiled for an
  H200: the named output alone saved nothing over 'full', docs/BENCHMARKS.md)."""
  return (prim.name.startswith("dot_product_attention_fwd")
          or bool(_SAVE_NAMED_ATTENTION_OUT(prim, *avals, **params)))


# A dot contracting at most this many elements (a LoRA rank) is recomputed.
_RECOMPUTE_CONTRACTION = 256


def _save_projections_and_attention(prim, *avals, **params) -> bool:
  """Keep each projection's output (x·W, and LoRA's x·A) and the fused
  attention's outputs (cuDNN's output and softmax statistics, what its
  backward kernel reads; on XLA's path the named attention output); recompute
  everything elementwise (norms, RoPE, SwiGLU, residual adds) and LoRA's
  (x·A)·B, whose rank-sized contraction costs less to redo than to keep.

  Without remat a layer keeps the norms' outputs and its residual stream
  too (Llama-3.2-1B, batch 8, seq 2048, compiled for an H200: 35.5 GiB in
  all vs 33.2; before models/elementwise.py, with six [B,T,F] per MLP and
  fp32 copies of the norms' inputs, 56.0), each written into the stacked
  residuals in the forward pass and read back in the backward
  (docs/BENCHMARKS.md)."""
  if prim is jax.lax.dot_general_p:
    (contract, _), (batch, _) = params["dimension_numbers"]
    if batch:  # attention's scores on XLA's path: T x T
      return False
    return math.prod(avals[0].shape[d] for d in contract) > _RECOMPUTE_CONTRACTION
  return _save_attention_out(prim, *avals, **params)


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_out": _save_attention_out,
    "projections_attention": _save_projections_and_attention,
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
    return elementwise.rms_norm(x, scale, self.cfg.rms_norm_eps)


def _proj(mdl: nn.Module, x, name: str, shape, init):
  """``x`` times the weight ``name`` (created here), with its LoRA term if targeted."""
  cfg = mdl.cfg
  pdt = jnp.dtype(cfg.param_dtype)
  stored = mdl.get_variable("params", name) if mdl.has_variable("params", name) else None
  if nf4.is_stored(stored):  # a QLoRA stage's 4-bit frozen weight (peft/nf4.py)
    w = nf4.StoredWeight(stored, shape)
  else:
    w = mdl.param(name, init, shape, pdt)
  return lora_lib.project(mdl, x, w, name, cfg.adapters, jnp.dtype(cfg.dtype), pdt)


def fuses_projections(cfg: ModelConfig, names) -> bool:
  """Whether the projections ``names`` of one input run as one matmul
  (``_projections``): ``cfg.fused_projections`` "on", or "auto" on a GPU
  (``sharding.compute_platform``) unless the mesh splits ``tensor``; and in
  either case none of them has a LoRA/DoRA term. TPUs keep them apart under
  "auto" until measured there (MaxText's fused_qkv defaults to off)."""
  if cfg.fused_projections == "off":
    return False
  if any(lora_lib.targets(cfg.adapters, name) for name in names):
    return False
  if cfg.fused_projections == "on":
    return True
  if sharding_lib.compute_platform() != "gpu":
    return False
  mesh = jax.sharding.get_abstract_mesh()
  return mesh.empty or mesh.shape.get("tensor", 1) == 1


def _projections(mdl: nn.Module, x, specs, init) -> list:
  """``x`` times each weight of ``specs`` ((name, shape), all of input axis D):
  ``_proj`` of each, or, where ``fuses_projections``, one matmul.

  Why. On a GPU, q/k/v (and gate/up) as one [D, ΣO] matmul of the layer's
  input are one GEMM of each kind instead of three (two) in the forward and
  backward passes, with the small k/v GEMMs folded into q's, and their input
  gradients summed inside the GEMM rather than added after; SwiGLU's two
  input gradients come out of one fused kernel. Llama-3.2-1B full SFT,
  compiled for an H200: 144 fewer GEMM launches a step and ~1.1% less time by
  the static roofline (docs/BENCHMARKS.md). The weights stay separate
  parameters (checkpoints, export, sharding rules, LoRA targets unchanged):
  their compute-dtype copies are concatenated inside the step, fused with
  the cast the matmul needs anyway. With tensor parallelism the
  concatenation would cut across each weight's split output axis, so "auto"
  leaves it there; on a CPU (``dense.project``'s own backward) the fused
  step measured ~15% slower (tiny shape), so "auto" leaves it there too.
  Values: the same products, summed in the same dtype (a GEMM may order the
  sums differently)."""
  cfg = mdl.cfg
  names = [name for name, _ in specs]
  stored = [mdl.get_variable("params", n) if mdl.has_variable("params", n) else None
            for n in names]
  if any(nf4.is_stored(v) for v in stored) or not fuses_projections(cfg, names):
    return [_proj(mdl, x, name, shape, init) for name, shape in specs]
  pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
  d = specs[0][1][0]
  ws = [mdl.param(name, init, shape, pdt) for name, shape in specs]
  flat = [w.astype(dt).reshape(d, -1) for w in ws]
  y = dense.project(x.astype(dt), jnp.concatenate(flat, axis=1), 1)
  outs, start = [], 0
  for w, part in zip(ws, flat):
    width = part.shape[1]
    outs.append(y[..., start:start + width].reshape(y.shape[:-1] + w.shape[1:]))
    start += width
  return outs


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, cos, sin, segment_ids, positions, layer_cache, decode, prefix=None):
    cfg = self.cfg
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    init = _dense_init(cfg)
    q, key, val = _projections(self, x, (("q_dnh", (d, n, h)), ("k_dkh", (d, k, h)),
                                         ("v_dkh", (d, k, h))), init)
    if cfg.qkv_bias:
      q = q + self.param("q_bias_nh", nn.initializers.zeros, (n, h), pdt).astype(dt)
      key = key + self.param("k_bias_kh", nn.initializers.zeros, (k, h), pdt).astype(dt)
      val = val + self.param("v_bias_kh", nn.initializers.zeros, (k, h), pdt).astype(dt)
    q = attn_lib.apply_rope(q, cos, sin)
    key = attn_lib.apply_rope(key, cos, sin)

    if decode is None and prefix is not None:  # prefix tuning: XLA path only
      b = x.shape[0]
      pk, pv = (jnp.broadcast_to(t.astype(dt), (b,) + t.shape) for t in prefix)
      out = attn_lib.prefix_attention(q, key, val, pk, pv, segment_ids=segment_ids,
                                      positions=positions, sliding_window=cfg.sliding_window)
      new_cache = None
    elif decode is None:
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
    y = _proj(self, out, "o_nhd", (n, h, d), init)
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
    gate, up = _projections(self, x, (("gate_df", (d, f)), ("up_df", (d, f))), init)
    if cfg.mlp_bias:
      gate = gate + self.param("gate_bias_f", nn.initializers.zeros, (f,), pdt).astype(dt)
      up = up + self.param("up_bias_f", nn.initializers.zeros, (f,), pdt).astype(dt)
    down = lambda mdl, g, u: _proj(mdl, elementwise.swiglu(g, u), "down_fd", (f, d), init)  # noqa: E731
    if cfg.layer_unroll == 1:
      # In the rolled layer scan, the down projection's input (SwiGLU's
      # output) would be one more stacked [L,B,T,F] residual; it is
      # recomputed from gate and up (kept anyway) in the backward pass.
      # Llama-3.2-1B full SFT compiled for an H200: 39.9 -> 35.5 GiB and ~2%
      # less time by the roofline (docs/BENCHMARKS.md). Unrolled, XLA fuses
      # it as it likes, and the fence this remat would need there (no
      # merging with the forward pass) cost 2-4%.
      down = nn.remat(down, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
    y = down(self, gate, up)
    if cfg.mlp_bias:
      y = y + self.param("down_bias_d", nn.initializers.zeros, (d,), pdt).astype(dt)
    return y


class DecoderLayer(nn.Module):
  """One pre-norm block; the scan body (carry = hidden states)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, cos, sin, segment_ids, positions, decode, layer_cache, prefix):
    cfg = self.cfg
    bottleneck = cfg.adapters is not None and cfg.adapters.bottleneck_size > 0
    x = sharding_lib.constrain_rows(x)  # FSDP: gather weights, keep rows split
    h, new_cache = Attention(cfg, name="attn")(
        RMSNorm(cfg, name="attn_norm")(x), cos, sin, segment_ids, positions, layer_cache, decode,
        prefix)
    if bottleneck:
      h = adapters_lib.Bottleneck(cfg, name="adapter_attn")(h)
    x = x + h
    normed = RMSNorm(cfg, name="mlp_norm")(x)
    if cfg.is_moe:
      valid = jnp.ones(x.shape[:2], bool) if segment_ids is None else segment_ids != 0
      h, stats = mixtral.MoE(cfg, name="moe")(normed, valid)
    else:
      h, stats = MLP(cfg, name="mlp")(normed), None
    if bottleneck:
      h = adapters_lib.Bottleneck(cfg, name="adapter_mlp")(h)
    return x + h, (new_cache, stats)


class Embed(nn.Module):
  """Token embeddings; with LoRA on ``embed_tokens``, PEFT's embedding factors
  (A [V, r] starts at zero, B [r, D] random)."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    pdt = jnp.dtype(cfg.param_dtype)
    self.embedding_vd = self.param("embedding_vd", _dense_init(cfg),
                                   (cfg.vocab_size, cfg.hidden_size), pdt)
    a = cfg.adapters
    if a is not None and "embed_tokens" in a.lora_targets:
      self.lora_a_vr = self.param("embedding_lora_a_vr", nn.initializers.zeros,
                                  (cfg.vocab_size, a.lora_rank), pdt)
      self.lora_b_rd = self.param("embedding_lora_b_rd", nn.initializers.normal(1.0),
                                  (a.lora_rank, cfg.hidden_size), pdt)

  def __call__(self, tokens, virtual=None):
    """Embeddings [B,T,D] of ``tokens``; with ``virtual`` [P, D] (prompt tuning),
    the slots marked -(1 + j) get the j-th virtual embedding. In a training
    step (a "dropout" rng) with ``cfg.neftune_noise_alpha``, NEFTune's noise is
    added (``neftune_noise``)."""
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    ids = jnp.maximum(tokens, 0)
    x = self.embedding_vd[ids].astype(dt)
    if hasattr(self, "lora_a_vr"):
      x = x + cfg.adapters.lora_scale * jnp.einsum(
          "BTR,RD->BTD", self.lora_a_vr[ids].astype(dt), self.lora_b_rd.astype(dt))
    if virtual is not None:
      slot = jnp.clip(-tokens - 1, 0, virtual.shape[0] - 1)
      x = jnp.where((tokens < 0)[..., None], virtual[slot].astype(dt), x)
    if cfg.neftune_noise_alpha and self.has_rng("dropout"):
      x = neftune_noise(self.make_rng("dropout"), tokens, x, cfg.neftune_noise_alpha)
    return x


def neftune_noise(key: jax.Array, tokens: jax.Array, x: jax.Array, alpha: float) -> jax.Array:
  """NEFTune (Jain et al. 2023, "NEFTune: Noisy Embeddings Improve Instruction
  Finetuning"): the input embeddings ``x`` [B,T,D] plus noise drawn uniformly
  from [-m, m], m = alpha / sqrt(T·D), as transformers' ``neftune_post_forward_hook``
  (the Trainer's and TRL's ``neftune_noise_alpha``; LLaMA-Factory's too).

  T is the row's length, as the hook's ``output.size(1)``: with packed rows the
  packed length (TRL's packing gives the same), with prompt tuning including
  the virtual slots. Those slots (``tokens`` < 0) keep their embeddings
  exactly: PEFT adds its prompt after the hook has run. The noise is drawn in
  fp32 and added before the cast back to the compute dtype.
  """
  t, d = x.shape[-2:]
  mag = alpha / math.sqrt(t * d)
  noisy = (x.astype(jnp.float32)
           + jax.random.uniform(key, x.shape, jnp.float32, -mag, mag)).astype(x.dtype)
  return jnp.where((tokens >= 0)[..., None], noisy, x)


class LMHead(nn.Module):
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    pdt = jnp.dtype(cfg.param_dtype)
    self.kernel_dv = self.param("kernel_dv", _dense_init(cfg),
                                (cfg.hidden_size, cfg.vocab_size), pdt)
    a = cfg.adapters
    if lora_lib.targets(a, "kernel_dv"):
      name_a, name_b, _ = lora_lib.factor_names("kernel_dv")
      self.lora_a = self.param(name_a, lora_lib.a_init(a), (cfg.hidden_size, a.lora_rank), pdt)
      self.lora_b = self.param(name_b, nn.initializers.zeros, (a.lora_rank, cfg.vocab_size), pdt)

  def weight(self):
    """[D, V]; with LoRA the merged W + s·A·B (the head's factors are small next
    to its weight, and the chunked loss wants one matrix)."""
    if not hasattr(self, "lora_a"):
      return self.kernel_dv
    return lora_lib.merged_weight(self.kernel_dv, self.lora_a, self.lora_b, None,
                                  self.cfg.adapters, 1)


class ScoreHead(nn.Module):
  """A task head (models/heads.py): hidden states -> ``num_labels`` scores, no bias
  (transformers' ``score`` of *ForSequenceClassification)."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.kernel_dc = self.param("kernel_dc", _dense_init(cfg), (cfg.hidden_size, cfg.num_labels),
                                jnp.dtype(cfg.param_dtype))


class Transformer(nn.Module):
  """Embeddings → scanned decoder layers → final norm (→ logits via ``logits``)."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    a = cfg.adapters
    layer = DecoderLayer
    if cfg.remat != "none":
      # Inside a rolled scan the recomputation (backward loop) can never be
      # merged with the forward pass, so CSE needs no fence; once the layers
      # are unrolled, XLA sees both in one program and CSE would undo the
      # remat (Llama-3.2-1B, remat full, unrolled, compiled for an H200: 36.6
      # GiB, i.e. no remat, instead of 20.8).
      layer = nn.remat(layer, policy=_REMAT[cfg.remat], prevent_cse=cfg.layer_unroll > 1)

    def stack(length):
      return nn.scan(
          layer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
          in_axes=(nn.broadcast,) * 5 + (0, 0), length=length,
          unroll=min(cfg.layer_unroll, length))(cfg)

    # Freeze tuning keeps the first F layers in their own stack, a constant of the step.
    frozen = a.frozen_layers if a is not None else 0
    if frozen:
      self.layers_frozen = stack(frozen)
    self.layers = stack(cfg.num_layers - frozen)
    self.embed = Embed(cfg)
    self.final_norm = RMSNorm(cfg)
    if cfg.has_head:  # a classifier / reward model has a score head instead of an lm_head
      self.score = ScoreHead(cfg)
    elif not cfg.tie_word_embeddings:
      self.lm_head = LMHead(cfg)
    if a is not None and a.prompt_tokens:
      self.prompt = prompts_lib.Prompt(cfg)
    if a is not None and a.prefix_tokens:
      self.prefix = prompts_lib.Prefix(cfg)

  def __call__(self, tokens, positions, segment_ids, decode=None, cache=None):
    """Final hidden states [B,T,D], the updated per-layer (k, v) cache, MoE stats.
    ``positions`` are the model's own (offset past prefix-tuning slots, see
    ``model_positions``)."""
    cfg = self.cfg
    x = sharding_lib.constrain_rows(
        self.embed(tokens, self.prompt() if hasattr(self, "prompt") else None))
    cos, sin = attn_lib.rope_tables(cfg, positions)
    # Prefixes enter the training forward; decoding finds them in the cache.
    prefix = self.prefix() if hasattr(self, "prefix") and decode is None else None
    if not hasattr(self, "layers_frozen"):
      x, (new_cache, stats) = self.layers(x, cos, sin, segment_ids, positions, decode, cache,
                                          prefix)
      return self.final_norm(x), new_cache, stats
    f = cfg.adapters.frozen_layers
    head = lambda tree: jax.tree_util.tree_map(lambda t: t[:f], tree)  # noqa: E731
    tail = lambda tree: jax.tree_util.tree_map(lambda t: t[f:], tree)  # noqa: E731
    x, (cache_a, stats_a) = self.layers_frozen(x, cos, sin, segment_ids, positions, decode,
                                               head(cache), head(prefix))
    x, (cache_b, stats_b) = self.layers(x, cos, sin, segment_ids, positions, decode,
                                        tail(cache), tail(prefix))
    join = lambda a, b: jax.tree_util.tree_map(  # noqa: E731
        lambda u, v: jnp.concatenate([u, v], axis=0), a, b)
    return self.final_norm(x), join(cache_a, cache_b), join(stats_a, stats_b)

  def prefix_kv(self):
    """Prefix tuning's (keys, values), each [L, P, K, H]."""
    return self.prefix()

  def virtual_embeddings(self):
    """Prompt tuning's [P, D] virtual-token embeddings (P-tuning: the encoder's output)."""
    return self.prompt()

  def unembedding(self):
    """The [D, V] output projection (the embedding's transpose when tied)."""
    w, vocab_major = self.output_projection()
    return w.T if vocab_major else w

  def output_projection(self):
    """(the output projection as stored, whether it is [V, D]): the tied
    embedding [V, D] itself, or the lm_head's [D, V]."""
    if self.cfg.tie_word_embeddings:
      return self.embed.embedding_vd, True
    return self.lm_head.weight(), False

  def init_all(self, tokens, positions, segment_ids):
    """Touches every parameter (``init_params``): the lm_head or the score head."""
    hidden, _, stats = self(tokens, positions, segment_ids)
    if self.cfg.has_head:
      return hidden @ self.score.kernel_dc, stats
    return self.logits(hidden), stats

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


def prefix_tokens(cfg: ModelConfig) -> int:
  """Key/value slots prefix tuning puts before every sequence (0: none)."""
  return cfg.adapters.prefix_tokens if cfg.adapters is not None else 0


def model_positions(cfg: ModelConfig, positions):
  """The positions the model computes with: the tokens' own, shifted by P
  with prefix tuning (the prefixes hold positions 0..P-1, as PEFT's past
  key/values do)."""
  p = prefix_tokens(cfg)
  return positions + p if p else positions


def init_params(cfg: ModelConfig, rng: jax.Array) -> dict:
  """Randomly initialized parameters (normal(initializer_range), unit norms, zero biases)."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return Transformer(cfg).init(rng, tokens, *_defaults(tokens, None, None),
                               method=Transformer.init_all)["params"]


def init_placed(cfg: ModelConfig, rng: jax.Array, shardings, dtypes=None) -> dict:
  """``init_params`` built on the device under jit and placed on ``shardings``
  (a tree like the parameters'), each leaf in ``dtypes``' dtype if given.

  One program builds the whole tree when every leaf keeps the parameter
  dtype. Otherwise (frozen weights in bf16) each leaf gets its own program
  (the rest of the init is dead code there): in one program XLA keeps every
  fp32 value until the end, so casting inside it costs more than it saves
  (Llama-3-8B on XLA:CPU: 15 GiB of bf16 outputs over 32 GiB of temporaries,
  vs 30 + 9 in fp32); leaf by leaf, the peak is the finished leaves plus one
  leaf's fp32 value."""
  build = lambda k: init_params(cfg, k)  # noqa: E731
  if dtypes is None or all(jnp.dtype(d) == jnp.dtype(cfg.param_dtype)
                           for d in jax.tree_util.tree_leaves(dtypes)):
    return jax.jit(build, out_shardings=shardings)(rng)
  dtype_leaves, treedef = jax.tree_util.tree_flatten(dtypes)
  leaves = [
      jax.jit(lambda k, i=i, d=d: jax.tree_util.tree_leaves(build(k))[i].astype(d),
              out_shardings=s)(rng)
      for i, (d, s) in enumerate(zip(dtype_leaves, jax.tree_util.tree_leaves(shardings)))]
  return jax.tree_util.tree_unflatten(treedef, leaves)


def abstract_params(cfg: ModelConfig) -> dict:
  """Shapes and dtypes of the parameters, without materializing any."""
  return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def _rngs(dropout_rng) -> dict:
  return {} if dropout_rng is None else {"dropout": dropout_rng}


def hidden_states(cfg: ModelConfig, params, tokens, positions=None, segment_ids=None,
                  dropout_rng=None):
  """Final-norm hidden states [B,T,D] and auxiliary outputs (MoE router stats).

  ``segment_ids`` [B,T] mark packed examples (0 = padding); ``positions``
  restart at 0 in each segment. Defaults: one segment, positions 0..T-1.
  ``dropout_rng`` turns on what only training does: adapter dropout and
  NEFTune's embedding noise (``cfg.neftune_noise_alpha``); without it the
  model is deterministic.
  """
  positions, segment_ids = _defaults(tokens, positions, segment_ids)
  hidden, _, stats = Transformer(cfg).apply({"params": params}, tokens,
                                            model_positions(cfg, positions), segment_ids,
                                            rngs=_rngs(dropout_rng))
  return hidden, _aux(cfg, stats, tokens, segment_ids)


def unembedding(cfg: ModelConfig, params) -> jax.Array:
  """The [D, V] matrix mapping hidden states to logits."""
  _require_lm(cfg)
  return Transformer(cfg).apply({"params": params}, method=Transformer.unembedding)


def output_projection(cfg: ModelConfig, params) -> tuple[jax.Array, bool]:
  """``(w, vocab_major)``: the matrix mapping hidden states to logits in the
  layout the parameters hold it, [V, D] for a tied embedding (``vocab_major``)
  or [D, V]; what ``losses.masked_cross_entropy`` takes, so that the tied
  embedding's gradient is accumulated in its own layout rather than as
  [D, V] and transposed (a 1 GB fp32 copy for a 128k vocabulary)."""
  _require_lm(cfg)
  return Transformer(cfg).apply({"params": params}, method=Transformer.output_projection)


def forward(cfg: ModelConfig, params, tokens, positions=None, segment_ids=None,
            dropout_rng=None):
  """fp32 logits [B,T,V] and auxiliary outputs; see ``hidden_states``."""
  _require_lm(cfg)
  positions, segment_ids = _defaults(tokens, positions, segment_ids)
  logits, stats = Transformer(cfg).apply({"params": params}, tokens,
                                         model_positions(cfg, positions), segment_ids,
                                         method=Transformer.forward_logits,
                                         rngs=_rngs(dropout_rng))
  return logits, _aux(cfg, stats, tokens, segment_ids)


def _require_lm(cfg: ModelConfig) -> None:
  if cfg.has_head:
    raise ValueError(f"this is a {cfg.problem_type} model with a score head of "
                     f"{cfg.num_labels} label(s) and no lm_head: it has no token logits "
                     "(use jaxsft.models.heads)")


def _aux(cfg: ModelConfig, stats, tokens, segment_ids) -> dict[str, Any]:
  if not cfg.is_moe:
    return {}
  if segment_ids is None:
    segment_ids = jnp.ones(tokens.shape, jnp.int32)
  return mixtral.aux_outputs(cfg, stats, segment_ids)


# ----------------------------------------------------------------------------- decoding

def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None, params=None) -> dict:
  """An empty KV cache for ``max_len`` slots: k/v [L,B,S,K,H], slot positions and validity.

  With prefix tuning (``params`` needed) the cache has P more slots, the first
  P holding the prefixes (positions 0..P-1), and writing starts after them.
  """
  dtype = jnp.dtype(dtype or cfg.dtype)
  p = prefix_tokens(cfg)
  shape = (cfg.num_layers, batch, p + max_len, cfg.num_kv_heads, cfg.head_dim)
  cache = {
      "k": sharding_lib.constrain_cache(jnp.zeros(shape, dtype)),
      "v": sharding_lib.constrain_cache(jnp.zeros(shape, dtype)),
      "positions": jnp.zeros((batch, p + max_len), jnp.int32),
      "valid": jnp.zeros((batch, p + max_len), bool),
      "index": jnp.full((), p, jnp.int32),
  }
  if p:
    assert params is not None, "prefix tuning: init_cache needs the params (the prefixes)"
    keys, values = Transformer(cfg).apply({"params": params}, method=Transformer.prefix_kv)
    fill = lambda t: jnp.broadcast_to(t[:, None].astype(dtype), (shape[0], batch) + t.shape[1:])  # noqa: E731
    cache["k"] = cache["k"].at[:, :, :p].set(fill(keys))
    cache["v"] = cache["v"].at[:, :, :p].set(fill(values))
    cache["positions"] = cache["positions"].at[:, :p].set(jnp.arange(p, dtype=jnp.int32))
    cache["valid"] = cache["valid"].at[:, :p].set(True)
  return cache


def decode_step(cfg: ModelConfig, params, cache: dict, tokens, positions, valid):
  """Run ``tokens`` [B,T] (a prompt chunk or one new token) against the cache.

  ``valid`` [B,T] is False for left padding. Writes T slots at ``cache['index']``
  and returns (fp32 logits [B,T,V], the new cache).
  """
  _require_lm(cfg)
  b, t = tokens.shape
  index = cache["index"]
  positions = model_positions(cfg, positions)
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
