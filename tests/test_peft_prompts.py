"""Prompt tuning, P-tuning, prefix tuning, bottleneck adapters and freeze tuning:
parity with peft (fp32, tiny models), packing, training, export and bad input."""
from __future__ import annotations


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
from jaxsft import checkpoint as checkpoint_lib
from jaxsft import config as config_lib
from jaxsft import export as export_lib
from jaxsft import generate as generate_lib
from jaxsft import hf, optim, trainer
from jaxsft.models import llama
from jaxsft.peft import methods, prompts

TOKENS = np.random.default_rng(0).integers(3, hf_builders.VOCAB, size=(2, 12))


def _stage(method, **peft_kw):
  return config_lib.stage(method=method, peft=dict(dict(virtual_tokens=5), **peft_kw))


def _randomize(params, top: str, scale=0.3, seed=1):
  """Non-trivial values for the adapter subtree ``top`` (as training would give)."""
  rng = np.random.default_rng(seed)
  out = dict(params)
  out[top] = jax.tree_util.tree_map(
      lambda x: jnp.asarray(scale * rng.standard_normal(x.shape).astype(np.float32)), params[top])
  return out


def _ours(cfg, params, tokens) -> np.ndarray:
  """Our logits for ``tokens`` as PEFT computes them: with prompt tuning the
  virtual slots stand first (their logits included, as PEFT returns them)."""
  n = cfg.adapters.virtual_tokens
  if n:
    tokens = np.concatenate([np.broadcast_to(prompts.virtual_ids(n), (len(tokens), n)), tokens],
                            axis=1)
  logits, _ = _forward(cfg, params, jnp.asarray(tokens))
  return np.asarray(logits)


_forward = jax.jit(llama.forward, static_argnums=0)


@pytest.mark.parametrize("method,peft_kw,variant,top", [
    ("prompt", {}, "llama", "prompt"),
    ("p_tuning", dict(encoder="mlp", encoder_hidden=24), "llama", "prompt"),
    ("p_tuning", dict(encoder="lstm", encoder_hidden=16), "qwen2", "prompt"),
    ("prefix", {}, "llama", "prefix"),  # GQA: 4 heads, 2 kv heads
    ("prefix", dict(prefix_projection_hidden=24), "mistral", "prefix"),
])
def test_peft_loads_the_prompt_adapter_with_equal_logits(tmp_path, method, peft_kw, variant,
                                                         top):
  hf_dir = peft_fixtures.hf_dir(tmp_path, variant)
  cfg, params = hf.load_params(hf_dir)
  cfg, params = methods.prepare(cfg, params, _stage(method, **peft_kw), jax.random.key(0))
  params = _randomize(params, top)
  ours = _ours(cfg, params, TOKENS)
  base, _ = llama.forward(cfg.replace(adapters=None), methods.base_params(params), TOKENS)
  assert np.abs(ours[:, -TOKENS.shape[1]:] - np.asarray(base)).max() > 1e-2  # it matters

  ckpt = tmp_path / "ckpt"
  checkpoint_lib.save_model(ckpt, params, cfg, tokenizer_src=hf_dir)
  out = export_lib.export(ckpt, tmp_path / "adapter", peft=True, base_model=str(hf_dir))
  model = peft.PeftModel.from_pretrained(
      transformers.AutoModelForCausalLM.from_pretrained(hf_dir), out).eval()
  theirs = peft_fixtures.torch_logits(model, TOKENS)
  assert theirs.shape == ours.shape
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_prompt_encoder_computes_what_peft_prompt_encoder_computes(encoder):
  """Our P-tuning encoder against PEFT's PromptEncoder (training mode), same weights."""
  from peft.tuners.p_tuning.model import PromptEncoder
  cfg = llama.ModelConfig(**train_fixtures.TINY_MODEL)
  p, d, h = 5, cfg.hidden_size, 12
  cfg = cfg.replace(adapters=methods.adapters_for(
      "p_tuning", _stage("p_tuning", encoder=encoder, encoder_hidden=h).peft))
  params = llama.init_params(cfg, jax.random.key(0))
  torch.manual_seed(0)
  theirs = PromptEncoder(peft.PromptEncoderConfig(
      task_type="CAUSAL_LM", num_virtual_tokens=p, token_dim=d, num_transformer_submodules=1,
      num_attention_heads=4, num_layers=2, encoder_hidden_size=h,
      encoder_reparameterization_type=encoder.upper())).eval()
  sd = {k: v.detach().numpy() for k, v in theirs.state_dict().items()}
  mine = {"embedding_pd": sd["embedding.weight"]}
  if encoder == "mlp":
    for i, t in ((0, 0), (1, 2), (2, 4)):
      mine[f"mlp{i}"] = {}
      for k, v in params["prompt"][f"mlp{i}"].items():
        mine[f"mlp{i}"][k] = (sd[f"mlp_head.{t}.weight"].T if k.startswith("w_") else
                              sd[f"mlp_head.{t}.bias"])
  else:
    for layer in range(2):
      for direction, suffix in (("fwd", ""), ("bwd", "_reverse")):
        name = f"lstm{layer}_{direction}"
        mine[f"{name}_in_jg"] = sd[f"lstm_head.weight_ih_l{layer}{suffix}"].T
        mine[f"{name}_rec_jg"] = sd[f"lstm_head.weight_hh_l{layer}{suffix}"].T
        mine[f"{name}_bias_g"] = (sd[f"lstm_head.bias_ih_l{layer}{suffix}"]
                                  + sd[f"lstm_head.bias_hh_l{layer}{suffix}"])
    for i, t in ((0, 0), (1, 2)):
      mine[f"head{i}"] = {}
      for k in params["prompt"][f"head{i}"]:
        mine[f"head{i}"][k] = (sd[f"mlp_head.{t}.weight"].T if k.startswith("w_") else
                               sd[f"mlp_head.{t}.bias"])
  assert jax.tree_util.tree_structure(mine) == jax.tree_util.tree_structure(
      jax.tree_util.tree_map(np.asarray, dict(params["prompt"])))
  params = {**params, "prompt": jax.tree_util.tree_map(jnp.asarray, mine)}
  ours = llama.Transformer(cfg).apply({"params": params},
                                      method=llama.Transformer.virtual_embeddings)
  with torch.no_grad():
    expected = theirs(torch.arange(p)[None])[0].numpy()
  np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-5, rtol=0)


