"""Bottleneck adapters (Houlsby-style): a small residual MLP on the output of
attention and of the feed-forward block in every layer, before the residual add.

Parameters (under ``layers/adapter_attn`` and ``layers/adapter_mlp``, stacked
over L like the layer): ``down_dr`` [D, r], ``down_bias_r``, ``up_rd`` [r, D],
``up_bias_d`` (r = ``bottleneck_size``, never sharded). ``up`` starts at zero,
so a new adapter computes exactly the base model. PEFT has no such adapter and
the nonlinearity rules out an exact merge: these stay in jaxsft checkpoints.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.models.model_config import ModelConfig


class Bottleneck(nn.Module):
  """A bottleneck adapter on a sublayer's output h: h + up(gelu(down(h))).
  ``up`` starts at zero, so a new adapter is the identity."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, h):
    cfg = self.cfg
    d, r = cfg.hidden_size, cfg.adapters.bottleneck_size
    pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    bound = 1.0 / np.sqrt(d)  # torch.nn.Linear's default init
    init = lambda rng, shape, dtype: jax.random.uniform(rng, shape, dtype, -bound, bound)  # noqa: E731
    down = self.param("down_dr", init, (d, r), pdt)
    down_b = self.param("down_bias_r", nn.initializers.zeros, (r,), pdt)
    up = self.param("up_rd", nn.initializers.zeros, (r, d), pdt)
    up_b = self.param("up_bias_d", nn.initializers.zeros, (d,), pdt)
    z = jax.nn.gelu(jnp.einsum("BTD,DR->BTR", h.astype(dt), down.astype(dt)) + down_b.astype(dt))
    return h + (jnp.einsum("BTR,RD->BTD", z, up.astype(dt)) + up_b.astype(dt)).astype(h.dtype)
