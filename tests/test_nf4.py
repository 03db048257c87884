"""QLoRA's 4-bit base (jaxsft/peft/nf4.py) against bitsandbytes, and a QLoRA
stage against transformers' 4-bit model with PEFT's LoRA on it (fp32 compute,
tiny models, bitsandbytes' CPU kernels)."""
from __future__ import annotations

import gc
import json
import shutil

import bitsandbytes.functional as bnb_f
import bitsandbytes.nn as bnb_nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import peft
import pytest
import torch
import transformers

import hf_builders
import peft_fixtures
from jaxsft import checkpoint as checkpoint_lib
from jaxsft import config as config_lib
from jaxsft import export as export_lib
from jaxsft import generate
from jaxsft import hf, optim, trainer
from jaxsft import sharding as sharding_lib
from jaxsft.models import llama
from jaxsft.peft import export as peft_export
from jaxsft.peft import methods, nf4

TOKENS = np.random.default_rng(0).integers(3, hf_builders.VOCAB, size=(2, 12))


def test_tables_are_bitsandbytes_s():
  np.testing.assert_array_equal(nf4.NF4, bnb_f.get_4bit_type("nf4", device="cpu").numpy())
  np.testing.assert_array_equal(nf4.dynamic_map(), bnb_f.create_dynamic_map().numpy())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_codes_and_scales_are_bitsandbytes_s(dtype):
  """Without double quantization every byte equals bitsandbytes'; so does
  the dequantized weight."""
  rng = np.random.default_rng(1)
  w = torch.tensor(0.02 * rng.standard_normal((96, 192)), dtype=torch.float32).to(
      getattr(torch, dtype))
  codes, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                     compress_statistics=False)
  parts = nf4._quantize_2d(jnp.asarray(w.float().numpy()).astype(dtype), double_quant=False)
  np.testing.assert_array_equal(np.asarray(parts["codes"]).reshape(-1), codes.numpy().reshape(-1))
  np.testing.assert_array_equal(np.asarray(parts["absmax"]).reshape(-1), state.absmax.numpy())
  np.testing.assert_array_equal(
      np.asarray(nf4._dequantize_2d(parts, dtype).astype(jnp.float32)),
      bnb_f.dequantize_4bit(codes, state).float().numpy())


def test_double_quantization_rounds_the_scales_to_the_nearest_code():
  """Double quantization: the 4-bit codes equal bitsandbytes'; the 8-bit
  absmax codes too, except where bitsandbytes' CPU kernel (a SIMD binary
  search) picks a code that is not the nearest: there ours is nearer. The
  mean (the offset) and the block scales agree to float32 rounding."""
  rng = np.random.default_rng(2)
  w = torch.tensor(0.02 * rng.standard_normal((256, 4096)), dtype=torch.float32)
  codes, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
  parts = nf4._quantize_2d(jnp.asarray(w.numpy()), double_quant=True)
  np.testing.assert_array_equal(np.asarray(parts["codes"]).reshape(-1), codes.numpy().reshape(-1))
  np.testing.assert_allclose(float(parts["offset"][0]), float(state.offset), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(parts["scale"]), state.state2.absmax.numpy(), rtol=1e-6)

  ours, theirs = np.asarray(parts["absmax"]).reshape(-1), state.absmax.numpy()
  differ = np.nonzero(ours != theirs)[0]
  assert len(differ) < 0.005 * len(ours), len(differ)
  _, raw = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
  table = nf4.dynamic_map()
  scale = np.asarray(parts["scale"])[differ // 256]
  x = (raw.absmax.numpy()[differ] - np.float32(parts["offset"][0])) / scale
  assert np.all(np.abs(x - table[ours[differ]]) <= np.abs(x - table[theirs[differ]]))
  # Those few flips move the weights far less than 4-bit rounding itself does.
  ours_w = np.asarray(nf4._dequantize_2d(parts, jnp.float32))
  theirs_w = bnb_f.dequantize_4bit(codes, state).numpy()
  assert np.abs(ours_w - theirs_w).max() < 0.1 * np.abs(theirs_w - w.numpy()).max()


def test_backward_recomputes_the_weight_and_gives_autodiff_s_gradient():
  rng = np.random.default_rng(3)
  w = jnp.asarray(0.05 * rng.standard_normal((128, 4, 16)), jnp.float32)  # [in, n, h]
  names = nf4.part_names("q_dnh", 1, True)
  stored = nf4.quantize(w, 1, names, stacked=False, double_quant=True)
  x = jnp.asarray(rng.standard_normal((2, 5, 128)), jnp.float32)
  r = jnp.asarray(rng.standard_normal((2, 5, 4, 16)), jnp.float32)
  dense_w = nf4.dequantize(stored, w.shape, jnp.float32)
  ours = jax.grad(lambda v: jnp.sum(nf4.project(v, stored, w.shape, 1, jnp.float32) * r))(x)
  ref = jax.grad(lambda v: jnp.sum(jnp.einsum("btd,dnh->btnh", v, dense_w) * r))(x)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-5, rtol=1e-5)
  # Only the stored parts are kept for the backward pass, not the weight.
  residuals = jax.vjp(lambda v: nf4.project(v, stored, w.shape, 1, jnp.float32), x)[1]
  kept = [a for a in jax.tree_util.tree_leaves(residuals) if hasattr(a, "shape")]
  assert not any(a.shape in ((128, 64), (64, 128), (128, 4, 16)) for a in kept)