def test_prompt_init_from_text_matches_peft(tmp_path):
  hf_dir = peft_fixtures.hf_dir(tmp_path)
  tok = hf.load_tokenizer(hf_dir)
  cfg, params = hf.load_params(hf_dir)
  text = "The fox"
  n = 2 * len(tok(text)["input_ids"]) + 1  # PEFT repeats the ids, then cuts them
  _, params = methods.prepare(cfg, params, _stage("prompt", virtual_tokens=n,
                                                  prompt_init_text=text),
                              jax.random.key(0), tokenizer=tok)
  model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(hf_dir),
                              peft.PromptTuningConfig(
                                  task_type="CAUSAL_LM", num_virtual_tokens=n,
                                  prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
                                  tokenizer_name_or_path=str(hf_dir)))
  expected = model.prompt_encoder["default"].embedding.weight.detach().numpy()
  np.testing.assert_array_equal(np.asarray(params["prompt"]["embedding_pd"]), expected)


@pytest.mark.parametrize("method,peft_kw", [("prompt", {}), ("prefix", {})])
def test_packed_examples_each_get_their_own_prompt(tmp_path, method, peft_kw):
  """Two examples packed in one row (as the pipeline lays them out) compute what
  each computes alone."""
  cfg = llama.ModelConfig(**train_fixtures.TINY_MODEL)
  cfg, params = methods.prepare(cfg, llama.init_params(cfg, jax.random.key(0)),
                                _stage(method, **peft_kw), jax.random.key(1))
  top = "prompt" if method == "prompt" else "prefix"
  params = _randomize(params, top)
  n = cfg.adapters.virtual_tokens
  a, b = TOKENS[0, :7], TOKENS[1, :5]
  lead = prompts.virtual_ids(n)
  seqs = [np.concatenate([lead, a]), np.concatenate([lead, b])] if n else [a, b]
  row = np.concatenate(seqs)[None]
  segs = np.concatenate([np.full(len(s), i + 1) for i, s in enumerate(seqs)])[None]
  pos = np.concatenate([np.arange(len(s)) for s in seqs])[None]
  packed, _ = _forward(cfg, params, jnp.asarray(row), jnp.asarray(pos), jnp.asarray(segs))
  alone = [np.asarray(_forward(cfg, params, jnp.asarray(s[None]))[0])[0] for s in seqs]
  np.testing.assert_allclose(np.asarray(packed)[0], np.concatenate(alone), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_generation_with_prompts_continues_the_full_forward(method):
  """Greedy decoding over the KV cache (virtual tokens prepended / prefixes in
  the cache) picks what the full forward pass ranks first at every step."""
  cfg = llama.ModelConfig(**train_fixtures.TINY_MODEL)
  cfg, params = methods.prepare(cfg, llama.init_params(cfg, jax.random.key(0)),
                                _stage(method), jax.random.key(1))
  params = _randomize(params, "prompt" if method == "prompt" else "prefix", scale=1.0)
  prompt = TOKENS[0, :6].tolist()
  [new] = generate_lib.generate(cfg, params, [prompt], 6, eos_token_ids=())
  # Teacher-forced over the whole result: each new token is the argmax after its prefix.
  logits = _ours(cfg, params, np.asarray([prompt + new]))[0]
  assert np.argmax(logits[-7:-1], axis=-1).tolist() == new


def _one_stage_config(tmp_path, hf_dir, method, steps=2, **peft_kw):
  return peft_fixtures.one_stage_config(tmp_path, hf_dir, method, steps,
                                        dict(dict(virtual_tokens=4), **peft_kw))


@pytest.mark.parametrize("method,peft_kw,top", [
    ("prompt", dict(prompt_init_text="add"), "prompt"),
    ("p_tuning", dict(encoder="mlp", encoder_hidden=16), "prompt"),
    ("prefix", dict(prefix_projection_hidden=16), "prefix"),
    ("adapter", dict(bottleneck_size=8), None),
])
def test_training_moves_only_the_method_parameters(tmp_path, method, peft_kw, top):
  hf_dir = peft_fixtures.hf_dir(tmp_path)
  c = _one_stage_config(tmp_path, hf_dir, method, **peft_kw)
  out = trainer.train(c)
  cfg, params = checkpoint_lib.load_model(out / "stages" / "sft" / "final")
  _, start = hf.load_params(hf_dir)
  trained = peft_fixtures.leaves_by_path(params)
  base = peft_fixtures.leaves_by_path(methods.base_params(params))
  assert base.keys() == peft_fixtures.leaves_by_path(start).keys()
  for path, x in peft_fixtures.leaves_by_path(start).items():
    np.testing.assert_array_equal(trained[path], x, err_msg=f"frozen {path} changed")
  # The method's own parameters moved away from their initial values.
  rng = jax.random.fold_in(jax.random.PRNGKey(c.seed), trainer._stable_hash("sft"))
  _, init = methods.prepare(*hf.load_params(hf_dir), c.stages.sft, rng,
                            tokenizer=hf.load_tokenizer(hf_dir))
  added = {p: x for p, x in peft_fixtures.leaves_by_path(init).items() if p not in base}
  assert added and all(p.startswith(top) if top else "/adapter_" in p for p in added)
  for path, x in added.items():
    assert not np.array_equal(trained[path], x), f"{path} did not train"


def test_bottleneck_adapter_starts_as_the_identity_and_export_is_refused(tmp_path, capsys):
  hf_dir = peft_fixtures.hf_dir(tmp_path)
  cfg, params = hf.load_params(hf_dir)
  base = _ours_plain(cfg, params)
  cfg2, params2 = methods.prepare(cfg, params, _stage("adapter", bottleneck_size=8),
                                  jax.random.key(0))
  assert float(jnp.abs(params2["layers"]["adapter_mlp"]["down_dr"]).max()) > 0
  np.testing.assert_array_equal(_ours_plain(cfg2, params2), base)
  params2 = _randomize_layers(params2)
  assert np.abs(_ours_plain(cfg2, params2) - base).max() > 1e-3
  ckpt = tmp_path / "ck"
  checkpoint_lib.save_model(ckpt, params2, cfg2, tokenizer_src=hf_dir)
  for extra in (["--peft"], []):
    assert export_lib.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "o")]
                           + extra) == 2
    err = capsys.readouterr().err
    assert "bottleneck adapters" in err and "jaxsft checkpoint" in err
    assert not (tmp_path / "o").exists()


