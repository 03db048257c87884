"""LoRA / DoRA / full_then_lora against peft and transformers (fp32, tiny models)."""
from __future__ import annotations

import copy
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.numpy as safetensors_numpy
import transformers

import hf_builders
import peft_fixtures
import train_fixtures
from jaxsft import checkpoint as checkpoint_lib
from jaxsft import config as config_lib
from jaxsft import export as export_lib
from jaxsft import hf, optim, trainer
from jaxsft import sharding as sharding_lib
from jaxsft.models import llama
from jaxsft.models.model_config import ModelConfig
from jaxsft.peft import methods

TOKENS = np.random.default_rng(0).integers(3, hf_builders.VOCAB, size=(2, 12))


def _lora_stage(method="lora", **peft_kw):
  return config_lib.stage(method=method, peft=dict(dict(rank=4, alpha=8.0), **peft_kw))


def _randomize_adapters(params, seed=1):
  """Give every adapter factor a non-trivial value (as training would)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  rng = np.random.default_rng(seed)
  out = []
  for path, x in flat:
    name = sharding_lib.path_names(path)[-1]
    if "_lora_m_" in name:
      x = np.asarray(x) * (1 + 0.2 * rng.standard_normal(x.shape)).astype(np.float32)
    elif "_lora_" in name:
      x = 0.3 * rng.standard_normal(x.shape).astype(np.float32)
    out.append(jnp.asarray(x))
  return jax.tree_util.tree_unflatten(treedef, out)


@pytest.mark.parametrize("method,peft_kw", [("lora", {}), ("dora", {})])
def test_new_adapter_computes_exactly_the_base_model(tmp_path, method, peft_kw):
  cfg, params = hf.load_params(peft_fixtures.hf_dir(tmp_path))
  base_logits, _ = llama.forward(cfg, params, TOKENS)
  cfg2, params2 = methods.prepare(cfg, params, _lora_stage(method, **peft_kw), jax.random.key(0))
  assert cfg2.adapters.lora_targets and methods.has_lora(params2)
  logits, _ = llama.forward(cfg2, params2, TOKENS)
  if method == "lora":
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(base_logits))
  else:  # DoRA's m / ‖W‖ is 1 up to the rounding of two separately compiled norms
    np.testing.assert_allclose(np.asarray(logits), np.asarray(base_logits), atol=1e-5, rtol=0)
  # The factors are not all zero: A is random, B (the zero one) makes it exact.
  a = params2["layers"]["attn"]["q_lora_a_dr"]
  assert float(jnp.abs(a).max()) > 0


@pytest.mark.parametrize("method,peft_kw,variant", [
    ("lora", {}, "llama"),
    ("lora", {"rslora": True, "targets": ["q_proj", "v_proj", "down_proj"]}, "qwen2"),
    ("lora", {"targets": ["q_proj", "lm_head", "embed_tokens"]}, "llama"),
    ("dora", {}, "llama_bias"),
])
def test_peft_loads_the_adapter_with_equal_logits_and_merge_is_exact(
    tmp_path, method, peft_kw, variant):
  hf_dir = peft_fixtures.hf_dir(tmp_path, variant)
  cfg, params = hf.load_params(hf_dir)
  cfg, params = methods.prepare(cfg, params, _lora_stage(method, **peft_kw), jax.random.key(0))
  params = _randomize_adapters(params)
  ours, _ = llama.forward(cfg, params, TOKENS)
  ours = np.asarray(ours)
  base_ours, _ = llama.forward(cfg.replace(adapters=None), methods.base_params(params), TOKENS)
  assert np.abs(ours - np.asarray(base_ours)).max() > 1e-2  # the adapter matters

  ckpt = tmp_path / "ckpt"
  checkpoint_lib.save_model(ckpt, params, cfg, tokenizer_src=hf_dir)
  adapter_dir = export_lib.export(ckpt, tmp_path / "adapter", peft=True, base_model=str(hf_dir))
  config = json.loads((adapter_dir / "adapter_config.json").read_text())
  assert config["base_model_name_or_path"] == str(hf_dir)
  base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
  model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
  np.testing.assert_allclose(peft_fixtures.torch_logits(model, TOKENS), ours, atol=1e-4, rtol=0)

  if "embed_tokens" in cfg.adapters.lora_targets and cfg.tie_word_embeddings:
    return
  merged_dir = export_lib.export(ckpt, tmp_path / "merged")
  merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir).eval()
  np.testing.assert_allclose(peft_fixtures.torch_logits(merged, TOKENS), ours, atol=1e-4, rtol=0)
  # The export (and the trainer's) merge donates the base weights: the same
  # values, the model held once (the inputs' buffers are the merged ones).
  # Fresh copies are donated: on a CPU, JAX 0.11 does not donate an array it
  # has once copied to the host (as saving the checkpoint above did); it
  # copies instead, silently.
  params = jax.tree.map(jnp.copy, params)
  _, kept = methods.merge(cfg, params)
  _, donated = methods.merge(cfg, params, donate=True)
  jax.tree.map(np.testing.assert_array_equal, kept, donated)
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  assert all(x.is_deleted() != ("_lora_" in sharding_lib.path_names(p)[-1]) for p, x in leaves)


@pytest.mark.parametrize("variant,method,peft_kw", [
    ("llama_bias", "dora", {}),
    ("llama", "lora", {"targets": ["q_proj", "down_proj", "lm_head", "embed_tokens"]}),
    ("mixtral", "lora", {"targets": ["q_proj", "v_proj", "expert_gate_up", "expert_down"]}),
])
def test_export_streams_a_layer_at_a_time_and_writes_what_merging_in_memory_writes(
    tmp_path, monkeypatch, variant, method, peft_kw):
  """The export of a checkpoint reads every stacked weight one layer at a time
  (each stored array once per layer, never whole) and writes, tensor for
  tensor and shard for shard, what merging the whole model in memory and
  saving it writes; a checkpoint stored without per-layer chunks (before they
  were) is read whole, with the same result."""
  hf_dir = peft_fixtures.hf_dir(tmp_path, variant)
  cfg, params = hf.load_params(hf_dir)
  cfg, params = methods.prepare(cfg, params, _lora_stage(method, **peft_kw), jax.random.key(0))
  params = _randomize_adapters(params)
  ckpt = checkpoint_lib.save_model(tmp_path / "ckpt", params, cfg, tokenizer_src=hf_dir)
  merged_cfg, merged = methods.merge(cfg, params)
  shard = 40_000  # several shards, each of whole tensors
  reference = hf.save_params(merged, merged_cfg, tmp_path / "reference", dtype="bfloat16",
                             max_shard_bytes=shard, tokenizer_src=hf_dir)

  reads = []
  read = checkpoint_lib.StoredArray.read_async
  monkeypatch.setattr(checkpoint_lib.StoredArray, "read_async", lambda self, index=None: (
      reads.append((self.shape, index)), read(self, index))[1])
  streamed = export_lib.export(ckpt, tmp_path / "streamed", dtype="bfloat16",
                               max_shard_bytes=shard)
  stored = checkpoint_lib.stored_params(ckpt)
  stacked = [a.shape for path, a in stored.items() if path.startswith("layers/")]
  assert stacked and all(a.sliceable for path, a in stored.items() if path.startswith("layers/"))
  assert sorted((shape, i) for shape, i in reads if i is not None) == sorted(
      (shape, i) for shape in stacked for i in range(cfg.num_layers))
  assert sorted(shape for shape, i in reads if i is None) == sorted(
      a.shape for path, a in stored.items() if not path.startswith("layers/"))

  def files(d):
    return {f.name: f for f in d.iterdir() if f.suffix in (".safetensors", ".json")}
  assert len([f for f in files(reference) if f.endswith(".safetensors")]) > 2
  assert sorted(files(streamed)) == sorted(files(reference))
  for name, f in files(reference).items():
    if name.endswith(".json"):
      assert json.loads(files(streamed)[name].read_text()) == json.loads(f.read_text()), name
      continue
    want, got = safetensors_numpy.load_file(f), safetensors_numpy.load_file(files(streamed)[name])
    assert sorted(got) == sorted(want), name
    for key, x in want.items():
      assert got[key].dtype == x.dtype and got[key].tobytes() == x.tobytes(), key

  # A PEFT export reads the factors whole and streams the base it writes
  # beside them (no recorded base model here).
  reads.clear()
  adapter_dir = export_lib.export(ckpt, tmp_path / "peft", peft=True)
  factors = {a.shape for path, a in stored.items() if "_lora_" in path}
  assert {shape for shape, i in reads if i is None} - factors <= {
      a.shape for path, a in stored.items() if not path.startswith("layers/")}
  base_reference = hf.save_params(methods.base_params(params), cfg.replace(adapters=None),
                                  tmp_path / "base_reference")
  want = safetensors_numpy.load_file(base_reference / hf.SINGLE_FILE)
  got = safetensors_numpy.load_file(adapter_dir / "base" / hf.SINGLE_FILE)
  assert sorted(got) == sorted(want)
  assert all(got[k].tobytes() == x.tobytes() for k, x in want.items())

  # Stored the old way (one chunk per array): read whole, the same bytes.
  monkeypatch.setattr(checkpoint_lib, "_stacked", lambda path: False)
  old = checkpoint_lib.save_model(tmp_path / "old", params, cfg, tokenizer_src=hf_dir)
  assert not any(a.sliceable for a in checkpoint_lib.stored_params(old).values())
  reads.clear()
  whole = export_lib.export(old, tmp_path / "whole", dtype="bfloat16", max_shard_bytes=shard)
  assert not reads  # restored by orbax, as before
  for name, f in files(reference).items():
    if name.endswith(".safetensors"):
      want, got = safetensors_numpy.load_file(f), safetensors_numpy.load_file(files(whole)[name])
      assert all(got[k].tobytes() == x.tobytes() for k, x in want.items()), name


def _one_stage_config(tmp_path, hf_dir, method, steps=6, **peft_kw):
  return peft_fixtures.one_stage_config(tmp_path, hf_dir, method, steps,
                                        dict(dict(rank=4, alpha=8.0), **peft_kw))


def test_lora_training_freezes_the_base_and_exports_a_peft_adapter(tmp_path):
  hf_dir = peft_fixtures.hf_dir(tmp_path)
  c = _one_stage_config(tmp_path, hf_dir, "lora", steps=4, dropout=0.1)
  out = trainer.train(c)
  final = out / "stages" / "sft" / "final"
  cfg, params, trained = peft_fixtures.final_with_base_unchanged(out, "sft", hf_dir)
  assert np.abs(trained["layers/attn/q_lora_b_rnh"]).max() > 0  # B moved from zero

  assert export_lib.main(["--checkpoint", str(final), "--out", str(tmp_path / "a"),
                          "--peft"]) == 0
  config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
  assert config["base_model_name_or_path"] == str(hf_dir.resolve())  # recorded by the run
  model = peft.PeftModel.from_pretrained(
      transformers.AutoModelForCausalLM.from_pretrained(hf_dir), tmp_path / "a").eval()
  ours, _ = llama.forward(cfg, params, TOKENS)
  np.testing.assert_allclose(peft_fixtures.torch_logits(model, TOKENS), np.asarray(ours), atol=1e-4, rtol=0)


def test_lora_with_trained_base_modules_exports_the_base_it_trained(tmp_path):
  """LoRA plus peft.train_modules trains base weights too (here the final
  norm): the --peft export must not name the source model as the base (the
  adapter over it computed other logits, max diff 0.25, before this was
  caught); it writes the trained base beside the adapter, and an explicit
  --base-model is refused with why."""
  hf_dir = peft_fixtures.hf_dir(tmp_path)
  c = _one_stage_config(tmp_path, hf_dir, "lora", steps=4, train_modules="final_norm")
  c.stages.sft.lr = 5e-2
  final = trainer.train(c) / "stages" / "sft" / "final"
  cfg, params = checkpoint_lib.load_model(final)
  _, start = hf.load_params(hf_dir)
  assert np.abs(np.asarray(params["final_norm"]["scale_d"])
                - np.asarray(start["final_norm"]["scale_d"])).max() > 1e-3
  adapter = export_lib.export(final, tmp_path / "a", peft=True)
  base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
  assert base == str((tmp_path / "a" / "base").resolve())
  model = peft.PeftModel.from_pretrained(
      transformers.AutoModelForCausalLM.from_pretrained(base), adapter).eval()
  ours, _ = llama.forward(cfg, params, TOKENS)
  np.testing.assert_allclose(peft_fixtures.torch_logits(model, TOKENS), np.asarray(ours),
                             atol=1e-4, rtol=0)
  with pytest.raises(ValueError, match=r"peft.train_modules='final_norm' trained base weights "
                                       r"beside the adapter, so the adapter does not apply"):
    export_lib.export(final, tmp_path / "b", peft=True, base_model=str(hf_dir))


@pytest.mark.parametrize("method,trained", [
    ("lora", set()), ("full_then_lora", None), ("freeze", {"layers/"})])
def test_random_init_builds_frozen_weights_in_the_frozen_dtype(method, trained):
  """What the trainer (model.init) and the bench start a stage from: the
  weights the stage freezes built straight in bf16, leaf by leaf, the same
  values as the fp32 init cast down; trained ones (all before
  full_then_lora's switch, the trained layers of freeze tuning) in fp32."""
  cfg = ModelConfig(**{**train_fixtures.TINY_MODEL, "vocab_size": 64, "dtype": "bfloat16"})
  stage = _lora_stage(method, frozen_dtype="compute", train_layers=1)
  abstract = llama.abstract_params(cfg)
  shardings = sharding_lib.param_shardings(abstract, sharding_lib.make_mesh({}))
  dtypes = optim.load_dtypes(abstract, stage, cfg.dtype, cfg.param_dtype)
  built = peft_fixtures.leaves_by_path(llama.init_placed(cfg, jax.random.key(3), shardings,
                                                         dtypes))
  fp32 = peft_fixtures.leaves_by_path(llama.init_placed(cfg, jax.random.key(3), shardings))
  assert fp32.keys() == built.keys()
  for path, x in fp32.items():
    kept = trained is None or any(path.startswith(t) for t in trained)
    assert built[path].dtype == (np.float32 if kept else jnp.bfloat16), path
    np.testing.assert_array_equal(built[path], x.astype(built[path].dtype), err_msg=path)


def test_frozen_weights_get_no_optimizer_state_and_no_gradient():
  cfg = ModelConfig(**{**train_fixtures.TINY_MODEL, "vocab_size": 64})
  params = llama.init_params(cfg, jax.random.key(0))
  stage = _lora_stage("lora")
  cfg, params = methods.prepare(cfg, params, stage, jax.random.key(1))
  tx, lr = optim.build(stage, 4, params)
  mask = optim.trainable_mask(params, stage)
  state = trainer.init_state(params, tx, 0, mask)
  n_state = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state))
  n_lora = sum(x.size for p, x in peft_fixtures.leaves_by_path(params).items() if "_lora_" in p)
  # Adam's two moments of the factors, plus scalar step counters.
  assert 2 * n_lora <= n_state <= 2 * n_lora + 4
  batch = {"tokens": jnp.asarray(TOKENS % 64), "loss_mask": jnp.ones(TOKENS.shape, jnp.int32),
           "segment_ids": jnp.ones(TOKENS.shape, jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(12), TOKENS.shape)}
  step = jax.jit(trainer.make_train_step(cfg, tx, lr, 1, mask))
  # The compiled step computes no weight gradient for a frozen weight: its
  # gradient matmul (the frozen MLP weight's [D, F] outer product) is absent.
  text = step.lower(state, batch).compile().as_text()
  full_stage = config_lib.stage(method="full")
  full_tx, _ = optim.build(full_stage, 4, params)
  full_mask = optim.trainable_mask(params, full_stage)
  full_state = trainer.init_state(params, full_tx, 0, full_mask)
  full_text = jax.jit(trainer.make_train_step(cfg, full_tx, lr, 1, full_mask)).lower(
      full_state, batch).compile().as_text()
  assert text.count(" dot(") < full_text.count(" dot(")
  new_state, _ = step(state, batch)
  for path, x in peft_fixtures.leaves_by_path(params).items():
    if "_lora_" not in path:
      np.testing.assert_array_equal(peft_fixtures.leaves_by_path(new_state.params)[path], x)


