"""Hugging Face import/export: bit-exact round trips, transformers loading the
export, sharded loading on 8 fake devices, and a clear error for each bad input."""
from __future__ import annotations

import json
import os
import pathlib
import pickle
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import hf_builders
import peft_fixtures
from jaxsft import checkpoint, export, generate, hf
from jaxsft.models import llama
from jaxsft.models.model_config import Adapters
from jaxsft.peft import methods as peft_methods

ALL_VARIANTS = sorted(hf_builders.VARIANTS)
REPO = pathlib.Path(__file__).resolve().parents[1]
SHARD_BYTES = 60_000  # forces a few shards out of each tiny model


def _tensors(model_dir) -> dict[str, np.ndarray]:
  out = {}
  for f in sorted(pathlib.Path(model_dir).glob("*.safetensors")):
    out.update(safetensors.numpy.load_file(f))
  return out


def _assert_same_tensors(a: dict, b: dict):
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
    # Compare bits, so that -0.0/NaN payloads and bf16 values count exactly.
    assert a[name].tobytes() == b[name].tobytes(), name


def _assert_same_params(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def _tokens(batch=2, seq=20):
  return np.random.RandomState(0).randint(3, hf_builders.VOCAB, (batch, seq))


@pytest.fixture(scope="session")
def exported(hf_model_factory, tmp_path_factory):
  """``get(variant) -> (source dir, torch model, cfg, params, export dir)``,
  exported with forced sharding; cached per variant."""
  cache = {}

  def get(variant):
    if variant not in cache:
      src, model = hf_model_factory(variant)
      cfg, params = hf.load_params(src)
      out = tmp_path_factory.mktemp(f"export_{variant}") / "out"
      hf.save_params(params, cfg, out, tokenizer_src=src, max_shard_bytes=SHARD_BYTES)
      cache[variant] = (src, model, cfg, params, out)
    return cache[variant]

  return get


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_round_trip_is_bit_exact(exported, variant):
  src, _, cfg, params, out = exported(variant)
  index = json.loads((out / hf.INDEX_FILE).read_text())
  shards = sorted(p.name for p in out.glob("*.safetensors"))
  assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
  assert index["metadata"]["total_size"] == sum(t.nbytes for t in _tensors(out).values())
  _assert_same_tensors(_tensors(src), _tensors(out))
  cfg2, params2 = hf.load_params(out)
  assert cfg2 == cfg
  _assert_same_params(params, params2)


def test_unsharded_export_writes_one_file(hf_model_factory, tmp_path):
  src, _ = hf_model_factory("llama")
  cfg, params = hf.load_params(src)
  hf.save_params(params, cfg, tmp_path / "out")
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
      "config.json", "generation_config.json", "model.safetensors"]
  _assert_same_tensors(_tensors(src), _tensors(tmp_path / "out"))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_source_round_trips_in_its_dtype(tmp_path, dtype):
  src = tmp_path / dtype
  hf_builders.build_model("llama_bias").to(getattr(torch, dtype)).save_pretrained(src)
  cfg, params = hf.load_params(src, dtype=dtype)
  assert cfg.param_dtype == dtype
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(dtype)}
  hf.save_params(params, cfg, tmp_path / "out", max_shard_bytes=SHARD_BYTES)
  assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == dtype
  _assert_same_tensors(_tensors(src), _tensors(tmp_path / "out"))
  # Upcasting to the default fp32 params is exact too.
  _, params32 = hf.load_params(src)
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(params32)):
    assert y.dtype == jnp.float32 and np.array_equal(np.asarray(x).astype(np.float32), y)


def test_save_casts_to_requested_dtype(exported, tmp_path):
  _, _, cfg, params, _ = exported("qwen2")
  hf.save_params(params, cfg, tmp_path / "out", dtype="bfloat16")
  for name, t in _tensors(tmp_path / "out").items():
    assert t.dtype == ml_dtypes.bfloat16, name
  cfg2, params2 = hf.load_params(tmp_path / "out")
  assert cfg2 == cfg  # the loaded param dtype is the policy's, not the file's
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32), y)