def _ours_plain(cfg, params) -> np.ndarray:
  return np.asarray(_forward(cfg, params, jnp.asarray(TOKENS))[0])


def _randomize_layers(params):
  layers = dict(params["layers"])
  for name in ("adapter_attn", "adapter_mlp"):
    layers[name] = _randomize({name: layers[name]}, name, scale=0.2)[name]
  return {**params, "layers": layers}


def test_freeze_trains_the_last_layers_splits_the_stack_and_resumes(tmp_path):
  hf_dir = peft_fixtures.hf_dir(tmp_path)
  c = _one_stage_config(tmp_path, hf_dir, "freeze", steps=4, train_layers=1,
                        train_modules="final_norm")
  out = trainer.train(c)
  cfg, params = checkpoint_lib.load_model(out / "stages" / "sft" / "final")
  assert cfg.adapters is None and params["layers"]["attn"]["q_dnh"].shape[0] == 2  # canonical
  _, start = hf.load_params(hf_dir)
  trained = peft_fixtures.leaves_by_path(params)
  for path, x in peft_fixtures.leaves_by_path(start).items():
    if path.startswith("layers/"):
      np.testing.assert_array_equal(trained[path][0], x[0], err_msg=f"frozen layer 0 {path}")
      assert not np.array_equal(trained[path][1], x[1]), f"layer 1 {path} did not train"
    elif path.startswith("final_norm"):
      assert not np.array_equal(trained[path], x)
    else:
      np.testing.assert_array_equal(trained[path], x, err_msg=f"frozen {path} changed")
  # Step checkpoints keep the split layout, and resuming from one continues exactly.
  resumed = peft_fixtures.resumed_leaves(c, out, tmp_path / "resumed", "sft", 2)
  for path, x in resumed.items():
    np.testing.assert_array_equal(x, trained[path], err_msg=f"resumed: {path}")


