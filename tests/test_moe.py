"""Mixture of experts: the dispatches against transformers and each other,
expert parallelism on 8 simulated devices, router losses, metrics and options,
LoRA on the experts (both dispatches, PEFT and merged exports, training)."""
from __future__ import annotations

import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import hf_builders
import peft_fixtures
import train_fixtures
from jaxsft import config as config_lib
from jaxsft import hf, optim, trainer
from jaxsft.models import ModelConfig, llama, mixtral
from jaxsft.models.model_config import Adapters
from jaxsft.peft import export as peft_export
from jaxsft.peft import methods as peft_methods

REPO = pathlib.Path(__file__).resolve().parents[1]
# Dispatches that route tokens (vs dense), with a capacity factor: "bucketed"
# at 0.5 overflows its first buckets and runs the bigger ones.
ROUTED = [("bucketed", 2.0), ("bucketed", 1.5), ("bucketed", 0.5), ("dropless", 2.0),
          ("grouped", 2.0)]
ROUTED_IDS = ["bucketed", "bucketed1.5", "bucketed-tight", "dropless", "grouped"]


def _tokens(batch=3, seq=24, seed=0):
  return np.random.RandomState(seed).randint(3, hf_builders.VOCAB, (batch, seq))


# ----------------------------------------------------------------------------- transformers

@pytest.mark.parametrize("dispatch,factor", [("dense", 2.0)] + ROUTED,
                         ids=["dense"] + ROUTED_IDS)
def test_logits_and_aux_loss_match_transformers(hf_model_factory, dispatch, factor):
  path, model = hf_model_factory("mixtral")
  cfg, params = hf.load_params(path)
  cfg = cfg.replace(moe_dispatch=dispatch, moe_capacity_factor=factor)
  assert mixtral.resolve_dispatch(cfg) == dispatch
  assert mixtral.resolve_dispatch(cfg.replace(moe_dispatch="auto")) == "grouped"  # on CPU
  tokens = _tokens()
  mask = np.ones_like(tokens)
  mask[1, 15:] = 0  # padding routes (as in transformers) but is not counted
  with torch.no_grad():
    ref = model(torch.tensor(tokens), attention_mask=torch.tensor(mask),
                output_router_logits=True)
  logits, aux = llama.forward(cfg, params, jnp.asarray(tokens), segment_ids=jnp.asarray(mask))
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[real], ref.logits.numpy()[real], atol=1e-4,
                             rtol=0)
  np.testing.assert_allclose(float(aux["aux_loss"]), float(ref.aux_loss), rtol=1e-5)
  # The router really spreads tokens: every layer uses at least 3 of 4 experts.
  layers = np.asarray(aux["layer_expert_fractions"])
  assert layers.shape == (cfg.num_layers, cfg.num_experts)
  np.testing.assert_allclose(layers.sum(axis=1), 1.0, rtol=1e-6)
  assert ((layers > 0.05).sum(axis=1) >= 3).all(), layers
  np.testing.assert_allclose(np.asarray(aux["expert_fractions"]), layers.mean(axis=0),
                             rtol=1e-6)
  # z-loss: ST-MoE's mean over real tokens (and layers) of logsumexp(logits)^2.
  z = np.concatenate([torch.logsumexp(r, -1).numpy().reshape(mask.shape)[real] ** 2
                      for r in ref.router_logits])
  np.testing.assert_allclose(float(aux["z_loss"]), z.mean(), rtol=1e-5)
  # Bucket overflow, from transformers' own routing: the layers whose busiest
  # expert got more real tokens than the first bucket holds.
  cap = mixtral.bucket_capacity(tokens.size, cfg.num_experts_per_tok, cfg.num_experts, factor)
  busiest = [np.bincount(torch.topk(r, cfg.num_experts_per_tok, -1).indices.numpy()
                         [real.reshape(-1)].reshape(-1), minlength=cfg.num_experts).max()
             for r in ref.router_logits]
  overflow = np.mean([b > cap for b in busiest]) if dispatch == "bucketed" else 0.0
  assert float(aux["moe_bucket_overflow"]) == overflow, (busiest, cap)
  if factor == 0.5:  # the case under test really happened
    assert overflow > 0


# ----------------------------------------------------------------------------- dropless = dense