def test_export_reads_weights_in_the_export_dtype_and_writes_the_same_bytes(exported, tmp_path):
  """Exporting an fp32 model in bf16 reads the weights in bf16 (half the host
  memory: docs/BENCHMARKS.md) and writes what reading fp32, merging, then
  casting writes, byte for byte: from an HF directory, a full checkpoint, and
  a LoRA checkpoint, whose adapted modules are read in fp32 for the merge."""
  src, _, cfg, params, _ = exported("llama")
  lora_cfg = cfg.replace(adapters=Adapters(lora_targets=("q_proj", "down_proj"), lora_rank=4,
                                           lora_alpha=8.0))
  lora = peft_methods.add_params(lora_cfg, jax.tree.map(jnp.copy, params), jax.random.key(1))
  lora = jax.tree_util.tree_map_with_path(  # B is zero at init: make the merge count
      lambda p, x: x + 0.05 * jax.random.normal(jax.random.key(len(str(p))), x.shape)
      if "_lora_b_" in str(p) else x, lora)
  sources = {"hf": (src, cfg, params),
             "full": (checkpoint.save_model(tmp_path / "full", params, cfg), cfg, params),
             "lora": (checkpoint.save_model(tmp_path / "lora", lora, lora_cfg), lora_cfg, lora)}
  for name, (source, source_cfg, source_params) in sources.items():
    dtypes = peft_fixtures.leaves_by_path(export.read_dtypes(source_cfg, "bfloat16"))
    narrow = {k for k, d in dtypes.items() if d == jnp.bfloat16}
    assert "embed/embedding_vd" in narrow and "final_norm/scale_d" in narrow, name
    adapted = {k for k in dtypes if k.startswith(("layers/attn/", "layers/mlp/"))}
    assert (narrow & adapted) == (set() if name == "lora" else adapted), name
    export.export(source, tmp_path / f"{name}_bf16", dtype="bfloat16")
    want_cfg, want = peft_methods.merge(source_cfg, source_params)
    hf.save_params(want, want_cfg, tmp_path / f"{name}_want", dtype="bfloat16")
    got, ref = _tensors(tmp_path / f"{name}_bf16"), _tensors(tmp_path / f"{name}_want")
    assert sorted(got) == sorted(ref), name
    for k in ref:
      assert got[k].dtype == ref[k].dtype == ml_dtypes.bfloat16 and (
          got[k].tobytes() == ref[k].tobytes()), (name, k)
  assert export.read_dtypes(cfg, "float32") is None and export.read_dtypes(cfg, None) is None


# ----------------------------------------------------------------------------- transformers

@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_export_loads_in_transformers(exported, variant):
  src, model, _, _, out = exported(variant)
  loaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
  assert type(loaded) is type(model)
  src_config, out_config = model.config.to_dict(), loaded.config.to_dict()
  for key in ("rope_parameters", "tie_word_embeddings", "sliding_window", "num_key_value_heads",
              "attention_bias", "mlp_bias", "num_local_experts", "eos_token_id", "bos_token_id",
              "pad_token_id"):
    assert out_config.get(key) == src_config.get(key), key
  head_dim = model.config.hidden_size // model.config.num_attention_heads
  assert loaded.config.head_dim == (getattr(model.config, "head_dim", None) or head_dim)
  tokens = torch.tensor(_tokens())
  with torch.no_grad():
    assert torch.equal(loaded(tokens).logits, model(tokens).logits)

  tok, src_tok = (transformers.AutoTokenizer.from_pretrained(d) for d in (out, src))
  text = "Fine-tuning 用户 <|im_start|>"
  assert tok(text)["input_ids"] == src_tok(text)["input_ids"]
  messages = [{"role": "user", "content": "hi"}]
  assert (tok.apply_chat_template(messages, tokenize=False)
          == src_tok.apply_chat_template(messages, tokenize=False))
  assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == 2