def test_full_then_lora_switches_and_resumes_exactly_before_at_and_after_the_switch(tmp_path):
  hf_dir = peft_fixtures.hf_dir(tmp_path)
  c = _one_stage_config(tmp_path, hf_dir, "full_then_lora", steps=8, switch_at=0.375)
  out = trainer.train(c)  # switch after step 3
  rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  losses = {r["step"]: r["loss"] for r in rows if r.get("split") == "train"}
  assert sorted(losses) == list(range(1, 9))
  cfg, params = checkpoint_lib.load_model(out / "stages" / "sft" / "final")
  assert cfg.adapters is not None and cfg.adapters.lora_rank == 4
  final = peft_fixtures.leaves_by_path(params)
  # The full phase moved the base weights; after the switch they stay put.
  _, start = hf.load_params(hf_dir)
  moved = peft_fixtures.leaves_by_path(start)["layers/mlp/up_df"]
  assert not np.array_equal(final["layers/mlp/up_df"], moved)
  assert 3 in [int(p.name) for p in (out / "stages/sft/checkpoints").iterdir() if p.name.isdigit()]

  for k in (2, 3, 4):
    resumed = peft_fixtures.resumed_leaves(c, out, tmp_path / f"resumed_{k}", "sft", k)
    for path, x in resumed.items():
      np.testing.assert_array_equal(x, final[path], err_msg=f"resumed at {k}: {path}")