_CFG = ModelConfig(family="mixtral", vocab_size=64, hidden_size=32, intermediate_size=48,
                   num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, num_experts=4,
                   num_experts_per_tok=2)


def _moe_case(skew: bool, cfg: ModelConfig = _CFG, batch: int = 3):
  """MoE parameters and inputs; with ``skew``, the router sends nearly every
  token to expert 0 (half of all routing slots) and none to expert 3."""
  module = mixtral.MoE(cfg)
  x = jax.random.normal(jax.random.key(1), (batch, 40, _CFG.hidden_size))
  valid = jnp.ones((batch, 40), bool).at[2, 30:].set(False)
  params = module.init(jax.random.key(0), x, valid)["params"]
  if skew:
    common = jax.random.normal(jax.random.key(2), (_CFG.hidden_size,))
    x = x + common  # (a stronger skew saturates the router: no gradient to compare)
    bias = jnp.zeros((_CFG.num_experts,)).at[0].set(0.3).at[3].set(-1.0)
    params["router_de"] = params["router_de"] + common[:, None] * bias[None] / 10.0
  return module, params, x, valid


def _check_routed(run, params, x, valid, dispatch, atol=1e-6, mesh=None):
  """``run(dispatch, params, x)`` of a routed dispatch against dense: the same
  outputs and gradients on real tokens (bucketed and grouped give padding
  exactly 0: they skip the experts), under a random cotangent on the real tokens. With
  ``mesh``, the routed dispatch runs jitted under it, dense on one device."""
  def routed(fn, *args):
    if mesh is None:
      return fn(*args)
    with jax.set_mesh(mesh):
      return jax.jit(fn)(*args)

  real = np.asarray(valid)
  y_dense, y = run("dense", params, x), routed(functools.partial(run, dispatch), params, x)
  np.testing.assert_allclose(np.asarray(y)[real], np.asarray(y_dense)[real], atol=atol, rtol=0)
  pad = np.asarray(y)[~real]
  if dispatch in ("bucketed", "grouped"):
    np.testing.assert_array_equal(pad, 0)
  else:
    np.testing.assert_allclose(pad, np.asarray(y_dense)[~real], atol=atol, rtol=0)
  r = jax.random.normal(jax.random.key(3), x.shape) * valid[..., None]
  loss = lambda d: lambda p, x: jnp.sum(run(d, p, x) * r)  # noqa: E731
  g_dense = jax.grad(loss("dense"), argnums=(0, 1))(params, x)
  g = routed(jax.grad(loss(dispatch), argnums=(0, 1)), params, x)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_dense), jax.tree.leaves(g)):
    assert np.abs(np.asarray(a)).max() > 1e-3, path  # a gradient really flows
    # 1e-6 absolute, or relative for entries above 1 (fp32 rounding of sums
    # in another order: the skewed case has input gradients near 10).
    np.testing.assert_allclose(b, a, atol=atol, rtol=1e-6, err_msg=str(path))
  return g_dense


@pytest.mark.parametrize("skew", [False, True], ids=["random", "skewed"])
@pytest.mark.parametrize("dispatch,factor", ROUTED, ids=ROUTED_IDS)
def test_routed_dispatch_equals_dense_forward_and_gradients(skew, dispatch, factor):
  cfg = _CFG.replace(moe_capacity_factor=factor)
  module, params, x, valid = _moe_case(skew, cfg)
  stats = {}

  def run(dispatch, params, x):
    y, stats[dispatch] = module.clone(cfg=cfg.replace(moe_dispatch=dispatch)).apply(
        {"params": params}, x, valid)
    return y

  _check_routed(run, params, x, valid, dispatch)
  routed = np.asarray(stats["dense"]["slot_counts"]).sum(0)  # real tokens per expert
  if skew:  # the case under test really happened
    assert routed[0] > 0.9 * routed.sum() / 2 and routed[3] == 0, routed
  if dispatch == "bucketed":  # overflow: busiest expert vs the first bucket
    cap = mixtral.bucket_capacity(x.shape[0] * x.shape[1], 2, cfg.num_experts, factor)
    assert float(stats["bucketed"]["bucket_overflow"]) == float(routed.max() > cap)
    # 120 tokens: factor 2 buckets hold all, 1.5 overflows only when skewed.
    assert routed.max() > cap if factor == 0.5 or (factor == 1.5 and skew) else cap >= routed.max()


