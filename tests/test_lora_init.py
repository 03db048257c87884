"""PiSSA and OLoRA (``peft.init``) against PEFT's ``init_lora_weights``."""
from __future__ import annotations

import json
import pathlib
import shutil

import jax
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers

import peft_fixtures
from jaxsft import checkpoint as checkpoint_lib
from jaxsft import config as config_lib
from jaxsft import export as export_lib
from jaxsft import hf, trainer
from jaxsft.models import llama
from jaxsft.peft import export as peft_export
from jaxsft.peft import methods

TOKENS = np.random.RandomState(0).randint(3, 300, (2, 16))
RANK, ALPHA = 4, 8.0


def _peft_model(hf_dir, init):
  base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  return peft.get_peft_model(base, peft.LoraConfig(
      r=RANK, lora_alpha=ALPHA, target_modules="all-linear", init_lora_weights=init)).eval()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_factors_and_residual_base_are_peft_s(tmp_path, init):
  """Each projection's B·A and its residual weight equal PEFT's (the factors
  themselves are fixed only up to the signs of singular / QR vectors, which
  neither product nor training depends on); the model computes what the
  original did."""
  hf_dir = peft_fixtures.hf_dir(tmp_path)
  cfg, params = hf.load_params(hf_dir)
  stage = config_lib.stage(method="lora", peft=dict(rank=RANK, alpha=ALPHA, init=init))
  cfg, params = methods.prepare(cfg, params, stage, jax.random.key(0))

  # The live model's keys name the adapter ("lora_A.default"); saved files do not.
  ref = {k.replace(".default.", "."): v.detach().numpy()
         for k, v in _peft_model(hf_dir, init).state_dict().items()}
  ours = peft_export.lora_tensors(cfg, params, np.float32)
  base_dir = tmp_path / "residual"
  hf.save_params(methods.base_params(params), cfg.replace(adapters=None), base_dir)
  residual = safetensors.numpy.load_file(str(base_dir / "model.safetensors"))
  modules = sorted({k.rsplit(".lora_", 1)[0] for k in ours})
  assert len(modules) == 2 * 7  # 2 layers x all-linear
  for m in modules:
    a, b = f"{m}.lora_A.weight", f"{m}.lora_B.weight"
    np.testing.assert_allclose(ours[b] @ ours[a], ref[b] @ ref[a], atol=2e-5, err_msg=m)
    name = m.removeprefix("base_model.model.") + ".weight"
    np.testing.assert_allclose(residual[name], ref[f"{m}.base_layer.weight"], atol=2e-5,
                               err_msg=name)
  original = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
  logits, _ = llama.forward(cfg, params, TOKENS)
  np.testing.assert_allclose(np.asarray(logits), peft_fixtures.torch_logits(original, TOKENS),
                             atol=1e-4, rtol=0)


def test_a_pissa_run_exports_a_peft_adapter_over_its_residual_base(tmp_path):
  """Trained from PiSSA, the --peft export writes the residual base beside the
  adapter (the source model is not its base), PEFT loads the pair with the
  run's logits, the merged export matches too, and --base-model is refused."""
  hf_dir = peft_fixtures.hf_dir(tmp_path)
  config = peft_fixtures.one_stage_config(tmp_path, hf_dir, "lora", 4,
                                          dict(rank=RANK, alpha=ALPHA, init="pissa"))
  out = trainer.train(config)
  final = out / "stages" / "sft" / "final"
  record = json.loads((final / peft_export.BASE_FILE).read_text())
  assert record["base_model_name_or_path"] is None and "'pissa'" in record["base_changed"]
  cfg, params = checkpoint_lib.load_model(final)
  ours = np.asarray(llama.forward(cfg, params, TOKENS)[0])

  adapter = export_lib.export(final, tmp_path / "adapter", peft=True)
  base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
  assert base_path == str((tmp_path / "adapter" / "base").resolve())
  model = peft.PeftModel.from_pretrained(
      transformers.AutoModelForCausalLM.from_pretrained(base_path), adapter).eval()
  np.testing.assert_allclose(peft_fixtures.torch_logits(model, TOKENS), ours, atol=1e-4, rtol=0)
  merged = transformers.AutoModelForCausalLM.from_pretrained(
      export_lib.export(final, tmp_path / "merged")).eval()
  np.testing.assert_allclose(peft_fixtures.torch_logits(merged, TOKENS), ours, atol=1e-4, rtol=0)
  with pytest.raises(ValueError, match="started from 'pissa', which left the residual as the "
                                       "base, so the adapter does not apply to .* convert it to a "
                                       "plain LoRA over the original model with --pissa-convert"):
    export_lib.export(final, tmp_path / "other", peft=True, base_model=str(hf_dir))

  # --pissa-convert: PEFT's conversion to a rank-2r LoRA over the ORIGINAL
  # model, from the factors the stage saved before its first step.
  init_dir = out / "stages" / "sft" / peft_export.LORA_INIT_DIR
  assert record["lora_init"] == str(init_dir.resolve())
  assert pathlib.Path(record["original_base"]).resolve() == hf_dir.resolve()
  plain = export_lib.export(final, tmp_path / "plain", peft=True, pissa_convert=True)
  config = json.loads((plain / "adapter_config.json").read_text())
  assert (config["r"], config["lora_alpha"]) == (2 * RANK, 2 * ALPHA)
  assert config["init_lora_weights"] is True and not (plain / "base").exists()
  model = peft.PeftModel.from_pretrained(
      transformers.AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]),
      plain).eval()
  np.testing.assert_allclose(peft_fixtures.torch_logits(model, TOKENS), ours, atol=1e-4, rtol=0)
  # The same files as PEFT's own conversion: the trained adapter loaded over
  # its residual base, saved with the initial adapter (a copy: PEFT rewrites
  # that directory's config) as path_initial_model_for_weight_conversion.
  initial = tmp_path / "initial" / "pissa_init"
  shutil.copytree(init_dir, initial)
  residual_model = peft.PeftModel.from_pretrained(
      transformers.AutoModelForCausalLM.from_pretrained(base_path), adapter)
  residual_model.save_pretrained(tmp_path / "peft_converted",
                                 path_initial_model_for_weight_conversion=str(initial))
  ref = safetensors.numpy.load_file(str(tmp_path / "peft_converted" / "adapter_model.safetensors"))
  converted = safetensors.numpy.load_file(str(plain / "adapter_model.safetensors"))
  assert set(ref) == set(converted) and len(ref) == 2 * 2 * 7
  for k, v in ref.items():
    np.testing.assert_array_equal(converted[k], v, err_msg=k)
  ref_config = json.loads((tmp_path / "peft_converted" / "adapter_config.json").read_text())
  assert (ref_config["r"], ref_config["lora_alpha"]) == (config["r"], config["lora_alpha"])