def _matmul_flops(jaxpr) -> float:
  """2·M·N·K of every dot_general in ``jaxpr``, scan bodies times their length.
  (XLA's cost analysis counts a while-loop body once, whatever its trip count,
  so it cannot tell 4 scanned layers from 1.)"""
  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      k = np.prod([eqn.invars[0].aval.shape[d] for d in contract])
      total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * k
      continue
    times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
    for sub in _sub_jaxprs(eqn.params.values()):
      total += times * _matmul_flops(sub)
  return total


def _sub_jaxprs(values):
  for v in values:
    if isinstance(v, (tuple, list)):
      yield from _sub_jaxprs(v)
    elif hasattr(v, "eqns"):
      yield v
    elif hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
      yield v.jaxpr


def _step_cost(cfg, params, stage, batch):
  """(matmul FLOPs of one train step, optimizer-state elements)."""
  tx, lr = optim.build(stage, 4, params)
  mask = optim.trainable_mask(params, stage)
  state = trainer.init_state(params, tx, 0, mask)
  step = trainer.make_train_step(cfg, tx, lr, 1, mask)
  flops = _matmul_flops(jax.make_jaxpr(step)(state, batch).jaxpr)
  n_state = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state))
  return flops, n_state


def test_freeze_step_computes_no_backward_through_the_frozen_layers():
  # Layers wide enough to dominate the step (the embedding and loss cost the same in both).
  cfg = llama.ModelConfig(**{**train_fixtures.TINY_MODEL, "num_layers": 4, "hidden_size": 64,
                             "intermediate_size": 512, "head_dim": 16})
  params = llama.init_params(cfg, jax.random.key(0))
  batch = {"tokens": jnp.asarray(TOKENS), "loss_mask": jnp.ones(TOKENS.shape, jnp.int32),
           "segment_ids": jnp.ones(TOKENS.shape, jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(12), TOKENS.shape)}
  full = config_lib.stage(method="full")
  freeze = config_lib.stage(method="freeze", peft=dict(train_layers=1))
  cfg_f, params_f = methods.prepare(cfg, params, freeze, jax.random.key(1))
  assert cfg_f.adapters.frozen_layers == 3 and params_f["layers_frozen"]["mlp"]["up_df"].shape[0] == 3
  full_flops, full_state = _step_cost(cfg, params, full, batch)
  freeze_flops, freeze_state = _step_cost(cfg_f, params_f, freeze, batch)
  # Forward of 4 layers + backward of 1 (≈ 2 forwards) vs forward + backward of 4.
  assert freeze_flops < 0.7 * full_flops, (freeze_flops, full_flops)
  n_layer = sum(x.size for x in jax.tree_util.tree_leaves(params_f["layers"]))
  assert 2 * n_layer <= freeze_state <= 2 * n_layer + 4
  # The split stack computes exactly the single stack's function.
  np.testing.assert_array_equal(np.asarray(_forward(cfg_f, params_f, batch["tokens"])[0]),
                                np.asarray(_forward(cfg, params, batch["tokens"])[0]))