def test_reimported_export_matches_transformers_logits(exported):
  # One variant suffices: the export is bit-exact, and test_models checks every
  # variant's forward pass against transformers.
  _, model, _, _, out = exported("qwen2")
  cfg, params = hf.load_params(out)
  tokens = _tokens()
  logits, _ = llama.forward(cfg, params, jnp.asarray(tokens))
  with torch.no_grad():
    ref = model(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- config

def test_config_from_legacy_rope_keys():
  base = json.loads(hf_builders.build_config("llama").to_json_string())
  del base["rope_parameters"]
  legacy = dict(base, rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 2.0})
  cfg = hf.config_from_hf(legacy)
  assert cfg.rope_theta == 500000.0
  assert cfg.rope_dict() == {"rope_type": "linear", "factor": 2.0}
  yarn = dict(base, rope_scaling={"rope_type": "yarn", "factor": 4.0})
  assert hf.config_from_hf(yarn).rope_dict() == {
      "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
  assert hf.config_from_hf(base).rope_theta == 10000.0  # transformers' default
  assert hf.config_from_hf(dict(base, rope_scaling=None)).rope_scaling == ()


def test_config_token_ids_head_dim_and_policy(tmp_path):
  hf_config = json.loads(hf_builders.build_config("mixtral").to_json_string())
  hf_config.update(eos_token_id=[2, 5], head_dim=None)
  (tmp_path / "config.json").write_text(json.dumps(hf_config))
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
  cfg = hf.config_from_hf(tmp_path, param_dtype="bfloat16", remat="full")
  assert cfg.eos_token_ids == (2, 5, 7) and cfg.head_dim == 16
  assert (cfg.param_dtype, cfg.remat, cfg.num_experts, cfg.rope_theta) == (
      "bfloat16", "full", 4, 1e6)
  assert hf.config_from_hf({**hf_config, "model_type": "Yi"}).family == "llama"
  with pytest.raises(ValueError, match="not policy fields"):
    hf.config_from_hf(hf_config, vocab_size=3)


@pytest.mark.parametrize("change, message", [
    (dict(model_type="gpt2"), r"model_type 'gpt2' is not supported; supported model types"),
    (dict(hidden_act="gelu"), r"hidden_act='gelu' is not supported"),
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}),
     r"RoPE type 'longrope' is not supported"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4}), r"needs a 'factor'"),
    (dict(partial_rotary_factor=0.5), r"partial_rotary_factor=0.5 is not supported"),
    (dict(num_attention_heads=None), r"missing required keys \['num_attention_heads'\]"),
    (dict(num_key_value_heads=3), r"must be a multiple of num_kv_heads=3"),
])
def test_config_errors(change, message):
  hf_config = {**json.loads(hf_builders.build_config("llama").to_json_string()), **change}
  with pytest.raises(ValueError, match=message):
    hf.config_from_hf(hf_config)


def test_qwen2_sliding_window_is_refused():
  hf_config = json.loads(hf_builders.build_config("qwen2").to_json_string())
  del hf_config["layer_types"]
  ok = hf.config_from_hf(dict(hf_config, use_sliding_window=True, max_window_layers=2))
  assert ok.sliding_window is None  # the window starts after the last layer: no layer uses it
  with pytest.raises(ValueError, match="Qwen2 sliding-window attention"):
    hf.config_from_hf(dict(hf_config, use_sliding_window=True, max_window_layers=1))


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_config_to_hf_round_trips(hf_model_factory, variant):
  cfg = hf.config_from_hf(hf_model_factory(variant)[0])
  assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg


# ----------------------------------------------------------------------------- checkpoints

def test_checkpoint_round_trip_and_export_cli(exported, tmp_path):
  src, model, cfg, params, _ = exported("mixtral")
  ckpt = tmp_path / "ckpt"
  checkpoint.save_model(ckpt, params, cfg, tokenizer_src=src)
  assert checkpoint.is_checkpoint(ckpt) and not checkpoint.is_checkpoint(src)
  assert (ckpt / "tokenizer" / "tokenizer.json").is_file()
  cfg2, params2 = checkpoint.load_model(ckpt)
  assert cfg2 == cfg
  _assert_same_params(params, params2)
  with pytest.raises(ValueError, match="is a Hugging Face model directory"):
    checkpoint.load_model(src)
  with pytest.raises(ValueError, match="is not empty"):
    checkpoint.save_model(ckpt, params, cfg)

  # The CLI end to end, as a user runs it.
  out = tmp_path / "hf"
  run = subprocess.run([sys.executable, "-m", "jaxsft.export", "--checkpoint", str(ckpt),
                        "--out", str(out), "--max-shard-size", "100KB"],
                       capture_output=True, text=True, cwd=REPO, env=_cpu_env())
  assert run.returncode == 0, run.stderr
  assert (out / hf.INDEX_FILE).is_file()
  _assert_same_tensors(_tensors(src), _tensors(out))
  loaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
  tokens = torch.tensor(_tokens())
  with torch.no_grad():
    assert torch.equal(loaded(tokens).logits, model(tokens).logits)
  # The weights spread over the accelerators (8 simulated devices here)
  # instead of one host device: the same files.
  spread = tmp_path / "hf_spread"
  run = subprocess.run([sys.executable, "-m", "jaxsft.export", "--checkpoint", str(ckpt),
                        "--out", str(spread), "--max-shard-size", "100KB", "--device",
                        "accelerators"], capture_output=True, text=True, cwd=REPO,
                       env={**_cpu_env(), "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
                                                     + " --xla_force_host_platform_device_count=8"})
  assert run.returncode == 0, run.stderr
  _assert_same_tensors(_tensors(out), _tensors(spread))


