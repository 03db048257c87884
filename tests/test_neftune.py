"""NEFTune (a stage's ``neftune_noise_alpha``) against transformers' own hook."""
from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import train_fixtures
from transformers.integrations import neftune as hf_neftune

from jaxsft import config as config_lib
from jaxsft import hf, trainer
from jaxsft.models import llama


def _hf_noise(model, tokens, alpha):
  """What transformers' NEFTune hook adds to the embeddings of ``tokens`` in training mode."""
  emb = model.get_input_embeddings()
  with torch.no_grad():
    clean = emb(torch.tensor(tokens)).numpy()
    handle = hf_neftune.activate_neftune(model, alpha)
    model.train()
    try:
      noisy = emb(torch.tensor(tokens)).numpy()
    finally:
      model.eval()
      hf_neftune.deactivate_neftune(model, handle)
  return noisy - clean


def _embeddings(cfg, params, tokens, rng=None):
  """The embeddings jaxsft's decoder runs on (after any noise), and its hidden states."""
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  hidden, state = llama.Transformer(cfg).apply(
      {"params": params}, jnp.asarray(tokens), positions, None, capture_intermediates=True,
      rngs={} if rng is None else {"dropout": rng}, mutable=["intermediates"])
  return np.asarray(state["intermediates"]["embed"]["__call__"][0]), hidden[0]


@pytest.mark.parametrize("alpha,seq", [(5.0, 64), (15.0, 24)])
def test_noise_has_the_distribution_of_transformers_neftune(hf_model_factory, alpha, seq):
  """Uniform on [-m, m] with transformers' m = alpha / sqrt(T * D): the largest
  |noise| of ~16k draws lies within 0.1% of m for both, so their maxima agree
  closely; mean and spread agree with each other too."""
  path, model = hf_model_factory("llama")
  cfg, params = hf.load_params(path)
  tokens = np.random.RandomState(0).randint(3, cfg.vocab_size, (16384 // (seq * 64), seq))
  want = _hf_noise(model, tokens, alpha)
  clean, _ = _embeddings(cfg, params, tokens)
  noisy, _ = _embeddings(cfg.replace(neftune_noise_alpha=alpha), params, tokens,
                         jax.random.key(1))
  got = noisy - clean
  assert got.shape == want.shape
  np.testing.assert_allclose(np.abs(got).max(), np.abs(want).max(), rtol=2e-3)
  np.testing.assert_allclose(got.std(), want.std(), rtol=0.05)
  assert abs(got.mean()) < 0.03 * want.std() and abs(want.mean()) < 0.03 * want.std()


def test_the_decoder_runs_on_the_noisy_embeddings_as_transformers_would(hf_model_factory):
  """Fed the same noisy embeddings (``inputs_embeds``), transformers computes
  jaxsft's hidden states: the noise enters where NEFTune's hook puts it."""
  path, model = hf_model_factory("llama")
  cfg, params = hf.load_params(path)
  tokens = np.random.RandomState(1).randint(3, cfg.vocab_size, (2, 24))
  cfg = cfg.replace(neftune_noise_alpha=10.0)
  noisy, hidden = _embeddings(cfg, params, tokens, jax.random.key(2))
  clean, clean_hidden = _embeddings(cfg, params, tokens)  # no rng: no noise
  assert np.abs(noisy - clean).max() > 0.05
  with torch.no_grad():
    ref = model.model(inputs_embeds=torch.tensor(noisy)).last_hidden_state.numpy()
  np.testing.assert_allclose(np.asarray(hidden), ref, atol=1e-4, rtol=0)
  assert np.abs(np.asarray(clean_hidden) - ref).max() > 1e-2


def test_prompt_tuning_slots_keep_their_embeddings():
  """PEFT adds its virtual tokens after the hook: only real tokens get noise."""
  tokens = jnp.asarray([[-1, -2, 5, 6, 7], [-1, -2, 8, 0, 0]])
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  out = llama.neftune_noise(jax.random.key(3), tokens, x, 5.0)
  virtual = np.asarray(tokens < 0)
  np.testing.assert_array_equal(np.asarray(out)[virtual], np.asarray(x)[virtual])
  assert (np.asarray(out != x)[~virtual]).all()
  assert np.abs(np.asarray(out - x)).max() <= 5.0 / np.sqrt(5 * 16) * (1 + 1e-6)


def test_the_train_step_adds_noise_and_evaluation_does_not(hf_model_factory):
  """A stage with NEFTune trains on noisy embeddings (its loss and update
  differ, the same each time for the same state); its eval step does not."""
  path, _ = hf_model_factory("llama")
  cfg, params = hf.load_params(path)
  rs = np.random.RandomState(2)
  batch = {"tokens": jnp.asarray(rs.randint(3, cfg.vocab_size, (2, 24))),
           "loss_mask": jnp.ones((2, 24), jnp.float32)}
  tx = optax.adamw(1e-3)
  lr = lambda step: 1e-3  # noqa: E731
  results = {}
  for alpha in (0.0, 5.0):
    step = jax.jit(trainer.make_train_step(cfg.replace(neftune_noise_alpha=alpha), tx, lr, 1))
    state = trainer.init_state(params, tx, seed=0)
    (new, m), (_, m2) = step(state, batch), step(state, batch)
    np.testing.assert_array_equal(m["loss"], m2["loss"])
    results[alpha] = m["loss"], new.params
    evaluated = trainer.make_eval_step(cfg.replace(neftune_noise_alpha=alpha))(params, batch)
    results[alpha, "eval"] = jax.tree_util.tree_map(np.asarray, evaluated)
  assert abs(float(results[0.0][0]) - float(results[5.0][0])) > 1e-4
  leaf = lambda p: np.asarray(p["embed"]["embedding_vd"])  # noqa: E731
  assert np.abs(leaf(results[0.0][1]) - leaf(results[5.0][1])).max() > 0
  jax.tree_util.tree_map(np.testing.assert_array_equal, results[0.0, "eval"],
                         results[5.0, "eval"])


def _first_loss(config) -> float:
  trainer.train(config)
  rows = [json.loads(line) for line in
          (pathlib.Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
  return next(r["loss"] for r in rows if r.get("split") == "train" and r["step"] == 1)


def test_the_stage_key_is_checked_and_reaches_the_train_step(tmp_path):
  """A stage's ``neftune_noise_alpha`` changes its first step's loss
  (same weights, same batch: only the noise differs); a negative one is
  refused with its key."""
  losses = []
  for alpha in (0.0, 5.0):
    c = train_fixtures.tiny_config(tmp_path / "data", tmp_path / f"out{alpha}", sft_steps=1)
    del c.stages["cpt"]
    c.stages.sft.neftune_noise_alpha = alpha
    losses.append(_first_loss(c))
  assert abs(losses[0] - losses[1]) > 1e-4, losses
  c.stages.sft.neftune_noise_alpha = -1.0
  with pytest.raises(ValueError, match=r"config\.stages\.sft\.neftune_noise_alpha=-1\.0"):
    config_lib.validate(c)