def _hf_dir(root, variant="llama"):
  """A tiny model whose projections are whole 64-wide blocks."""
  d = root / f"hf_qlora_{variant}"
  if not d.is_dir():
    hf_builders.build_model(variant, intermediate_size=128).save_pretrained(d)
    hf_builders.build_tokenizer().save_pretrained(d)
  return d


def _bnb_model(hf_dir, double_quant: bool):
  """transformers' ``load_in_4bit`` model of ``hf_dir``, computing in fp32.

  On a CPU with AVX512-BF16 (AMD EPYC hosts, some Xeons), bitsandbytes runs
  a ``Linear4bit`` in eval mode without gradients through a fused kernel that
  casts the input to bf16, whatever the compute dtype says (logits ~1e-2 off
  fp32). The reference here is the fp32 dequantize-then-matmul path, which
  is what bitsandbytes runs everywhere else (GPUs, other CPUs, training)."""
  quant = transformers.BitsAndBytesConfig(
      load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
      bnb_4bit_compute_dtype=torch.float32)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      hf_dir, quantization_config=quant, device_map="cpu", dtype=torch.float32)
  layers = [m for m in model.modules() if isinstance(m, bnb_nn.Linear4bit)]
  assert layers, "transformers' load_in_4bit made no Linear4bit"
  for m in layers:
    m.support_avx512bf16_for_cpu = False
  return model


def _stored(cfg, params, stage, double_quant):
  """``params`` with the frozen projections in 4 bits, as a QLoRA stage holds them."""
  return nf4.store(params, optim.trainable_mask(params, stage), double_quant)


QLORA_NO_DQ = config_lib.stage(method="lora", peft=dict(rank=4, alpha=8.0, quantization="nf4",
                                                        double_quant=False))


def _model_with_adapter(hf_dir, root, seed):
  """(cfg, params) of the HF model at ``hf_dir`` with LoRA factors drawn
  from ``seed`` (as training would leave them), and their PEFT adapter
  directory under ``root``."""
  cfg, params = hf.load_params(hf_dir)
  cfg, params = methods.prepare(cfg, params, QLORA_NO_DQ, jax.random.key(0))
  rng = np.random.default_rng(seed)
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: (jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype)
                    if "_lora_" in sharding_lib.path_names(p)[-1] else x), params)
  adapter = root / "adapter"
  adapter.mkdir()
  peft_export.save_adapter(cfg, params, adapter, str(hf_dir))
  return cfg, params, adapter