def test_frozen_weights_held_in_the_compute_dtype_train_the_same(tmp_path):
  """frozen_dtype="compute" holds the frozen base in bf16 (it is only ever read
  in bf16): the factors train exactly as with fp32-held weights, the final
  checkpoint's base is their bf16 rounding (in fp32), and a resume restores
  the bf16 state."""
  hf_dir = peft_fixtures.hf_dir(tmp_path)
  finals = {}
  for held in ("compute", "param"):
    c = _one_stage_config(tmp_path / held, hf_dir, "lora", steps=4, frozen_dtype=held)
    c.model.dtype = "bfloat16"
    out = trainer.train(c)
    _, params = checkpoint_lib.load_model(out / "stages" / "sft" / "final")
    finals[held] = peft_fixtures.leaves_by_path(params)
  _, start = hf.load_params(hf_dir)
  rounded = 0
  for path, x in peft_fixtures.leaves_by_path(start).items():
    np.testing.assert_array_equal(finals["param"][path], x, err_msg=path)
    assert finals["compute"][path].dtype == x.dtype == np.float32
    np.testing.assert_array_equal(finals["compute"][path],
                                  np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)))
    rounded += not np.array_equal(finals["compute"][path], x)
  assert rounded  # the state really held bf16
  for path, x in finals["param"].items():
    if "_lora_" in path:
      np.testing.assert_allclose(finals["compute"][path], x, atol=1e-6, rtol=0, err_msg=path)

  c = _one_stage_config(tmp_path / "compute", hf_dir, "lora", steps=4, frozen_dtype="compute")
  c.model.dtype = "bfloat16"
  # The run read its frozen weights straight in bf16 (never the fp32 model on
  # the device first), the same values store_frozen makes of the fp32 ones.
  # So does one starting from a jaxsft checkpoint without adapters (orbax
  # casts as it reads); one with adapters arrives in fp32: they are merged first.
  mesh = sharding_lib.make_mesh(dict(c.mesh))
  checkpoint_lib.save_model(tmp_path / "ckpt", start, hf.load_params(hf_dir)[0])
  for source in (hf_dir, tmp_path / "ckpt"):
    c.model.source = str(source)
    _, loaded = trainer.initial_model(c, mesh)
    for path, x in peft_fixtures.leaves_by_path(start).items():
      got = peft_fixtures.leaves_by_path(loaded)[path]
      assert got.dtype == jnp.bfloat16, (source, path)
      np.testing.assert_array_equal(got, np.asarray(jnp.asarray(x, jnp.bfloat16)), err_msg=path)
  c.model.source = str(tmp_path / "compute" / "run" / "stages" / "sft" / "final")
  _, loaded = trainer.initial_model(c, mesh)
  assert {x.dtype for x in jax.tree_util.tree_leaves(loaded)} == {jnp.dtype(jnp.float32)}
  c.model.source = str(hf_dir)
  c_full = _one_stage_config(tmp_path / "full", hf_dir, "full_then_lora", steps=4,
                             frozen_dtype="compute")
  c_full.model.dtype = "bfloat16"
  _, loaded = trainer.initial_model(c_full, sharding_lib.make_mesh(dict(c.mesh)))
  assert {x.dtype for x in jax.tree_util.tree_leaves(loaded)} == {jnp.dtype(jnp.float32)}
  resumed = peft_fixtures.resumed_leaves(c, tmp_path / "compute" / "run", tmp_path / "resumed",
                                         "sft", 2)
  for path, x in resumed.items():
    np.testing.assert_array_equal(x, finals["compute"][path], err_msg=f"resumed: {path}")