@pytest.mark.parametrize("dispatch,factor", ROUTED[2:], ids=ROUTED_IDS[2:])
def test_routed_dispatch_under_jit_scan_and_remat_matches_dense(dispatch, factor):
  """The whole model (layers under scan, remat), jitted: same loss and gradients."""
  cfg = _CFG.replace(num_layers=2, remat="full", moe_capacity_factor=factor)
  params = llama.init_params(cfg, jax.random.key(0))
  tokens = jnp.asarray(_tokens(batch=2, seq=16) % cfg.vocab_size)

  def loss(params, dispatch):
    logits, aux = llama.forward(cfg.replace(moe_dispatch=dispatch), params, tokens)
    loss = jnp.mean(jax.nn.logsumexp(logits, -1)) + aux["aux_loss"] + aux["z_loss"]
    return loss, aux["moe_bucket_overflow"]

  step = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  ((l_dense, _), g_dense), ((l_routed, overflow), g_routed) = (
      step(params, "dense"), step(params, dispatch))
  np.testing.assert_allclose(l_routed, l_dense, atol=1e-6, rtol=0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=1e-6, rtol=0),
               g_dense, g_routed)
  assert float(overflow) == (1.0 if dispatch == "bucketed" else 0.0)  # 32 tokens, 8-row buckets


_SHARDED_MODULE = """
import os, sys
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, {tests!r})
import jax
import test_moe
from jaxsft import sharding
mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=2, expert=2))
for dispatch, factor in {cases!r}:
  cfg = test_moe._CFG.replace(adapters=test_moe.EXPERT_LORA, moe_capacity_factor=factor)
  module, params, x, valid = test_moe._moe_case(False, cfg, batch=4)
  params = test_moe._random_b(params)

  def apply(d, params, x):
    return module.clone(cfg=cfg.replace(moe_dispatch=d)).apply({{"params": params}}, x, valid)

  test_moe._check_routed(lambda *a: apply(*a)[0], params, x, valid, dispatch, atol=2e-6,
                         mesh=mesh)
  if dispatch == "bucketed":
    with jax.set_mesh(mesh):
      stats = jax.jit(lambda p, x: apply(dispatch, p, x)[1])(params, x)
    # 0.5: the 4 experts' buckets hold a quarter of the 2 x 150 assignments of
    # the real tokens, so some device's experts overflow; 2.0 holds them all.
    assert float(stats["bucket_overflow"]) == float(factor == 0.5), (factor, stats)
  print("ok", dispatch, factor)
"""


def test_routed_dispatch_on_8_devices_matches_dense_on_one():
  """Bucketed (both bucket sizes) and grouped under shard_map with the fsdp,
  tensor and expert axes 2 each, with expert LoRA: outputs and every
  gradient of single-device dense. (Dropless on this mesh, expert LoRA
  included, is checked by the training test below.)"""
  cases = [("bucketed", 2.0), ("bucketed", 0.5), ("grouped", 2.0)]
  script = _SHARDED_MODULE.format(tests=str(REPO / "tests"), cases=cases)
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.count("ok ") == len(cases), result.stdout


# ----------------------------------------------------------------------------- expert LoRA

EXPERT_LORA = Adapters(lora_targets=("q_proj", "v_proj", "expert_gate_up", "expert_down"),
                       lora_rank=3, lora_alpha=6.0)


def _random_b(params, scale=0.1):
  """``params`` with every LoRA B (zero at init) replaced by random values."""
  def fill(path, x):
    if "_lora_b_" not in path[-1].key:
      return x
    rng = jax.random.fold_in(jax.random.key(7), len(jax.tree_util.keystr(path)) * 131 + x.size)
    return scale * jax.random.normal(rng, x.shape, x.dtype)
  return jax.tree_util.tree_map_with_path(fill, params)