@pytest.mark.parametrize("peft_kw,method,needle", [
    (dict(init="pissa", targets=["q_proj", "lm_head"]), "lora", r"leave \['lm_head'\] out"),
    (dict(init="olora"), "dora", "use method 'lora'"),
    (dict(init="loftq"), "lora", "peft.init='loftq' is not one of kaiming, gaussian, pissa"),
])
def test_inits_that_do_not_apply_are_refused(tmp_path, peft_kw, method, needle):
  c = peft_fixtures.one_stage_config(tmp_path, peft_fixtures.hf_dir(tmp_path), method, 2,
                                     dict(rank=RANK, alpha=ALPHA, **peft_kw))
  with pytest.raises(ValueError, match=needle):
    config_lib.validate(c)


def test_pissa_convert_refuses_what_it_cannot_convert(tmp_path):
  """--pissa-convert needs --peft, a PiSSA/OLoRA adapter, and the factors its
  stage started from (saved by the run): each missing piece is named."""
  hf_dir = peft_fixtures.hf_dir(tmp_path)
  for init in ("kaiming", "pissa"):
    cfg, params = hf.load_params(hf_dir)  # (PiSSA's init takes over the base's buffers)
    stage = config_lib.stage(method="lora", peft=dict(rank=RANK, alpha=ALPHA, init=init))
    c, p = methods.prepare(cfg, params, stage, jax.random.key(0))
    checkpoint_lib.save_model(tmp_path / init, p, c)
  with pytest.raises(ValueError, match="--pissa-convert rewrites a PEFT adapter: add --peft"):
    export_lib.export(tmp_path / "pissa", tmp_path / "o1", pissa_convert=True)
  with pytest.raises(ValueError, match="started from 'kaiming' and applies to its base as it "
                                       "is: drop --pissa-convert"):
    export_lib.export(tmp_path / "kaiming", tmp_path / "o2", peft=True, pissa_convert=True)
  # Saved outside a run: no record of the factors it started from.
  with pytest.raises(ValueError, match="cannot convert to a plain LoRA: .*Export without "
                                       "--pissa-convert"):
    export_lib.export(tmp_path / "pissa", tmp_path / "o3", peft=True, pissa_convert=True)
  assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))


def test_a_pissa_stage_that_also_trains_base_weights_has_no_plain_lora_form(tmp_path):
  """PiSSA with peft.train_modules trains base weights too: the run saves no
  starting factors, and --pissa-convert says why it cannot convert."""
  hf_dir = peft_fixtures.hf_dir(tmp_path)
  config = peft_fixtures.one_stage_config(
      tmp_path, hf_dir, "lora", 2, dict(rank=RANK, alpha=ALPHA, init="pissa",
                                        train_modules="final_norm"))
  out = trainer.train(config)
  final = out / "stages" / "sft" / "final"
  record = json.loads((final / peft_export.BASE_FILE).read_text())
  assert "lora_init" not in record
  assert not (out / "stages" / "sft" / peft_export.LORA_INIT_DIR).exists()
  with pytest.raises(ValueError, match="cannot convert to a plain LoRA: .* peft.train_modules, "
                                       "has no plain-LoRA form"):
    export_lib.export(final, tmp_path / "plain", peft=True, pissa_convert=True)