def test_save_is_all_or_nothing(exported, tmp_path, monkeypatch):
  _, _, cfg, params, _ = exported("llama")
  calls = []

  def failing_write(path, entries, dtype, tensors):
    calls.append(path)
    if len(calls) == 2:  # the second shard fails half-written
      path.write_bytes(b"partial")
      raise OSError("disk full")
    return real_write(path, entries, dtype, tensors)

  real_write = hf._write_safetensors
  monkeypatch.setattr(hf, "_write_safetensors", failing_write)
  with pytest.raises(OSError, match="disk full"):
    hf.save_params(params, cfg, tmp_path / "out", max_shard_bytes=SHARD_BYTES)
  assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary directory

  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "old.txt").write_text("x")
  with pytest.raises(ValueError, match="is not empty"):
    hf.save_params(params, cfg, tmp_path / "out")
  monkeypatch.undo()
  hf.save_params(params, cfg, tmp_path / "out", overwrite=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
  assert not (tmp_path / "out" / "old.txt").exists()


def test_legacy_names_and_ignorable_tensors(hf_model_factory, tmp_path):
  src, _ = hf_model_factory("llama")
  cfg, params = hf.load_params(src)
  tensors = {name.replace("input_layernorm", "ln1").replace("post_attention_layernorm", "ln2"): t
             for name, t in _tensors(src).items()}
  tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
  config = json.loads((src / "config.json").read_text())
  _write_model(tmp_path, dict(config, model_type="Yi"), tensors)
  _, params2 = hf.load_params(tmp_path)
  _assert_same_params(params, params2)


# ----------------------------------------------------------------------------- sharding

_MESH_SCRIPT = textwrap.dedent("""
    import contextlib, io, json, os, sys
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")
    import jax, numpy as np, safetensors.numpy
    from jaxsft import checkpoint, evaluate, generate, hf, sharding
    from jaxsft.models import llama

    def tensors(d):
      return {k: v for f in sorted(os.listdir(d)) if f.endswith(".safetensors")
              for k, v in safetensors.numpy.load_file(os.path.join(d, f)).items()}

    assert jax.device_count() == 8
    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 2, "expert": 2})
    for src, ckpt, out in zip(*[iter(sys.argv[1:])] * 3):
      cfg = hf.config_from_hf(src)
      want = sharding.param_shardings(llama.abstract_params(cfg), mesh)
      assert sum(not s.is_fully_replicated for s in jax.tree.leaves(want)) > 5
      cfg1, from_hf = hf.load_params(src, mesh=mesh)
      cfg2, from_ckpt = checkpoint.load_model(ckpt, mesh=mesh)
      assert cfg1 == cfg2 == cfg
      for params in (from_hf, from_ckpt):
        wrong = jax.tree.map(lambda x, s: None if x.sharding == s else (x.sharding, s),
                             params, want)
        assert not jax.tree.leaves(wrong), wrong
      np.testing.assert_equal(jax.tree.map(np.asarray, from_hf),
                              jax.tree.map(np.asarray, from_ckpt))
      # Gathering the sharded arrays for export gives back the source bit for bit.
      hf.save_params(from_hf, cfg, out, max_shard_bytes=60000)
      a, b = tensors(src), tensors(out)
      assert sorted(a) == sorted(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)

      # Inference on the mesh: the fullest device's share of the weights as
      # counted before loading, the same greedy tokens as one device, and a KV
      # cache split like the weights.
      per_device = {}
      for leaf in jax.tree.leaves(from_hf):
        for shard in leaf.addressable_shards:
          per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
      abstract = llama.abstract_params(cfg)
      assert generate.weight_bytes_per_device(abstract, mesh) == max(per_device.values())
      assert generate.weight_bytes_per_device(abstract, mesh) < (
          generate.weight_bytes_per_device(abstract) / 2)
      _, single = hf.load_params(src)
      prompts = [list(range(3, 3 + n)) for n in (5, 11, 2)]
      want = generate.generate(cfg, single, prompts, 12, eos_token_ids=())
      with jax.set_mesh(mesh):
        assert generate.generate(cfg, from_hf, prompts, 12, eos_token_ids=()) == want
        k = jax.jit(lambda: llama.init_cache(cfg, 4, 32))()["k"]
      assert k.sharding.shard_shape(k.shape)[1] == 1, k.sharding  # rows over fsdp x expert
      assert k.sharding.shard_shape(k.shape)[3] == cfg.num_kv_heads // 2, k.sharding  # tensor

    # The CLIs' --mesh (the last model): what one device prints.
    def cli(main, *args):
      buf = io.StringIO()
      with contextlib.redirect_stdout(buf):
        assert main(["--model", src, *args]) == 0
      return buf.getvalue()
    spread = ["--mesh", "fsdp=2,tensor=2,expert=2"]
    prompt = ["--prompt", "the quick brown fox", "--max-new-tokens", "12"]
    assert cli(generate.main, *prompt, *spread) == cli(generate.main, *prompt)
    data = os.path.join(out, "rows.jsonl")
    with open(data, "w") as f:
      f.writelines(json.dumps({"text": t}) + "\\n" for t in ("one two three four", "five six"))
    loss = [json.loads(cli(evaluate.main, "--data", data, *m).splitlines()[-1])["loss"]
            for m in ([], ["--mesh", "tensor=-1"])]
    assert abs(loss[0] - loss[1]) < 1e-5, loss
    def cli_error(*args):
      err = io.StringIO()
      with contextlib.redirect_stderr(err):
        assert generate.main(["--model", src, *prompt, *args]) == 2
      return err.getvalue()
    assert "needs 3 devices, but 8 are available" in cli_error("--mesh", "tensor=3")
    # Devices that report a memory limit (a GPU's; the CPU's reports none) and
    # hold the weights split 8 ways but not whole: refused before loading, with
    # the flag to pass, which fits.
    spread8 = generate.weight_bytes_per_device(
        llama.abstract_params(cfg), sharding.make_mesh({"fsdp": 8}))
    sharding.device_bytes = lambda device: int(spread8 / 0.9) + 1
    err = cli_error()
    assert "per device on one device" in err and "--mesh tensor=N or fsdp=N" in err, err
    assert "jax sees 8" in err, err
    generate.check_fits(llama.abstract_params(cfg), sharding.make_mesh({"fsdp": 8}), src)
    print("ok")
""")


def _cpu_env():
  return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}