def test_frozen_weights_parked_on_the_host_between_stages_change_nothing(tmp_path, monkeypatch):
  """A LoRA stage holding its base in bf16 does not end by casting it back to
  fp32 on the device: the frozen weights go to the host in fp32, the final
  checkpoint is written from there, the next stage (LoRA on other targets:
  the first LoRA merged) puts them back in bf16, and the export merges on the
  host. Checkpoints, losses and the export are bit-identical to a run that
  casts them on the device."""
  hf_dir = peft_fixtures.hf_dir(tmp_path)

  def run(root):
    c = _one_stage_config(root, hf_dir, "lora", steps=2, frozen_dtype="compute")
    c.model.dtype = "bfloat16"
    c.stages.sft2 = copy.deepcopy(c.stages.sft)
    c.stages.sft2.peft.targets = ["q_proj", "v_proj"]
    c.export.hf = True
    return trainer.train(c)

  host_leaves = []
  save = checkpoint_lib.save_model
  monkeypatch.setattr(checkpoint_lib, "save_model", lambda path, params, *a, **k: (
      host_leaves.append(sum(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(params))),
      save(path, params, *a, **k))[1])
  parked = run(tmp_path / "parked")
  n_base = len(jax.tree_util.tree_leaves(hf.load_params(hf_dir)[1]))
  assert host_leaves == [n_base, n_base]  # every frozen base weight, after each stage
  monkeypatch.setattr(trainer._Phase, "final", trainer._Phase.unstore)
  on_device = run(tmp_path / "device")

  def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r.get("split") == "train"]
  assert losses(parked) == losses(on_device) and len(losses(parked)) == 4
  for stage in ("sft", "sft2"):
    _, a = checkpoint_lib.load_model(parked / "stages" / stage / "final")
    _, b = checkpoint_lib.load_model(on_device / "stages" / stage / "final")
    for path, x in peft_fixtures.leaves_by_path(b).items():
      assert x.dtype == np.float32, path
      np.testing.assert_array_equal(peft_fixtures.leaves_by_path(a)[path], x, err_msg=path)
  a, b = (peft_fixtures.leaves_by_path(hf.load_params(out / "hf")[1]) for out in (parked, on_device))
  for path, x in b.items():
    np.testing.assert_array_equal(a[path], x, err_msg=f"export: {path}")


