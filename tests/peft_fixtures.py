"""Shared pieces of the PEFT tests: a Hugging Face model on disk, a one-stage
run from it, resumed runs from a cut-down copy of a run directory, and
logits/leaf views."""
from __future__ import annotations

import pathlib
import shutil

import jax
import numpy as np
import torch

import hf_builders
import train_fixtures
from jaxsft import checkpoint as checkpoint_lib
from jaxsft import config as config_lib
from jaxsft import hf
from jaxsft import sharding as sharding_lib
from jaxsft import trainer


def hf_dir(root: pathlib.Path, variant: str = "llama") -> pathlib.Path:
  """A tiny random HF model (and tokenizer) saved under ``root``, built once."""
  d = root / f"hf_{variant}"
  if not d.is_dir():
    hf_builders.build_model(variant).save_pretrained(d)
    hf_builders.build_tokenizer().save_pretrained(d)
  return d


def one_stage_config(tmp_path: pathlib.Path, source: pathlib.Path, method: str, steps: int,
                     peft: dict):
  """A run of one SFT stage of ``method`` from the HF model at ``source``."""
  files = train_fixtures.write_data(tmp_path / "data")
  c = config_lib.base_config()
  c.output_dir = str(tmp_path / "run")
  c.model.source = str(source)
  c.model.dtype = "float32"
  c.stages.sft = config_lib.stage(
      objective="sft", method=method, lr=5e-3, steps=steps, batch_size=4, seq_len=64,
      log_every=1, checkpoint_every=2, keep_checkpoints=20, warmup_ratio=0.0, peft=peft,
      data=dict(datasets=[str(files["chat"])], template="chatml"))
  return c


def copy_run_until(src: pathlib.Path, dst: pathlib.Path, stage: str, step: int,
                   keep: tuple[str, ...] = ()) -> None:
  """A run directory as a run killed right after its checkpoint of ``step`` left it;
  ``keep``: directories of the stage it had written by then too (e.g. "best")."""
  dst.mkdir(parents=True)
  shutil.copy(src / "config.json", dst / "config.json")
  ck = dst / "stages" / stage / "checkpoints"
  ck.mkdir(parents=True)
  shutil.copytree(src / "stages" / stage / "checkpoints" / str(step), ck / str(step))
  for name in keep:
    shutil.copytree(src / "stages" / stage / name, dst / "stages" / stage / name)


def resumed_leaves(config, src: pathlib.Path, dst: pathlib.Path, stage: str,
                   step: int, keep: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
  """Run ``config`` again in ``dst``, a copy of run ``src`` killed right after
  its checkpoint of ``step`` (``keep``: see ``copy_run_until``); the leaves of
  ``stage``'s final model."""
  copy_run_until(src, dst, stage, step, keep)
  config.output_dir = str(dst)
  trainer.train(config)
  _, params = checkpoint_lib.load_model(dst / "stages" / stage / "final")
  return leaves_by_path(params)


def leaves_by_path(params) -> dict[str, np.ndarray]:
  """Every parameter as a host array, keyed by its path ("layers/attn/q_dnh")."""
  return {"/".join(sharding_lib.path_names(p)): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def final_with_base_unchanged(run: pathlib.Path, stage: str, hf_dir: pathlib.Path):
  """(config, leaves by path) of ``stage``'s final model in ``run``, after
  checking that every weight of the model at ``hf_dir`` is in it unchanged."""
  cfg, params = checkpoint_lib.load_model(run / "stages" / stage / "final")
  trained = leaves_by_path(params)
  _, start = hf.load_params(hf_dir)
  for path, x in leaves_by_path(start).items():
    np.testing.assert_array_equal(trained[path], x, err_msg=f"frozen {path} changed")
  return cfg, params, trained


def torch_logits(model, tokens) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()