@pytest.mark.parametrize("skew", [False, True], ids=["random", "skewed"])
@pytest.mark.parametrize("dispatch,factor", ROUTED[2:], ids=ROUTED_IDS[2:])
def test_expert_lora_routed_equals_dense_and_zero_b_is_the_base(skew, dispatch, factor):
  cfg = _CFG.replace(adapters=EXPERT_LORA, moe_capacity_factor=factor)
  module, params, x, valid = _moe_case(skew, cfg)
  assert params["gate_up_lora_a_edr"].shape == (4, 32, 3)
  assert params["down_lora_b_erd"].shape == (4, 3, 32)
  base = {k: v for k, v in params.items() if "_lora_" not in k}

  def run(dispatch, params, x, cfg=cfg):
    return module.clone(cfg=cfg.replace(moe_dispatch=dispatch)).apply(
        {"params": params}, x, valid)[0]

  for d in ("dense", dispatch):  # fresh adapters (B = 0) compute the base model exactly
    np.testing.assert_array_equal(run(d, params, x), run(d, base, x, _CFG.replace(
        moe_capacity_factor=factor)))
  params = _random_b(params)
  assert np.abs(np.asarray(run("dense", params, x) - run("dense", base, x, _CFG))).max() > 1e-2
  g_dense = _check_routed(run, params, x, valid, dispatch)
  for name in [k for k in params if "_lora_" in k]:
    assert np.abs(np.asarray(g_dense[0][name])).max() > 1e-3, name


def test_expert_lora_trains_only_its_factors():
  """The label tree of a LoRA stage on a Mixtral: only the factors (attention's
  and the experts') train, so expert weights get no gradient and no state."""
  params = jax.eval_shape(lambda: llama.init_params(_CFG.replace(adapters=EXPERT_LORA),
                                                    jax.random.key(0)))
  stage = config_lib.stage(method="lora")
  mask = optim.trainable_mask(params, stage)
  trains = {"/".join(k.key for k in path): m
            for path, m in jax.tree_util.tree_leaves_with_path(mask)}
  assert {k for k, m in trains.items() if m} == {
      "layers/attn/q_lora_a_dr", "layers/attn/q_lora_b_rnh", "layers/attn/v_lora_a_dr",
      "layers/attn/v_lora_b_rkh", "layers/moe/gate_up_lora_a_edr",
      "layers/moe/gate_lora_b_erf", "layers/moe/up_lora_b_erf",
      "layers/moe/down_lora_a_efr", "layers/moe/down_lora_b_erd"}


def test_expert_lora_exports_to_peft_and_merged(hf_model_factory, tmp_path):
  """LoRA on attention + experts of a transformers Mixtral: PEFT's
  ``PeftModel.from_pretrained`` on the exported adapter, and transformers on
  the merged export, give jaxsft's logits."""
  path, _ = hf_model_factory("mixtral")
  cfg, params = hf.load_params(path)
  cfg = cfg.replace(adapters=EXPERT_LORA)
  params = _random_b(peft_methods.add_params(cfg, params, jax.random.key(1)))
  tokens = _tokens(batch=2, seq=20)
  logits, aux = llama.forward(cfg, params, jnp.asarray(tokens))
  layers = np.asarray(aux["layer_expert_fractions"])
  assert ((layers > 0.05).sum(axis=1) >= 3).all(), layers  # varied experts
  base = transformers.MixtralForCausalLM.from_pretrained(path)
  base_logits = peft_fixtures.torch_logits(base, tokens)
  assert np.abs(base_logits - np.asarray(logits)).max() > 0.1  # the adapters matter

  (tmp_path / "peft").mkdir()
  peft_export.save_adapter(cfg, params, tmp_path / "peft", str(path))
  config = json.loads((tmp_path / "peft" / peft_export.ADAPTER_CONFIG).read_text())
  assert config["target_modules"] == ["q_proj", "v_proj"]
  assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
  model = peft.PeftModel.from_pretrained(base, tmp_path / "peft")
  np.testing.assert_allclose(peft_fixtures.torch_logits(model, tokens), logits, atol=1e-4,
                             rtol=0)

  merged_cfg, merged = peft_methods.merge(cfg, params)
  assert merged_cfg.adapters is None and "gate_up_lora_a_edr" not in merged["layers"]["moe"]
  hf.save_params(merged, merged_cfg, tmp_path / "merged")
  model = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "merged")
  np.testing.assert_allclose(peft_fixtures.torch_logits(model, tokens), logits, atol=1e-4,
                             rtol=0)