def test_qlora_forward_and_gradients_equal_peft_on_transformers_4bit_model(tmp_path):
  """The model a QLoRA stage trains computes what PEFT's LoRA on
  transformers' bitsandbytes 4-bit model computes, and its adapter gradients
  are torch's: logits, greedy tokens and d(loss)/d(factors)."""
  hf_dir = _hf_dir(tmp_path)
  stage = QLORA_NO_DQ
  cfg, params, adapter = _model_with_adapter(hf_dir, tmp_path, seed=4)
  rng = np.random.default_rng(4)
  full_logits, _ = llama.forward(cfg, params, TOKENS)
  stored = _stored(cfg, params, stage, double_quant=False)
  assert nf4.has_stored(stored)
  ours, _ = llama.forward(cfg, stored, TOKENS)
  ours = np.asarray(ours)

  model = peft.PeftModel.from_pretrained(_bnb_model(hf_dir, False), adapter,
                                        is_trainable=True).eval()
  theirs = peft_fixtures.torch_logits(model, TOKENS)
  np.testing.assert_allclose(ours, theirs, atol=2e-5, rtol=0)
  assert np.abs(ours - np.asarray(full_logits)).max() > 1e-2  # the 4 bits matter

  # Greedy decoding over the KV cache reads the 4-bit weights too.
  prompt = [int(t) for t in TOKENS[0, :6]]
  with torch.no_grad():
    want = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, 6:].tolist()
  assert generate.generate(cfg, stored, [prompt], 6, eos_token_ids=()) == [want]

  weights = rng.standard_normal(ours.shape).astype(np.float32)
  trained, frozen = optim.partition(stored, optim.trainable_mask(stored, stage))
  grads = jax.grad(lambda t: jnp.sum(llama.forward(cfg, optim.combine(t, frozen), TOKENS)[0]
                                     * weights))(trained)
  model.zero_grad()
  (model(torch.tensor(TOKENS)).logits * torch.tensor(weights)).sum().backward()
  torch_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
  ours_g = peft_export.lora_tensors(cfg, grads)
  assert ours_g and len(torch_grads) == len(ours_g)
  for name, g in ours_g.items():
    key = name.replace(".weight", ".default.weight")
    torch_name = next(n for n in torch_grads if n.endswith(key.removeprefix("base_model.model.")))
    ref = torch_grads[torch_name].numpy()
    np.testing.assert_allclose(g, ref, atol=1e-4 * np.abs(ref).max(), rtol=0, err_msg=name)


def test_qlora_on_mixtral_quantizes_what_transformers_quantizes(tmp_path):
  """Mixtral: transformers' load_in_4bit makes the attention's projections
  Linear4bit and leaves the fused expert weights and the router as they are;
  so does jaxsft, and the logits of LoRA on that model agree."""
  hf_dir = _hf_dir(tmp_path, "mixtral")
  cfg, params, adapter = _model_with_adapter(hf_dir, tmp_path, seed=5)
  stored = _stored(cfg, params, QLORA_NO_DQ, double_quant=False)
  quantized = {"/".join(sharding_lib.path_names(p)[:-1]) for p, _ in
               jax.tree_util.tree_flatten_with_path(stored)[0]
               if nf4.is_part(sharding_lib.path_names(p))}
  assert quantized == {f"layers/attn/{w}" for w in ("q_dnh", "k_dkh", "v_dkh", "o_nhd")}
  ours, _ = llama.forward(cfg, stored, TOKENS)
  model = peft.PeftModel.from_pretrained(_bnb_model(hf_dir, False), adapter).eval()
  np.testing.assert_allclose(peft_fixtures.torch_logits(model, TOKENS), np.asarray(ours),
                             atol=2e-5, rtol=0)