@pytest.mark.parametrize("peft_kw,method,needle", [
    (dict(targets=["qproj"]), "lora", "q_proj"),
    (dict(targets="attn.*"), "lora", "available"),
    (dict(rank=0), "lora", "rank=0"),
    (dict(switch_at=1.0), "full_then_lora", "switch_at"),
    (dict(switch_at=0.0), "full_then_lora", "switch_at"),
    (dict(frozen_dtype="fp8"), "lora", "frozen_dtype"),
])
def test_bad_peft_settings_name_the_key(tmp_path, peft_kw, method, needle):
  c = train_fixtures.tiny_config(tmp_path / "d", tmp_path / "o")
  c.stages.sft.method = method
  c.stages.sft.peft.update(peft_kw)
  with pytest.raises(ValueError, match=needle) as e:
    config_lib.validate(c)
  assert "config.stages.sft.peft" in str(e.value)


def test_full_then_lora_keeps_a_step_on_each_side_and_refuses_a_single_step():
  stage = config_lib.stage(method="full_then_lora", peft=dict(switch_at=0.2))
  assert [methods.switch_step(stage, n) for n in (2, 10, 100)] == [1, 2, 20]
  stage.peft.switch_at = 0.99
  assert methods.switch_step(stage, 10) == 9  # the LoRA phase keeps its step
  with pytest.raises(ValueError, match=r"config\.stages\.sft: method full_then_lora trains 1 "
                     r"step\(s\), but needs at least 2"):
    methods.switch_step(stage, 1, "config.stages.sft")
  assert methods.switch_step(config_lib.stage(method="lora"), 1) is None