def test_expert_lora_settings_are_checked():
  with pytest.raises(ValueError, match=r"supports neither DoRA nor dropout"):
    Adapters(lora_targets=("expert_down",), lora_rank=2, lora_alpha=2.0, lora_dropout=0.1)
  where = "config.stages.sft"
  lora = config_lib.stage(method="lora", peft=dict(targets=["q_proj", "expert_gate_up"],
                                                   dropout=0.05))
  with pytest.raises(ValueError, match=r"config.stages.sft.peft.dropout=0.05: LoRA on the "
                                       r"experts \(\['expert_gate_up'\]\) has no dropout"):
    peft_methods.validate("lora", lora.peft, where)
  lora.peft.dropout = 0.0
  with pytest.raises(ValueError, match=r"config.stages.sft.method='dora': DoRA on the experts"):
    peft_methods.validate("dora", lora.peft, where)
  peft_methods.validate("lora", lora.peft, where)
  moe = llama.abstract_params(_CFG)
  dense_cfg = _CFG.replace(family="llama", num_experts=0)
  with pytest.raises(ValueError, match=r"names \['expert_gate_up'\], but this model has no "
                                       r"experts"):
    peft_methods.prepare(dense_cfg, llama.abstract_params(dense_cfg), lora, None, where=where)
  lora.peft.targets = ["q_proj", "up_proj"]
  with pytest.raises(ValueError, match=r"names \['up_proj'\], but this MoE model's "
                                       r"feed-forward is its experts"):
    peft_methods.prepare(_CFG, moe, lora, None, where=where)
  lora.peft.targets = "all-linear"  # as in PEFT: the attention's linear layers
  cfg, _ = peft_methods.prepare(_CFG, moe, lora, None, where=where)
  assert "q_proj" in cfg.adapters.lora_targets


# ----------------------------------------------------------------------------- bad input

def test_bad_moe_settings_are_refused_with_the_key():
  with pytest.raises(ValueError, match=r"moe_dispatch='sparse' is not one of"):
    _CFG.replace(moe_dispatch="sparse")
  with pytest.raises(ValueError, match=r"router_z_loss_coef=-0.1 must be >= 0"):
    _CFG.replace(router_z_loss_coef=-0.1)
  with pytest.raises(ValueError, match=r"num_experts_per_tok=5"):
    _CFG.replace(num_experts_per_tok=5)
  config = _validation_config()
  config.model.moe_dispatch = "sparse"
  with pytest.raises(ValueError, match=r"config.model.moe_dispatch='sparse' is not one of auto"):
    config_lib.validate(config)
  config.model.moe_dispatch = "auto"
  config.model.router_aux_loss_coef = -1.0
  with pytest.raises(ValueError, match=r"config.model.router_aux_loss_coef=-1.0 must be >= 0"):
    config_lib.validate(config)
  config.model.router_aux_loss_coef = None
  config.model.moe_capacity_factor = 0
  with pytest.raises(ValueError,
                     match=r"config.model.moe_capacity_factor=0.0 must be a number > 0"):
    config_lib.validate(config)
  with pytest.raises(ValueError, match=r"moe_capacity_factor=-1.0 must be > 0"):
    _CFG.replace(moe_capacity_factor=-1.0)


def test_freeze_router_keeps_router_and_needs_one():
  params = llama.init_params(_CFG, jax.random.key(0))
  stage = config_lib.stage(lr=1e-2, freeze_router=True, warmup_ratio=0.0)
  # The router is split off as frozen: no gradient, no optimizer state, no update.
  mask = optim.trainable_mask(params, stage)
  trains = {"/".join(k.key for k in path): m
            for path, m in jax.tree_util.tree_leaves_with_path(mask)}
  assert trains.pop("layers/moe/router_de") is False
  assert all(trains.values()), trains
  tx, _ = optim.build(stage, 10, params)
  train, _ = optim.partition(params, mask)
  grads = jax.tree.map(jnp.ones_like, train)
  updates, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(grads, train)
  moved = {"/".join(k.key for k in path): bool(jnp.any(u != 0))
           for path, u in jax.tree_util.tree_leaves_with_path(updates)}
  assert "layers/moe/router_de" not in moved and all(moved.values()), moved
  dense = llama.init_params(_CFG.replace(family="llama", num_experts=0), jax.random.key(0))
  with pytest.raises(ValueError, match="freeze_router=True, but the model has no MoE router"):
    optim.build(stage, 10, dense)


