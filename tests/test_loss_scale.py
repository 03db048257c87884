"""float16 training's dynamic loss scaling (``optim.dynamic_loss_scale``)
against torch.amp.GradScaler's update rule, and through the train step."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import train_fixtures
from jaxsft import config as config_lib
from jaxsft import optim, trainer
from jaxsft.models import llama
from jaxsft.models.model_config import ModelConfig


def test_the_scale_follows_grad_scalers_rule():
  """Fed the same finite / overflowed gradients, the scale and the count of
  finite steps in a row are those of torch's ``_amp_update_scale_`` (the
  kernel GradScaler.update runs; growth 2, backoff 0.5, interval 3), and an
  overflowed step changes neither the parameters nor the inner state."""
  interval, init = 3, 2.0 ** 10
  tx = optim.dynamic_loss_scale(optax.adam(0.1), init, interval)
  params = {"w": jnp.ones((4,))}
  state = tx.init(params)
  update = jax.jit(tx.update)
  scale, tracker = torch.tensor([init]), torch.tensor([0], dtype=torch.int32)
  pattern = [1, 1, 0, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1]
  skipped = 0
  for ok in pattern:
    grads = {"w": jnp.full((4,), 0.5 if ok else jnp.inf)}
    updates, new = update(grads, state, params)
    found_inf = torch.tensor([0.0 if ok else 1.0])
    torch._amp_update_scale_(scale, tracker, found_inf, 2.0, 0.5, interval)
    assert float(new.scale) == float(scale[0]) and int(new.good_steps) == int(tracker[0])
    if ok:
      assert not np.allclose(updates["w"], 0)
    else:
      skipped += 1
      np.testing.assert_array_equal(updates["w"], 0)
      for a, b in zip(jax.tree.leaves(new.inner), jax.tree.leaves(state.inner)):
        np.testing.assert_array_equal(a, b)
    assert int(new.skipped) == skipped
    state = new
  assert float(state.scale) == init  # three growths, three backoffs


def _setup(dtype, stage):
  cfg = ModelConfig(**{**train_fixtures.TINY_MODEL, "vocab_size": 64, "dtype": dtype})
  params = llama.init_params(cfg, jax.random.key(0))
  rng = np.random.RandomState(0)
  tokens = rng.randint(3, 64, (4, 16)).astype(np.int32)
  batch = {"tokens": tokens, "loss_mask": np.ones_like(tokens),
           "segment_ids": np.ones_like(tokens),
           "positions": np.broadcast_to(np.arange(16, dtype=np.int32), tokens.shape).copy()}
  tx, lr = optim.build(stage, 4, params, cfg.dtype)
  step = jax.jit(trainer.make_train_step(cfg, tx, lr, 2))
  return params, trainer.init_state(params, tx, seed=0), step, batch


def test_the_step_scales_the_loss_and_unscales_the_gradients():
  """A power-of-two scale is exact: the float32 step wrapped in the scaler
  updates the weights bit for bit as the plain step does, while the scaled
  loss really entered the backward pass (a scale of 3e38 overflows fp32
  and skips the step)."""
  stage = config_lib.stage(lr=1e-2, steps=4, warmup_ratio=0.0, grad_accum=2)
  params, state, step, batch = _setup("float32", stage)
  plain, plain_metrics = step(state, batch)
  assert optim.loss_scale(state.opt_state) is None and "loss_scale" not in plain_metrics

  def scaled_step(init):
    tx = optim.dynamic_loss_scale(optim.build(stage, 4, params)[0], init, 2000)
    cfg = ModelConfig(**{**train_fixtures.TINY_MODEL, "vocab_size": 64, "dtype": "float32"})
    s = trainer.init_state(params, tx, seed=0)
    return jax.jit(trainer.make_train_step(cfg, tx, optim.schedule(stage, 4), 2))(s, batch)

  scaled, metrics = scaled_step(2.0 ** 12)
  assert float(metrics["loss_scale"]) == 2.0 ** 12 and int(metrics["skipped_steps"]) == 0
  assert float(metrics["loss"]) == float(plain_metrics["loss"])
  for a, b in zip(jax.tree.leaves(scaled.params), jax.tree.leaves(plain.params)):
    np.testing.assert_array_equal(a, b)
  overflowed, metrics = scaled_step(3e38)
  assert int(metrics["skipped_steps"]) == 1
  assert float(optim.loss_scale(overflowed.opt_state)) == pytest.approx(1.5e38)
  for a, b in zip(jax.tree.leaves(overflowed.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_float16_training_skips_overflowed_steps_and_then_learns():
  """model.dtype float16 wraps the optimizer (stage.loss_scale): a scale far
  too large overflows the fp16 backward pass, those steps are skipped with
  the weights untouched and the scale halved each time, and once it fits the
  loss goes down."""
  stage = config_lib.stage(lr=1e-2, steps=4, warmup_ratio=0.0, grad_accum=2,
                           loss_scale=2.0 ** 40, loss_scale_interval=2000)
  params, state, step, batch = _setup("float16", stage)
  first, metrics = step(state, batch)
  assert int(metrics["skipped_steps"]) == 1 and float(metrics["loss_scale"]) == 2.0 ** 40
  assert not np.isfinite(float(metrics["grad_norm"]))
  for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  state, losses, scales = first, [float(metrics["loss"])], [2.0 ** 40]
  for _ in range(40):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
    scales.append(float(metrics["loss_scale"]))
  skipped = int(state.opt_state.skipped)
  assert 1 < skipped < 40 and scales[skipped] == 2.0 ** (40 - skipped)
  assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.5, losses


def test_loss_scale_keys_are_checked(tmp_path):
  data = tmp_path / "a.jsonl"
  data.write_text('{"text": "hello"}\n')

  def stage(**kw):
    return config_lib.stage(**kw, data=dict(datasets=[str(data)]))

  with pytest.raises(ValueError, match=r"stages.sft.loss_scale=0.0 must be a positive number"):
    config_lib.validate_stage("sft", stage(loss_scale=0))
  with pytest.raises(ValueError, match=r"loss_scale_interval=0 must be at least 1"):
    config_lib.validate_stage("sft", stage(loss_scale_interval=0))
  config_lib.validate_stage("sft", stage(loss_scale=2.0 ** 16))


def test_a_resumed_float16_stage_keeps_its_loss_scale(tmp_path):
  """The scale and its counters are optimizer state: a stage resumed from a
  mid-stage checkpoint ends with the weights, scale and skipped-step count of
  an uninterrupted run."""
  import json
  import shutil

  from jaxsft import checkpoint as checkpoint_lib

  def config(out):
    c = train_fixtures.tiny_config(tmp_path / "data", out, cpt_steps=8)
    del c.stages["sft"]
    c.model.dtype = "float16"
    c.stages.cpt.update(loss_scale=2.0 ** 16, loss_scale_interval=2, checkpoint_every=4,
                        keep_checkpoints=3, log_every=1)
    return c

  ref = trainer.train(config(tmp_path / "ref"))
  resumed = tmp_path / "resumed"
  shutil.copytree(ref, resumed)
  stage = resumed / "stages" / "cpt"
  shutil.rmtree(stage / "final")
  shutil.rmtree(stage / "checkpoints" / "8")
  trainer.train(config(resumed))

  def last_row(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("split") == "train"][-1]

  want, got = last_row(ref), last_row(resumed)
  assert want["step"] == got["step"] == 8
  assert 0 < want["skipped_steps"] == got["skipped_steps"] < 8
  assert want["loss_scale"] == got["loss_scale"] and want["loss"] == got["loss"]
  a = checkpoint_lib.load_model(ref / "stages" / "cpt" / "final")[1]
  b = checkpoint_lib.load_model(stage / "final")[1]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