@pytest.mark.parametrize("method,peft_kw,needle", [
    ("prompt", dict(virtual_tokens=0), "virtual_tokens=0"),
    ("prefix", dict(virtual_tokens=-1), "virtual_tokens=-1"),
    ("p_tuning", dict(encoder="gru"), "encoder='gru'"),
    ("adapter", dict(bottleneck_size=0), "bottleneck_size=0"),
    ("freeze", dict(train_layers=0), "train_layers=0"),
])
def test_bad_method_settings_name_the_key(tmp_path, method, peft_kw, needle):
  c = train_fixtures.tiny_config(tmp_path / "d", tmp_path / "o")
  c.stages.sft.method = method
  c.stages.sft.peft.update(peft_kw)
  with pytest.raises(ValueError, match=needle) as e:
    config_lib.validate(c)
  assert "config.stages.sft.peft" in str(e.value)


@pytest.mark.parametrize("peft_kw,needle", [
    (dict(train_layers=3), "train_layers=3 exceeds the model's 2 layers"),
    (dict(train_modules="mlp_head"), "matches no parameter.*modules: .*layers/mlp"),
])
def test_freeze_settings_checked_against_the_model(peft_kw, needle):
  cfg = llama.ModelConfig(**train_fixtures.TINY_MODEL)
  params = llama.abstract_params(cfg)
  with pytest.raises(ValueError, match=needle) as e:
    methods.prepare(cfg, params, config_lib.stage(method="freeze", peft=peft_kw),
                    jax.random.key(0), where="config.stages.sft")
  assert "config.stages.sft.peft" in str(e.value)


@pytest.mark.parametrize("method,hf_export,needle", [
    ("prefix", False, "stage 'cpt' trains 'prefix'.*cannot start from a plain model"),
    ("adapter", True, "export.hf.*no merged"),
])
def test_unmergeable_methods_cannot_be_followed_or_exported(tmp_path, method, hf_export, needle):
  c = train_fixtures.tiny_config(tmp_path / "d", tmp_path / "o")
  if hf_export:
    c.stages.sft.method = method
    c.export.hf = True
  else:
    c.stages.cpt.method = method
  with pytest.raises(ValueError, match=needle):
    config_lib.validate(c)
  c.stages.cpt.method = c.stages.sft.method = method  # the same method throughout is fine
  c.export.hf = False
  config_lib.validate(c)


def test_pipeline_reserves_virtual_slots_in_every_packed_example(tmp_path):
  from jaxsft.data import pipeline
  files = train_fixtures.write_data(tmp_path / "data")
  tok = hf.load_tokenizer(files["tokenizer"])
  data = dict(datasets=[str(files["chat"])], template="chatml",
              cache_dir=str(tmp_path / "cache"))
  pipe = pipeline.build(data, tok, seq_len=64, virtual_tokens=3)
  batch = next(pipe.batches(4))
  n_segments = 0
  for r in range(4):
    seg = batch["segment_ids"][r]
    for s in set(seg[seg > 0].tolist()):
      at = np.flatnonzero(seg == s)
      tokens, mask = batch["tokens"][r, at], batch["loss_mask"][r, at]
      assert tokens[:3].tolist() == [-1, -2, -3] and (tokens[3:] >= 0).all()
      assert mask[:3].tolist() == [0, 0, 0] and mask[3:].any()
      assert batch["positions"][r, at].tolist() == list(range(len(at)))
      n_segments += 1
  assert n_segments > 4  # rows hold several examples, each with its own slots
  with pytest.raises(ValueError, match="max_length=62 is longer than seq_len=64 minus 3 virtual"):
    pipeline.build({**data, "max_length": 62}, tok, seq_len=64, virtual_tokens=3)