# ----------------------------------------------------------------------------- training

TINY_MOE = dict(train_fixtures.TINY_MODEL, family="mixtral", num_experts=4,
                num_experts_per_tok=2, intermediate_size=32)


def _validation_config():
  """A run config for validation only (it names no real files)."""
  config = config_lib.base_config()
  config.model.init = dict(TINY_MOE)
  config.tokenizer = "tokenizer"
  config.stages.cpt = config_lib.stage(data=dict(datasets=[]))
  return config


def _run_config(data: pathlib.Path, out: pathlib.Path, steps=3, lora_steps=0, **model):
  """A tiny-Mixtral CPT run on train_fixtures' data, logging every step; with
  ``lora_steps``, then an SFT stage of LoRA on attention and experts."""
  config = train_fixtures.tiny_config(data, out, cpt_steps=steps, sft_steps=lora_steps,
                                      batch_size=8, log_every=1)
  if lora_steps:
    config.stages.sft.update(method="lora", lr=1e-2, warmup_ratio=0.0)
    config.stages.sft.peft.update(targets=list(EXPERT_LORA.lora_targets), rank=2, alpha=4.0)
  else:
    del config.stages["sft"]
  config.model.init = dict(TINY_MOE)
  config.model.update(model)
  return config


def _rows(out: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_aux_loss_is_on_by_default_and_its_coefficient_configurable(hf_model_factory, tmp_path):
  path, _ = hf_model_factory("mixtral")  # config.json: router_aux_loss_coef 0.02
  config = _run_config(tmp_path / "data", tmp_path / "out")
  config.model.init, config.model.source = None, str(path)
  assert trainer.initial_config(config).router_aux_loss_coef == 0.02
  config.model.router_aux_loss_coef, config.model.router_z_loss_coef = 0.1, 1e-3
  cfg = trainer.initial_config(config)
  assert (cfg.router_aux_loss_coef, cfg.router_z_loss_coef) == (0.1, 1e-3)

  cfg, params = hf.load_params(path)
  tokens = jnp.asarray(_tokens(batch=2, seq=16))
  batch = {"tokens": tokens, "segment_ids": jnp.ones_like(tokens),
           "positions": jnp.broadcast_to(jnp.arange(16), tokens.shape),
           "loss_mask": jnp.ones_like(tokens)}
  terms = {}
  for aux_coef, z_coef in ((0.0, 0.0), (0.1, 0.0), (0.1, 1e-2)):
    c = cfg.replace(router_aux_loss_coef=aux_coef, router_z_loss_coef=z_coef)
    (objective, (loss_sum, count, aux)), grad = jax.jit(jax.value_and_grad(
        lambda p: trainer.stage_loss(c, p, batch), has_aux=True))(params)
    terms[aux_coef, z_coef] = float(objective - loss_sum) / float(count)
    terms[aux_coef, z_coef, "router_grad"] = np.asarray(grad["layers"]["moe"]["router_de"])
  assert terms[0.0, 0.0] == 0.0
  np.testing.assert_allclose(terms[0.1, 0.0], 0.1 * float(aux["aux_loss"]), rtol=1e-5)
  np.testing.assert_allclose(terms[0.1, 1e-2] - terms[0.1, 0.0], 1e-2 * float(aux["z_loss"]),
                             rtol=1e-4)
  # Both terms reach the router's gradient.
  assert not np.allclose(terms[0.0, 0.0, "router_grad"], terms[0.1, 0.0, "router_grad"])
  assert not np.allclose(terms[0.1, 0.0, "router_grad"], terms[0.1, 1e-2, "router_grad"])


_SHARDED_RUN = """
import os, sys, pathlib
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, {tests!r})
import jax
import test_moe
from jaxsft import trainer
assert len(jax.devices()) == 8
for name, (mesh, dispatch) in {meshes!r}.items():
  config = test_moe._run_config(pathlib.Path({data!r}), pathlib.Path({root!r}) / name,
                                lora_steps=2, moe_dispatch=dispatch)
  config.mesh.update({{**dict(data=1, fsdp=1, tensor=1, expert=1), **mesh}})
  trainer.train(config)
"""

# One mesh with every axis a MoE step shards over (2 x 2 x 2): the expert
# axis's all-to-all, fsdp's gathers and tensor's reductions in one run.
MESHES = {"fsdp2_tensor2_expert2": (dict(fsdp=2, tensor=2, expert=2), "dropless")}


def test_expert_parallel_training_on_8_devices_matches_one_device(tmp_path, caplog):
  """Dropless MoE training with the expert, fsdp and tensor axes 2 each on 8
  simulated CPU devices, full fine-tuning then LoRA on attention and
  experts: the losses, router statistics and trained weights of one device,
  which runs the bucketed dispatch with buckets too small for every step
  (so each layer picks a bigger one: the other exact path); and the LoRA
  stage changes its factors only."""
  data = tmp_path / "data"
  single = _run_config(data, tmp_path / "single", lora_steps=2, moe_dispatch="bucketed",
                       moe_capacity_factor=0.5)
  with caplog.at_level("WARNING", logger="jaxsft"):
    trainer.train(single)
  script = _SHARDED_RUN.format(tests=str(REPO / "tests"), data=str(data), root=str(tmp_path),
                               meshes=MESHES)
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
  assert result.returncode == 0, result.stderr[-3000:]
  one = [r for r in _rows(tmp_path / "single") if r["split"] == "train"]
  assert [r["stage"] for r in one] == ["cpt"] * 3 + ["sft"] * 2
  for key in ("expert_fraction_min", "expert_fraction_max", "z_loss", "aux_loss"):
    assert all(np.isfinite(r[key]) for r in one), key
  assert all(r["expert_fraction_min"] <= 0.25 <= r["expert_fraction_max"] for r in one)
  # Factor 0.5 buckets hold a quarter of an even share: every layer overflows,
  # and each stage ends with a hint: the busiest expert's share x E, rounded up.
  assert [r["moe_bucket_overflow"] for r in one] == [1.0] * 5
  for stage in ("cpt", "sft"):
    busiest = max(r["expert_fraction_max"] for r in one if r["stage"] == stage) * 4
    hint = [m for m in caplog.messages if m.startswith(f"stage {stage}: 100% of the MoE")]
    assert len(hint) == 1, caplog.messages
    assert f"moe_capacity_factor={np.ceil(busiest * 4) / 4:g} would hold it" in hint[0], hint
  want = {stage: checkpoint_params(tmp_path / "single", stage) for stage in ("cpt", "sft")}
  # LoRA trained every factor (B from 0) and left every base weight bit-identical.
  full, lora = (peft_fixtures.leaves_by_path(want[s]) for s in ("cpt", "sft"))
  factors = {k for k in lora if "_lora_" in k}
  assert {"layers/moe/gate_up_lora_a_edr", "layers/moe/down_lora_b_erd"} <= factors
  assert set(lora) - factors == set(full)
  for k in factors:
    assert "_lora_b_" not in k or np.abs(lora[k]).max() > 1e-3, k
  for k in full:
    np.testing.assert_array_equal(lora[k], full[k], err_msg=k)
  for name in MESHES:
    rows = [r for r in _rows(tmp_path / name) if r["split"] == "train"]
    assert [r["moe_bucket_overflow"] for r in rows] == [0.0] * 5  # dropless has no buckets
    for key in ("loss", "aux_loss", "z_loss", "expert_fraction_min", "expert_fraction_max"):
      np.testing.assert_allclose([r[key] for r in rows], [r[key] for r in one], atol=1e-5,
                                 rtol=0, err_msg=f"{name}: {key}")
    # Weights after 3 AdamW steps at lr 3e-3: Adam's normalized update turns a
    # gradient's last-bit difference (another summation order) into up to
    # ~1e-3 of a weight's value where the gradient is near 0 (1 of 8192 entries).
    for stage in ("cpt", "sft"):
      got = checkpoint_params(tmp_path / name, stage)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-3),
                   want[stage], got)


def checkpoint_params(out: pathlib.Path, stage: str = "cpt"):
  from jaxsft import checkpoint
  _, params = checkpoint.load_model(out / "stages" / stage / "final")
  return jax.tree.map(np.asarray, params)
