"""Check, on whatever backend JAX runs on, that the routed MoE dispatches
(dropless; grouped; bucketed with its default capacity factor and with buckets too
small, so each layer runs the bigger ones) equal the dense reference: loss
and every gradient of a tiny random Mixtral (fp32, highest matmul precision),
with a router skewed so one expert gets most tokens; then the same with LoRA
on attention and experts (random nonzero B).

    python tools/moe_dispatch_check.py

tests/test_moe.py checks the same on CPU; this script needs only jax, flax and
numpy, so it runs on an accelerator machine without the test dependencies.
Prints one JSON line: the backend, the largest differences per dispatch, and ``ok``.
"""
from __future__ import annotations

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxsft.models import ModelConfig, llama, mixtral  # noqa: E402
from jaxsft.models.model_config import Adapters  # noqa: E402

CFG = ModelConfig(family="mixtral", vocab_size=256, hidden_size=64, intermediate_size=96,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, num_experts=8,
                  num_experts_per_tok=2)


LORA = Adapters(lora_targets=("q_proj", "v_proj", "expert_gate_up", "expert_down"),
                lora_rank=4, lora_alpha=8.0)


# (dispatch, capacity factor) pairs compared with dense.
ROUTED = (("dropless", 2.0), ("bucketed", 2.0), ("bucketed", 0.5), ("grouped", 2.0))


def compare(cfg: ModelConfig) -> dict:
  """Loss and gradients of ``cfg`` under each routed dispatch against dense:
  their largest differences, by dispatch."""
  params = llama.init_params(cfg, jax.random.key(0))
  # Skew: push every layer's router toward expert 0.
  router = params["layers"]["moe"]["router_de"]
  params["layers"]["moe"]["router_de"] = router.at[:, :, 0].add(0.15)
  # LoRA's B starts at 0; random values make its path count.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: 0.1 * jax.random.normal(jax.random.key(len(jax.tree_util.keystr(path))),
                                              x.shape) if "_lora_b_" in path[-1].key else x,
      params)
  tokens = jax.random.randint(jax.random.key(1), (4, 64), 0, cfg.vocab_size)
  segments = jnp.ones_like(tokens).at[3, 40:].set(0)

  def loss(params, dispatch, factor):
    logits, aux = llama.forward(cfg.replace(moe_dispatch=dispatch, moe_capacity_factor=factor),
                                params, tokens, segment_ids=segments)
    real = segments != 0  # bucketed and grouped leave padding's MoE output at 0
    lse = jnp.sum(jax.nn.logsumexp(logits, -1) * real) / jnp.sum(real)
    return lse + aux["aux_loss"] + aux["z_loss"], aux

  step = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=(1, 2))
  (l_dense, aux), g_dense = step(params, "dense", 2.0)
  grad_scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(g_dense))
  out = {"grad_max_abs": grad_scale,
         "expert_fractions": [round(float(f), 3) for f in aux["expert_fractions"]], "ok": True}
  for dispatch, factor in ROUTED:
    (l, routed_aux), g = step(params, dispatch, factor)
    grad_diff = max(float(jnp.max(jnp.abs(a - b)))
                    for a, b in zip(jax.tree.leaves(g_dense), jax.tree.leaves(g)))
    ok = (abs(float(l_dense - l)) <= 1e-6 * max(1.0, abs(float(l_dense)))
          and grad_diff <= 1e-6 * max(1.0, grad_scale))
    out[f"{dispatch}_{factor}"] = {
        "loss_diff": abs(float(l_dense - l)), "grad_max_abs_diff": grad_diff,
        "bucket_overflow": float(routed_aux["moe_bucket_overflow"]), "ok": ok}
    out["ok"] = out["ok"] and ok
  return out


def main() -> dict:
  jax.config.update("jax_default_matmul_precision", "highest")
  result = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "jax": jax.__version__, "auto_dispatch": mixtral.resolve_dispatch(CFG),
            **compare(CFG)}
  result["expert_lora"] = compare(CFG.replace(adapters=LORA))
  result["ok"] = result["ok"] and result["expert_lora"]["ok"]
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  sys.exit(0 if main()["ok"] else 1)