def test_qlora_stage_ends_with_the_original_base_and_exports_the_adapter_it_trained(
    tmp_path, monkeypatch):
  """A QLoRA run (LLaMA-Factory's quantization_bit=4 with double quantization):
  the projections are read to the host and quantized onto the device a layer
  at a time (no whole projection ever on it in full precision); the state
  holds them in 4 bits; the final model has the original weights beside the
  trained factors; its PEFT export on transformers' 4-bit model gives the
  trained model's logits; with best_metric (made to pick step 2 of 2 and 4 by
  replacing the evaluation's loss with its step) each new best writes the
  factors alone and the stage ends with step 2's factors on the original
  base; and a run killed after a checkpoint resumes to the same final model."""
  hf_dir = _hf_dir(tmp_path)
  _, start = hf.load_params(hf_dir)
  stacked = {x.shape for p, x in jax.tree_util.tree_flatten_with_path(start)[0]
             if nf4.quantizable(sharding_lib.path_names(p))}
  del _
  start = jax.device_get(start)
  gc.collect()
  # Arrays alive before the run (other tests' leftovers in this process) are
  # not the run's; holding them keeps their ids from being reused.
  before = jax.live_arrays()
  seen = {id(a) for a in before}
  layers_written, whole_on_device = [], []
  write_layer = nf4._write_layer

  def watched(out, layer, i):
    layers_written.append(i)
    whole_on_device.extend(a.shape for a in jax.live_arrays() if id(a) not in seen and
                           a.shape in stacked and jnp.issubdtype(a.dtype, jnp.floating))
    return write_layer(out, layer, i)
  monkeypatch.setattr(nf4, "_write_layer", watched)
  evaluate = trainer.evaluate

  def rising(*args, **kwargs):
    row = evaluate(*args, **kwargs)  # evaluation reads the 4-bit state
    return {**row, "loss": float(row["step"])}
  monkeypatch.setattr(trainer, "evaluate", rising)

  qlora = dict(rank=4, alpha=8.0, quantization="nf4")
  c = peft_fixtures.one_stage_config(tmp_path, hf_dir, "lora", steps=4, peft=qlora)
  c.stages.sft.update(eval_every=2, best_metric="loss")
  c.stages.sft.data.eval_fraction = 0.1
  out = trainer.train(c)
  assert len(layers_written) == 7 * 2 and not whole_on_device, whole_on_device
  assert (out / "stages" / "sft" / "best" / trainer.BEST_TRAINED_DIR).is_dir()
  rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  compile_row = next(r for r in rows if r.get("split") == "compile")
  final = out / "stages" / "sft" / "final"
  cfg, params, trained = peft_fixtures.final_with_base_unchanged(out, "sft", hf_dir)
  assert np.abs(trained["layers/attn/q_lora_b_rnh"]).max() > 0
  manager = ocp.CheckpointManager((out / "stages" / "sft" / "checkpoints").resolve(),
                                  item_names=("state", "data"))
  at = {step: peft_fixtures.leaves_by_path(manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore())).state["params"]) for step in (2, 4)}
  assert any(k.endswith("nf4_codes_nd") for k in at[2])  # the checkpoints hold 4 bits
  factors = [k for k in trained if "_lora_" in k]
  assert factors and all(np.array_equal(trained[k], at[2][k]) for k in factors)
  assert not all(np.array_equal(trained[k], at[4][k]) for k in factors)

  # The state held 4 bits (+ scales) per projection weight, not 32.
  plain = peft_fixtures.one_stage_config(tmp_path / "plain", hf_dir, "lora", steps=4,
                                         peft=dict(rank=4, alpha=8.0))
  ph = trainer._Phase(cfg, params, plain.stages.sft, 4, sharding_lib.make_mesh(), 0)
  projections = sum(int(np.prod(x.shape)) for p, x in jax.tree_util.tree_flatten_with_path(
      start)[0] if nf4.quantizable(sharding_lib.path_names(p)))
  saved = ph.state_bytes - compile_row["state_bytes_per_device"]
  assert saved == pytest.approx(projections * (4 - 0.5 - 1 / 64), rel=0.01)

  assert export_lib.main(["--checkpoint", str(final), "--out", str(tmp_path / "a"),
                          "--peft"]) == 0
  model = peft.PeftModel.from_pretrained(_bnb_model(hf_dir, True), tmp_path / "a").eval()
  stage = c.stages.sft
  ours, _ = llama.forward(cfg, _stored(cfg, params, stage, double_quant=True), TOKENS)
  # Double quantization's 8-bit scales may round a few near-ties apart from
  # bitsandbytes' CPU kernel (test above): a looser tolerance than without.
  np.testing.assert_allclose(peft_fixtures.torch_logits(model, TOKENS), np.asarray(ours),
                             atol=2e-3, rtol=0)

  resumed = peft_fixtures.resumed_leaves(c, out, tmp_path / "resumed", "sft", 2, keep=("best",))
  again = ocp.CheckpointManager((tmp_path / "resumed" / "stages" / "sft" / "checkpoints").resolve(),
                                item_names=("state", "data"))
  step4 = peft_fixtures.leaves_by_path(again.restore(4, args=ocp.args.Composite(
      state=ocp.args.StandardRestore())).state["params"])
  for path, x in at[4].items():  # the steps after the resume, 4-bit parts included
    np.testing.assert_array_equal(step4[path], x, err_msg=path)
  for path, x in trained.items():
    np.testing.assert_array_equal(resumed[path], x, err_msg=path)