def test_lora_on_an_lm_head_the_model_does_not_have_is_refused():
  """Tied embeddings (Qwen2-0.5B, Llama-3.2-1B) have no lm_head weight, and a
  task head replaces it: a LoRA there would be created nowhere, train nothing
  and export an empty adapter."""
  stage = config_lib.stage(method="lora", peft=dict(targets=["q_proj", "lm_head"]))
  where = "config.stages.sft"
  tied = ModelConfig(**{**train_fixtures.TINY_MODEL, "tie_word_embeddings": True})
  with pytest.raises(ValueError, match=r"config\.stages\.sft\.peft\.targets names 'lm_head', "
                     r"but this model ties its output layer to its input embedding"):
    methods.prepare(tied, llama.abstract_params(tied), stage, None, where=where)
  head = ModelConfig(**{**train_fixtures.TINY_MODEL, "num_labels": 3,
                        "label_names": ("a", "b", "c"),
                        "problem_type": "single_label_classification"})
  with pytest.raises(ValueError, match=r"names 'lm_head', but this stage's "
                     r"single_label_classification head replaces the model's lm_head"):
    methods.prepare(head, llama.abstract_params(head), stage, None, where=where)
  untied = ModelConfig(**train_fixtures.TINY_MODEL)
  cfg, _ = methods.prepare(untied, llama.abstract_params(untied), stage, None, where=where)
  assert "lm_head" in cfg.adapters.lora_targets


