"""Prompt tuning, P-tuning and prefix tuning, with PEFT's semantics.

Axis letters in parameter names (besides the model's, see models/llama.py):
p virtual tokens, j a prompt/prefix encoder's hidden width, g an LSTM's four
stacked gates, x the flattened L·2·K·H of a prefix. None of them is sharded.

Prompt tuning (``Prompt``, no encoder): P learned embeddings ``embedding_pd``
stand before every example, at positions 0..P-1; the example's own tokens
follow at P... The data pipeline reserves those P slots at the start of every
example and marks slot j with the token id ``-(1 + j)`` (``virtual_ids``), so
packed rows give each example its own virtual prefix; the embedding layer puts
the virtual embeddings there, and the slots carry no loss.

P-tuning (``Prompt`` with an encoder): the same slots; the embeddings are the
output of an encoder over a learned [P, D] table, as PEFT's ``PromptEncoder``:
  mlp:   Linear(D, h) ReLU Linear(h, h) ReLU Linear(h, D)
  lstm:  a bidirectional 2-layer LSTM (hidden h) and Linear(2h, 2h) ReLU Linear(2h, D)
(h = ``prompt_encoder_hidden``, default D). A PEFT export holds the encoder's
output, which is what PEFT uses in inference mode.

Prefix tuning (``Prefix``): every layer gets P learned key/value slots
``key_lpkh``/``value_lpkh`` [L, P, K, H] (K kv heads: GQA-aware) that every real
token attends to. As in PEFT (where they are the past key/values), RoPE is not
applied to them and the real tokens' positions start at P. With
``prefix_projection_hidden`` h > 0 they are reparameterized as PEFT's
``PrefixEncoder``: an embedding [P, K·H] → Linear(K·H, h) tanh Linear(h, L·2·K·H),
laid out per virtual token as [L, 2 (key, value), K, H].
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.models.model_config import ModelConfig


def virtual_ids(n: int) -> np.ndarray:
  """The token ids marking virtual slots 0..n-1: -1, -2, …, -n."""
  return -(1 + np.arange(n, dtype=np.int32))


def _torch_linear_init(fan_in: int):
  """torch.nn.Linear's default init: uniform(±1/√fan_in), for weights and biases."""
  bound = 1.0 / np.sqrt(fan_in)
  return lambda rng, shape, dtype: jax.random.uniform(rng, shape, dtype, -bound, bound)


class _Linear(nn.Module):
  """y = x·W + b with W named ``{name}_{letters}`` (torch's default init)."""
  n_in: int
  n_out: int
  letters: str
  dtype: str

  @nn.compact
  def __call__(self, x):
    pdt = jnp.dtype(self.dtype)
    init = _torch_linear_init(self.n_in)
    w = self.param(f"w_{self.letters}", init, (self.n_in, self.n_out), pdt)
    b = self.param(f"bias_{self.letters[-1]}", init, (self.n_out,), pdt)
    return x @ w + b


def _lstm_direction(x, w_in, w_rec, bias, reverse: bool):
  """One direction of a torch LSTM layer over x [P, I]: gates (i, f, g, o)."""
  h_size = w_rec.shape[0]
  xs = x @ w_in + bias  # [P, 4h]

  def step(carry, xt):
    h, c = carry
    z = xt + h @ w_rec
    i, f, g, o = jnp.split(z, 4)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, c), h

  zeros = jnp.zeros((h_size,), x.dtype)
  _, hs = jax.lax.scan(step, (zeros, zeros), xs, reverse=reverse)
  return hs


class Prompt(nn.Module):
  """The [P, D] virtual-token embeddings (prompt tuning, or P-tuning's encoder output)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self):
    cfg = self.cfg
    a = cfg.adapters
    p, d = a.prompt_tokens, cfg.hidden_size
    h = a.prompt_encoder_hidden or d
    pdt = cfg.param_dtype
    table = self.param("embedding_pd", nn.initializers.normal(cfg.initializer_range), (p, d),
                       jnp.dtype(pdt)).astype(jnp.float32)
    if a.prompt_encoder == "none":
      return table
    if a.prompt_encoder == "mlp":
      x = jax.nn.relu(_Linear(d, h, "dj", pdt, name="mlp0")(table))
      x = jax.nn.relu(_Linear(h, h, "jj", pdt, name="mlp1")(x))
      return _Linear(h, d, "jd", pdt, name="mlp2")(x)
    # LSTM: two bidirectional layers, then the MLP head.
    x = table
    init = _torch_linear_init(h)  # torch's LSTM init: uniform(±1/√hidden) everywhere
    for layer in range(2):
      n_in, outs = x.shape[-1], []
      for direction in ("fwd", "bwd"):
        name = f"lstm{layer}_{direction}"
        w_in = self.param(f"{name}_in_jg", init, (n_in, 4 * h), jnp.dtype(pdt))
        w_rec = self.param(f"{name}_rec_jg", init, (h, 4 * h), jnp.dtype(pdt))
        # torch's two biases (b_ih + b_hh) only ever appear summed.
        bias = self.param(f"{name}_bias_g", init, (4 * h,), jnp.dtype(pdt))
        outs.append(_lstm_direction(x, w_in, w_rec, bias, reverse=direction == "bwd"))
      x = jnp.concatenate(outs, axis=-1)
    x = jax.nn.relu(_Linear(2 * h, 2 * h, "jj", pdt, name="head0")(x))
    return _Linear(2 * h, d, "jd", pdt, name="head1")(x)


class Prefix(nn.Module):
  """Per-layer key and value prefixes, each [L, P, K, H] (fp32)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self):
    cfg = self.cfg
    a = cfg.adapters
    p, n_layers, k, hd = a.prefix_tokens, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    pdt = jnp.dtype(cfg.param_dtype)
    if not a.prefix_projection_hidden:
      # PEFT's nn.Embedding default: N(0, 1).
      keys = self.param("key_lpkh", nn.initializers.normal(1.0), (n_layers, p, k, hd), pdt)
      values = self.param("value_lpkh", nn.initializers.normal(1.0), (n_layers, p, k, hd), pdt)
      return keys.astype(jnp.float32), values.astype(jnp.float32)
    h = a.prefix_projection_hidden
    emb = self.param("embedding_pj", nn.initializers.normal(1.0), (p, k * hd), pdt)
    x = jnp.tanh(_Linear(k * hd, h, "xj", cfg.param_dtype, name="proj0")(emb))
    x = _Linear(h, n_layers * 2 * k * hd, "jx", cfg.param_dtype, name="proj1")(x)
    kv = x.reshape(p, n_layers, 2, k, hd).transpose(2, 1, 0, 3, 4).astype(jnp.float32)
    return kv[0], kv[1]


def prefix_flat(keys, values) -> np.ndarray:
  """PEFT's ``prompt_embeddings`` of a prefix: [P, L·2·K·H] with, per virtual
  token, layer i's keys at 2i and values at 2i+1 (peft_model.get_prompt views it
  as [P, 2L, K, H])."""
  kv = np.stack([np.asarray(keys, np.float32), np.asarray(values, np.float32)], axis=1)
  n_layers, _, p = kv.shape[:3]  # [L, 2, P, K, H]
  return kv.transpose(2, 0, 1, 3, 4).reshape(p, -1)