def test_qlora_after_a_full_stage_from_its_checkpoint_equals_in_memory(tmp_path):
  """full SFT → QLoRA: the QLoRA stage started from the full stage's final
  checkpoint (its projections read to the host) ends where the uninterrupted
  run (the full stage's weights handed over in memory) does, with the full
  stage's weights as its base."""
  hf_dir = _hf_dir(tmp_path)
  c = peft_fixtures.one_stage_config(tmp_path, hf_dir, "full", steps=2, peft={})
  c.stages.qlora = config_lib.stage(**{**c.stages.sft.to_dict(), "method": "lora", "peft": dict(
      rank=4, alpha=8.0, quantization="nf4")})
  out = trainer.train(c)
  again = tmp_path / "again"
  (again / "stages" / "sft").mkdir(parents=True)
  shutil.copy(out / "config.json", again / "config.json")
  shutil.copytree(out / "stages" / "sft" / "final", again / "stages" / "sft" / "final")
  c.output_dir = str(again)
  trainer.train(c)
  _, full = checkpoint_lib.load_model(out / "stages" / "sft" / "final")
  _, first = checkpoint_lib.load_model(out / "stages" / "qlora" / "final")
  _, second = checkpoint_lib.load_model(again / "stages" / "qlora" / "final")
  first, second = peft_fixtures.leaves_by_path(first), peft_fixtures.leaves_by_path(second)
  for path, x in peft_fixtures.leaves_by_path(full).items():
    np.testing.assert_array_equal(first[path], x, err_msg=path)
  for path, x in first.items():
    np.testing.assert_array_equal(second[path], x, err_msg=path)
  assert np.abs(first["layers/mlp/up_lora_b_rf"]).max() > 0


def test_generate_reads_a_model_in_4_bits_as_transformers_load_in_4bit(tmp_path, capsys):
  """``jaxsft.generate --quantization nf4``: the model decodes in its 4-bit
  form (transformers' load_in_4bit with double quantization) and prints the
  tokens transformers' greedy ``generate`` gives on that model."""
  hf_dir = _hf_dir(tmp_path)
  cfg, params, tokenizer = generate.load_for_inference(hf_dir, dtype="float32",
                                                       quantization="nf4")
  assert nf4.has_stored(params)
  model = _bnb_model(hf_dir, True)
  ours, _ = llama.forward(cfg, params, TOKENS)
  np.testing.assert_allclose(peft_fixtures.torch_logits(model, TOKENS), np.asarray(ours),
                             atol=2e-3, rtol=0)
  prompt = "the quick brown fox"
  ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
  with torch.no_grad():
    want = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
  assert generate.main(["--model", str(hf_dir), "--prompt", prompt, "--max-new-tokens", "8",
                        "--dtype", "float32", "--quantization", "nf4"]) == 0
  assert capsys.readouterr().out.strip() == tokenizer.decode(want, skip_special_tokens=True).strip()


@pytest.mark.parametrize("method,peft_kw,needle", [
    ("lora", {"quantization": "int4"}, "peft.quantization='int4' is not 'nf4'"),
    ("dora", {"quantization": "nf4"}, "method 'dora' is not 'lora'"),
    ("full", {"quantization": "nf4"}, "method 'full' is not 'lora'"),
    ("lora", {"quantization": "nf4", "init": "pissa"}, "peft.init='pissa'"),
])
def test_bad_quantization_settings_name_the_key(tmp_path, method, peft_kw, needle):
  c = peft_fixtures.one_stage_config(tmp_path, _hf_dir(tmp_path), method, steps=2,
                                     peft=dict(rank=4, **peft_kw))
  with pytest.raises(ValueError, match="config.stages.sft.peft.quantization"):
    config_lib.validate(c)
  with pytest.raises(ValueError) as e:
    config_lib.validate(c)
  assert needle in str(e.value)


def test_a_width_that_is_not_whole_blocks_is_refused_naming_the_weight():
  with pytest.raises(ValueError, match=r"layers/mlp/down_fd: input width 112 .* multiple of 64"):
    nf4.check_quantizable("layers/mlp/down_fd", (2, 112, 64), 1, stacked=True)