def test_peft_export_of_a_full_checkpoint_is_refused(tmp_path, capsys):
  hf_dir = peft_fixtures.hf_dir(tmp_path)
  cfg, params = hf.load_params(hf_dir)
  checkpoint_lib.save_model(tmp_path / "ck", params, cfg, tokenizer_src=hf_dir)
  assert export_lib.main(["--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "o"),
                          "--peft"]) == 2
  assert "without --peft" in capsys.readouterr().err


def _first_adam_updates(stage, params, steps=10):
  """One optimizer step of ``optim.build`` on all-ones gradients: every trainable
  leaf's update (Adam's first step is -lr · g / (|g| + eps) = -lr / (1 + eps))."""
  tx, lr_fn = optim.build(stage, steps, params)
  train, _ = optim.partition(params, optim.trainable_mask(params, stage))
  grads = jax.tree_util.tree_map(jnp.ones_like, train)
  updates, _ = tx.update(grads, tx.init(train), train)
  flat = jax.tree_util.tree_flatten_with_path(updates)[0]
  return {"/".join(sharding_lib.path_names(p)): np.asarray(u) for p, u in flat}, lr_fn


@pytest.mark.parametrize("method,peft_kw,expect_a,expect_b", [
    ("lora", dict(loraplus_lr_ratio=16.0), 1.0, 16.0),           # LoRA+: B at 16x
    ("full_then_lora", dict(lora_lr_scale=5.0), 5.0, 5.0),       # the LoRA phase at 5x
    ("full_then_lora", dict(lora_lr_scale=5.0, loraplus_lr_ratio=4.0), 5.0, 20.0),
])
def test_lora_learning_rates(method, peft_kw, expect_a, expect_b):
  cfg = ModelConfig(**train_fixtures.TINY_MODEL)
  params = llama.init_params(cfg, jax.random.key(0))
  stage = config_lib.stage(method=method, lr=1e-3, warmup_ratio=0.0, schedule="constant",
                           weight_decay=0.0, grad_clip=0.0,
                           peft=dict(dict(rank=4, alpha=8.0), **peft_kw))
  _, lora_params = methods.prepare(cfg, params, stage, jax.random.key(1), phase=1)
  updates, lr_fn = _first_adam_updates(stage, lora_params)
  adam = -1e-3 / (1 + stage.eps)
  assert updates and all("_lora_" in k for k in updates)
  for name, u in updates.items():
    want = expect_b if "_lora_b_" in name else expect_a
    np.testing.assert_allclose(u, want * adam, rtol=1e-4, err_msg=name)  # fp32 bias correction
  assert float(lr_fn(3)) == pytest.approx(1e-3 * expect_a)
  if method == "full_then_lora":  # the full phase keeps the stage's lr
    full_updates, full_lr = _first_adam_updates(stage, params)
    assert all(np.allclose(u, adam, rtol=1e-4) for u in full_updates.values())
    assert float(full_lr(3)) == pytest.approx(1e-3)


def test_lora_learning_rate_knobs_are_checked():
  for kw, key in [(dict(loraplus_lr_ratio=0.0), "loraplus_lr_ratio"),
                  (dict(lora_lr_scale=-1.0), "lora_lr_scale")]:
    with pytest.raises(ValueError, match=key):
      methods.validate("full_then_lora", config_lib.stage(peft=kw).peft, "stage")


