"""Training past a model's context: ``model.rope_scaling`` (hf.extend_context)."""
from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import train_fixtures
from jaxsft import checkpoint as checkpoint_lib
from jaxsft import config as config_lib
from jaxsft import hf, trainer
from jaxsft.models import llama

CONTEXT = 32  # the tiny model's max_position_embeddings
SEQ_LEN = 80  # the stage's: ceil(80 / 32) = 3 times the context


def _config(tmp_path, source, rope_scaling, seq_len=SEQ_LEN, steps=1):
  c = train_fixtures.tiny_config(tmp_path / "data", tmp_path / "out", sft_steps=steps,
                                 seq_len=seq_len)
  del c.stages["cpt"]
  c.model.init = None
  c.model.source = str(source)
  c.model.rope_scaling = rope_scaling
  c.tokenizer = None
  return c


def _hf_logits(path, tokens):
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


# What LLaMA-Factory's rope_scaling writes into config.json for a 3x longer
# context (its model_utils/rope.py): the factor, and the old context as the
# original one where the type has it.
EXPECTED = {
    "linear": {"rope_type": "linear", "factor": 3.0},
    "yarn": {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": CONTEXT},
    "llama3": {"rope_type": "llama3", "factor": 3.0, "original_max_position_embeddings": CONTEXT,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0},
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_the_scaled_model_exports_what_transformers_computes(hf_model_factory, tmp_path, kind):
  """The run's config scales RoPE by ceil(seq_len / context); its export loads
  in transformers with that scaling and the same logits past the old context
  (which differ from the unscaled model's there)."""
  path, unscaled = hf_model_factory("llama", max_position_embeddings=CONTEXT)
  config = _config(tmp_path, path, kind)
  config_lib.validate(config)
  cfg = trainer.initial_config(config)
  assert cfg.max_position_embeddings == 3 * CONTEXT
  _, params = hf.load_params(path, cfg=cfg)
  hf.save_params(params, cfg, tmp_path / "hf", tokenizer_src=path)
  written = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert written["max_position_embeddings"] == 3 * CONTEXT
  rope = written.get("rope_scaling") or written["rope_parameters"]
  assert {k: rope[k] for k in EXPECTED[kind]} == EXPECTED[kind]
  tokens = np.random.RandomState(0).randint(3, cfg.vocab_size, (2, 90))
  want = _hf_logits(tmp_path / "hf", tokens)
  got, _ = llama.forward(cfg, params, jnp.asarray(tokens))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
  with torch.no_grad():
    before = unscaled(torch.tensor(tokens)).logits.numpy()
  assert np.abs(before[:, CONTEXT:] - want[:, CONTEXT:]).max() > 1e-2


def test_a_run_trains_past_the_context_and_exports_it(hf_model_factory, tmp_path):
  """seq_len 80 on a 32-token model is refused; with rope_scaling='linear' the
  same command trains in the same directory, and its Hugging Face export
  computes what the final checkpoint does."""
  path, _ = hf_model_factory("llama", max_position_embeddings=CONTEXT)
  config = _config(tmp_path, path, None)
  with pytest.raises(ValueError, match=r"seq_len=80 exceeds the model's context of 32 .*"
                                       r"config\.model\.rope_scaling='linear'"):
    trainer.train(config)
  config.model.rope_scaling = "linear"
  config.export.hf = True
  out = pathlib.Path(trainer.train(config))
  final = out / "stages" / "sft" / "final"
  cfg, params = checkpoint_lib.load_model(final)
  assert dict(cfg.rope_scaling) == EXPECTED["linear"] and cfg.max_position_embeddings == 96
  # A later run from this checkpoint with the same setting scales nothing twice.
  config.model.source = str(final)
  assert trainer.initial_config(config).rope_scaling == cfg.rope_scaling
  tokens = np.random.RandomState(1).randint(3, cfg.vocab_size, (1, 90))
  got, _ = llama.forward(cfg, params, jnp.asarray(tokens))
  np.testing.assert_allclose(np.asarray(got), _hf_logits(out / "hf", tokens), atol=1e-4, rtol=0)


def test_what_cannot_be_applied_is_refused_with_why(hf_model_factory, tmp_path):
  path, _ = hf_model_factory("llama", max_position_embeddings=CONTEXT)
  for spec, message in [
      ("dynamic", "dynamic NTK scaling changes RoPE's base with the longest position"),
      ({"rope_type": "dynamic", "factor": 2.0}, "fine-tune with linear, yarn or llama3"),
      ("ntk", r"give one of \('linear', 'yarn', 'llama3'\)"),
      ({"rope_type": "linear", "factor": 0.5}, "'factor' must be a number >= 1, got 0.5")]:
    with pytest.raises(ValueError, match=r"config\.model\.rope_scaling.*" + message):
      config_lib.validate(_config(tmp_path, path, spec))
  scaled, _ = hf_model_factory("llama3")  # already scales RoPE (llama3, factor 8)
  with pytest.raises(ValueError, match="already scales RoPE .* drop config.model.rope_scaling"):
    trainer.initial_config(_config(tmp_path, scaled, "linear", seq_len=512))


def test_a_stage_within_the_context_leaves_rope_alone(hf_model_factory, tmp_path):
  """As LLaMA-Factory: a type name with no stage past the context changes nothing;
  a dict applies as given."""
  path, _ = hf_model_factory("llama", max_position_embeddings=CONTEXT)
  plain = trainer.initial_config(_config(tmp_path, path, None, seq_len=CONTEXT))
  assert trainer.initial_config(_config(tmp_path, path, "yarn", seq_len=CONTEXT)) == plain
  cfg = trainer.initial_config(
      _config(tmp_path, path, {"rope_type": "linear", "factor": 2.0}, seq_len=CONTEXT))
  assert dict(cfg.rope_scaling) == {"rope_type": "linear", "factor": 2.0}
  assert cfg.max_position_embeddings == 2 * CONTEXT
  # A checkpoint that carries it already is not scaled twice (yarn would take
  # the grown context for its original one).
  yarn = hf.extend_context(plain, {"rope_type": "yarn", "factor": 2.0}, CONTEXT)
  assert hf.extend_context(yarn, {"rope_type": "yarn", "factor": 2.0}, CONTEXT) == yarn
  assert dict(yarn.rope_scaling)["original_max_position_embeddings"] == CONTEXT