def test_sharded_load_and_inference_on_eight_devices(exported, tmp_path):
  args = []
  for variant in ("mixtral", "llama_bias"):
    _, _, cfg, params, out = exported(variant)
    ckpt = tmp_path / variant
    checkpoint.save_model(ckpt, params, cfg)
    args += [str(out), str(ckpt), str(tmp_path / f"{variant}_export")]
  run = subprocess.run([sys.executable, "-c", _MESH_SCRIPT, *args], capture_output=True,
                       text=True, cwd=REPO, env=_cpu_env())
  assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


# ----------------------------------------------------------------------------- bad inputs

def _write_model(d: pathlib.Path, config: dict, tensors: dict):
  d.mkdir(parents=True, exist_ok=True)
  (d / "config.json").write_text(json.dumps(config))
  safetensors.numpy.save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


class _Tripwire:
  """Unpickling this creates a file: proof that something unpickled."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _missing_dir(src, d):
  return d / "nope"


def _no_config(src, d):
  d.mkdir()
  shutil.copy(src / "model.safetensors", d)
  return d


def _gpt2(src, d):
  shutil.copytree(src, d)
  config = json.loads((d / "config.json").read_text())
  (d / "config.json").write_text(json.dumps(dict(config, model_type="gpt2")))
  return d


def _pickle_only(src, d):
  d.mkdir()
  shutil.copy(src / "config.json", d)
  (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Tripwire(d / "UNPICKLED")))
  return d


def _missing_shard(src, d):
  cfg, params = hf.load_params(src)
  hf.save_params(params, cfg, d, max_shard_bytes=SHARD_BYTES)
  sorted(d.glob("model-*.safetensors"))[1].unlink()
  return d


def _truncated(src, d):
  shutil.copytree(src, d)
  data = (d / "model.safetensors").read_bytes()
  (d / "model.safetensors").write_bytes(data[:len(data) // 2])
  return d


def _wrong_shape(src, d):
  tensors = _tensors(src)
  name = "model.layers.1.self_attn.q_proj.weight"
  tensors[name] = tensors[name][:-1]
  _write_model(d, json.loads((src / "config.json").read_text()), tensors)
  return d


def _missing_tensor(src, d):
  tensors = _tensors(src)
  del tensors["model.layers.1.mlp.up_proj.weight"]
  _write_model(d, json.loads((src / "config.json").read_text()), tensors)
  return d


def _extra_tensor(src, d):
  tensors = _tensors(src)
  tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
  _write_model(d, json.loads((src / "config.json").read_text()), tensors)
  return d


BAD_INPUTS = {
    "missing_dir": (_missing_dir, r"nope does not exist"),
    "no_config": (_no_config, r"neither a jaxsft checkpoint .* nor a Hugging Face model"),
    "gpt2": (_gpt2, r"model_type 'gpt2' is not supported; supported model types: \["),
    "pickle_only": (_pickle_only, r"pytorch_model\.bin.*never unpickles.*save_pretrained"),
    "missing_shard": (_missing_shard,
                      r"shard model-00002-of-\d{5}\.safetensors listed in .*index\.json is "
                      r"missing"),
    "truncated": (_truncated, r"cannot read .*model\.safetensors: .*truncated or corrupt"),
    "wrong_shape": (_wrong_shape, r"tensor model\.layers\.1\.self_attn\.q_proj\.weight in "
                    r".*model\.safetensors has shape \[63, 64\], but config\.json implies "
                    r"\[64, 64\]"),
    "missing_tensor": (_missing_tensor,
                       r"tensor model\.layers\.1\.mlp\.up_proj\.weight not found in .* "
                       r"\(searched model\.safetensors\)"),
    "extra_tensor": (_extra_tensor, r"has 1 tensor\(s\) that are not part of the model .*"
                     r"model\.layers\.0\.self_attn\.q_proj\.bias"),
}
# The library's message where the CLI words it differently.
LIBRARY_MESSAGES = {"missing_dir": r"model directory .*nope does not exist",
                    "no_config": r"has no config\.json"}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_a_clear_error(case, hf_model_factory, tmp_path, capsys):
  make, message = BAD_INPUTS[case]
  src, _ = hf_model_factory("llama")
  bad = make(src, tmp_path / "bad")
  with pytest.raises(ValueError, match=LIBRARY_MESSAGES.get(case, message)):
    hf.load_params(bad)
  capsys.readouterr()  # drop what building the fixtures printed
  assert export.main(["--checkpoint", str(bad), "--out", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  assert re.search(message, err), err
  assert not (tmp_path / "out").exists()
  assert not (tmp_path / "bad" / "UNPICKLED").exists()


def _export_error(capsys, *argv) -> str:
  """``jaxsft.export`` with ``argv``: its one-line error (exit code 2 asserted)."""
  capsys.readouterr()
  assert export.main([str(a) for a in argv]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  return err


def test_export_never_replaces_the_checkpoint_or_run_it_reads(exported, tmp_path, capsys):
  """--out naming the checkpoint being exported, a directory holding it, or a
  training run is refused before anything is read, --overwrite or not; each
  stays as it was."""
  src, _, cfg, params, _ = exported("llama")
  run = tmp_path / "run"
  final = run / "stages" / "sft" / "final"
  checkpoint.save_model(final, params, cfg, tokenizer_src=src)
  (run / "config.json").write_text(json.dumps({"output_dir": str(run)}))
  before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
  for out, message in ((final, "is the checkpoint being exported"),
                       (final.parent, "contains the checkpoint being exported"),
                       (run, "holds a jaxsft training run")):
    err = _export_error(capsys, "--checkpoint", final, "--out", out, "--overwrite")
    assert message in err and "choose another" in err, err
  assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
  _assert_same_params(params, checkpoint.load_model(final)[1])
  # Any export into a run directory: an HF source too.
  assert "holds a jaxsft training run" in _export_error(capsys, "--checkpoint", src, "--out",
                                                        run, "--overwrite")
  # A Hugging Face directory may be rewritten in place (read whole first).
  inplace = tmp_path / "inplace"
  shutil.copytree(src, inplace)
  capsys.readouterr()
  assert export.main(["--checkpoint", str(inplace), "--out", str(inplace), "--overwrite"]) == 0
  _assert_same_tensors(_tensors(src), _tensors(inplace))
  assert "add --peft" in _export_error(capsys, "--checkpoint", final, "--out", tmp_path / "o",
                                       "--base-model", "meta-llama/Llama-3.2-1B")


def test_a_run_or_a_training_checkpoint_given_as_the_model_says_where_the_model_is(
    exported, tmp_path, capsys):
  src, _, cfg, params, _ = exported("llama")
  run = tmp_path / "run"
  checkpoint.save_model(run / "stages" / "cpt" / "final", params, cfg, tokenizer_src=src)
  (run / "config.json").write_text(json.dumps({"output_dir": str(run)}))
  step = run / "stages" / "sft" / "checkpoints" / "3"
  (step / "state").mkdir(parents=True)
  (step / "_CHECKPOINT_METADATA").write_text("{}")
  err = _export_error(capsys, "--checkpoint", run, "--out", tmp_path / "out")
  assert "is a jaxsft training run, not a model" in err, err
  assert str(run / "stages" / "cpt" / "final") in err, err
  with pytest.raises(ValueError, match="is a jaxsft training run"):
    generate.load_for_inference(run)
  err = _export_error(capsys, "--checkpoint", step, "--out", tmp_path / "out")
  assert "is a training checkpoint" in err and "stages/NAME/final" in err, err
  assert not (tmp_path / "out").exists()


def _truncate_data_file(params_dir: pathlib.Path) -> None:
  """Cut the largest data file of an orbax (OCDBT) tree, one holding array
  chunks rather than metadata, to 10 bytes."""
  files = [p for p in params_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
  assert files, sorted(params_dir.rglob("*"))
  largest = max(files, key=lambda p: p.stat().st_size)
  largest.write_bytes(largest.read_bytes()[:10])


def test_a_damaged_checkpoint_is_a_clear_error(exported, tmp_path, capsys):
  src, _, cfg, params, _ = exported("llama")
  good = tmp_path / "good"
  checkpoint.save_model(good, params, cfg, tokenizer_src=src)
  truncated = tmp_path / "truncated"
  shutil.copytree(good, truncated)
  _truncate_data_file(truncated / checkpoint.PARAMS_DIR)
  with pytest.raises(ValueError, match=r"truncated.*: its parameters cannot be read \(.*\); the "
                     r"checkpoint is damaged or incomplete"):
    checkpoint.load_model(truncated)
  # Export reads a layer at a time (TensorStore, not orbax): the same advice.
  err = _export_error(capsys, "--checkpoint", truncated, "--out", tmp_path / "out")
  assert re.search(r"truncated/params: parameter \S+ cannot be read \(.*\); the checkpoint is "
                   r"damaged", err), err
  assert not (tmp_path / "out").exists()

  bad_config = tmp_path / "bad_config"
  shutil.copytree(good, bad_config)
  (bad_config / checkpoint.CONFIG_FILE).write_text("{\n  'hidden_size': 64")
  err = _export_error(capsys, "--checkpoint", bad_config, "--out", tmp_path / "out")
  assert f"{bad_config / checkpoint.CONFIG_FILE} cannot be read as a model config" in err, err
  with pytest.raises(ValueError, match="cannot be read as a model config"):
    generate.load_for_inference(bad_config)


def test_a_damaged_tokenizer_file_is_named(hf_model_factory, tmp_path, capsys):
  src = tmp_path / "src"
  shutil.copytree(hf_model_factory("llama")[0], src)
  (src / "tokenizer.json").write_text('{"version": ')
  err = _export_error(capsys, "--checkpoint", src, "--out", tmp_path / "out")
  assert f"{src / 'tokenizer.json'} is not valid JSON" in err, err
  assert "trust-remote-code" not in err, err


def test_export_cli_error_in_a_subprocess(hf_model_factory, tmp_path):
  bad = _gpt2(hf_model_factory("llama")[0], tmp_path / "bad")
  run = subprocess.run([sys.executable, "-m", "jaxsft.export", "--checkpoint", str(bad), "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO,
                       env=_cpu_env())
  assert run.returncode == 2 and run.stderr.startswith("error: "), run.stderr
  assert "model_type 'gpt2' is not supported" in run.stderr and "Traceback" not in run.stderr


def test_export_peft_of_a_plain_model_is_refused(hf_model_factory, tmp_path, capsys):
  src, _ = hf_model_factory("llama")
  assert export.main(["--checkpoint", str(src), "--out", str(tmp_path / "out"), "--peft"]) == 2
  err = capsys.readouterr().err
  assert "error: " in err and "has no adapters" in err and "without --peft" in err
  assert not (tmp_path / "out").exists()


def test_remote_code_tokenizer_needs_explicit_trust(hf_model_factory, tmp_path, capsys,
                                                    monkeypatch):
  src = tmp_path / "src"
  shutil.copytree(hf_model_factory("llama")[0], src)
  config = json.loads((src / "tokenizer_config.json").read_text())
  config.update(tokenizer_class="CustomTokenizer", auto_map={
      "AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]})
  (src / "tokenizer_config.json").write_text(json.dumps(config))
  capsys.readouterr()
  (src / "tokenization_custom.py").write_text(textwrap.dedent("""
      import pathlib
      pathlib.Path(__file__).with_name("RAN").touch()
      from transformers import PreTrainedTokenizerFast
      class CustomTokenizer(PreTrainedTokenizerFast):
        pass
  """))
  assert export.main(["--checkpoint", str(src), "--out", str(tmp_path / "out")]) == 2
  assert "pass --trust-remote-code" in capsys.readouterr().err
  assert not (src / "RAN").exists() and not (tmp_path / "out").exists()

  # Trusted, the flag reaches transformers (stubbed here, so that no code runs
  # and nothing lands in the user's module cache) and the code file is exported.
  calls = []
  monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                      lambda path, **kw: calls.append(kw))
  assert export.main(["--checkpoint", str(src), "--out", str(tmp_path / "out"),
                      "--trust-remote-code"]) == 0
  assert calls == [{"trust_remote_code": True}]
  assert (tmp_path / "out" / "tokenization_custom.py").is_file()


def test_save_rejects_params_that_do_not_match_the_config(exported, tmp_path):
  _, _, cfg, params, _ = exported("llama")
  with pytest.raises(ValueError, match=r"parameter layers/\S+ has shape \[2, [^]]*\], but the "
                     r"model config implies \[3, "):
    hf.save_params(params, cfg.replace(num_layers=3), tmp_path / "a")
  with pytest.raises(ValueError, match=r"missing \['lm_head/kernel_dv'\]"):
    hf.save_params({k: v for k, v in params.items() if k != "lm_head"}, cfg, tmp_path / "b")
  with pytest.raises(ValueError, match="params do not match the model config"):
    checkpoint.save_model(tmp_path / "c", params, cfg.replace(num_layers=3))
  assert list(tmp_path.iterdir()) == []


def test_parse_size():
  assert export.parse_size("5GB") == 5 * 10**9
  assert export.parse_size("2GiB") == 2 * 2**30
  assert export.parse_size("1.5 MB") == 1_500_000
  assert export.parse_size("100") == 100
  for bad in ("", "5XB", "-1GB", "0"):
    with pytest.raises(ValueError, match="not a positive size"):
      export.parse_size(bad)