def test_freeze_train_modules_match_the_checkpoint_paths():
  """``layers/mlp`` names every layer's MLP in the checkpoint; with freeze tuning
  the first layers live in the ``layers_frozen`` stack and must match too."""
  cfg = ModelConfig(**train_fixtures.TINY_MODEL)
  params = llama.init_params(cfg, jax.random.key(0))
  stage = config_lib.stage(method="freeze", peft=dict(train_layers=1, train_modules="layers/mlp"))
  _, split = methods.prepare(cfg, params, stage, jax.random.key(1))
  labels = optim.labels(split, stage)
  assert set(jax.tree_util.tree_leaves(labels["layers_frozen"]["mlp"])) == {"train"}
  assert set(jax.tree_util.tree_leaves(labels["layers_frozen"]["attn"])) == {"frozen"}
  assert set(jax.tree_util.tree_leaves(labels["layers"])) == {"train"}


def test_plan_compiles_every_stage_from_shapes_as_the_run_does(tmp_path, monkeypatch):
  """``train --plan`` (``trainer.plan``) compiles each stage's step, both
  phases of full_then_lora, from config.json alone: the source here has no
  weights at all, and nothing is written. Its figures are the ones the run
  itself then compiles and reports (metrics.jsonl's compile rows), and on a
  device whose limit lies between two steps' needs it names the one that
  does not fit."""
  hf_dir = peft_fixtures.hf_dir(tmp_path)
  c = _one_stage_config(tmp_path, hf_dir, "full_then_lora", steps=4, switch_at=0.5)
  c.stages.sft2 = config_lib.stage(**{**c.stages.sft.to_dict(), "method": "lora", "steps": 2})
  weightless = tmp_path / "config_only"
  shutil.copytree(hf_dir, weightless, ignore=shutil.ignore_patterns("*.safetensors"))
  c.model.source = str(weightless)
  rows = trainer.plan(c)
  assert not pathlib.Path(c.output_dir).exists()
  assert [(r["stage"], r["method"]) for r in rows] == [
      ("sft", "full"), ("sft", "full_then_lora"), ("sft2", "lora")]
  full, lora = rows[0], rows[2]
  # Full trains everything; LoRA exactly the factors it adds to the same model.
  assert full["trainable"] == full["params"]
  assert 0 < lora["trainable"] == lora["params"] - full["params"]
  assert lora["state_bytes_per_device"] < full["state_bytes_per_device"] / 2
  assert all(r["fits"] is None and r["problem"] is None for r in rows)  # CPU: no limit

  c.model.source = str(hf_dir)
  out = trainer.train(c)
  compiled = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if r.get("split") == "compile"]
  assert [r["stage"] for r in compiled] == ["sft", "sft", "sft2"]
  for planned, ran in zip(rows, compiled):
    assert planned["state_bytes_per_device"] == ran["state_bytes_per_device"], (planned, ran)
    assert planned["step_bytes_per_device"] == ran["step_bytes_per_device"], (planned, ran)

  # A device with room for the LoRA steps but not for the full phase's.
  limit = (lora["step_bytes_per_device"] + full["step_bytes_per_device"]) // 2
  assert rows[1]["step_bytes_per_device"] < limit < full["step_bytes_per_device"]
  monkeypatch.setattr(sharding_lib, "device_bytes", lambda device: limit)
  c.model.source = str(weightless)
  rows = trainer.plan(c)
  assert [r["fits"] for r in rows] == [False, True, True]
  assert rows[0]["problem"].startswith("config.stages.sft: one training step needs")
  # The remat hint, measured: less than without it, and the message says whether it fits.
  remat = rows[0]["step_bytes_remat_full"]
  assert remat < rows[0]["step_bytes_per_device"], rows[0]
  assert rows[0]["problem"].endswith(
      f"(with config.model.remat='full' the step needs {remat / 2**30:.3g} GiB: "
      f"{'it would fit' if remat <= limit else 'still too much'})"), rows[0]["problem"]
  assert rows[1]["step_bytes_remat_full"] is None  # it fits as it is
  table = trainer.format_plan(rows).splitlines()
  assert table[2].split()[:2] == ["sft", "full"] and table[2].endswith("NO"), table
  assert table[3].endswith("yes") and json.loads(table[5]) == rows[0], table
