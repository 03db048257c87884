"""PiSSA and OLoRA (``peft.init``) against PEFT's ``init_lora_weights``."""
from __future__ import annotations

import json

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
                                       "base, so the adapter does not apply to"):
    export_lib.export(final, tmp_path / "other", peft=True, base_model=str(hf_dir))


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
