"""jaxsft model checkpoints: the model config, the parameters, and the tokenizer.

A checkpoint is a directory:
  model_config.json   ``ModelConfig.to_json()``
  params/             the parameter tree, written by orbax (``StandardCheckpointer``)
  tokenizer/          tokenizer files, when a source was given

Parameters are restored straight onto their target shardings. Hugging Face
directories are a different format: see ``jaxsft.hf``.
"""
from __future__ import annotations

import os
import pathlib
import shutil

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxsft import hf
from jaxsft import sharding as sharding_lib
from jaxsft.models import llama
from jaxsft.models.model_config import ModelConfig

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"

PathLike = str | os.PathLike


def is_checkpoint(path: PathLike) -> bool:
  """Whether ``path`` is a jaxsft model checkpoint directory."""
  path = pathlib.Path(path)
  return (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def _shapes(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  return {jax.tree_util.keystr(path): (tuple(x.shape), str(x.dtype))
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def save_model(path: PathLike, params, cfg: ModelConfig,
               tokenizer_src: PathLike | None = None, overwrite: bool = False) -> pathlib.Path:
  """Write ``params`` (matching ``cfg``) and the tokenizer files of ``tokenizer_src``
  as a checkpoint at ``path``; the directory appears only once complete."""
  got, want = _shapes(params), _shapes(llama.abstract_params(cfg))
  if got != want:
    diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    raise ValueError(f"params do not match the model config at {diff[:5]}: got "
                     f"{[got.get(k) for k in diff[:5]]}, the config implies "
                     f"{[want.get(k) for k in diff[:5]]} (shape, dtype)")
  if jax.process_count() > 1:
    return _save_model_multiprocess(pathlib.Path(path), params, cfg, tokenizer_src, overwrite)
  with hf.staged_dir(path, overwrite) as tmp:
    _write(tmp, params, cfg, tokenizer_src)
  return pathlib.Path(path)


def _write(tmp: pathlib.Path, params, cfg: ModelConfig, tokenizer_src, primary: bool = True):
  if primary:
    (tmp / CONFIG_FILE).write_text(cfg.to_json() + "\n")
    if tokenizer_src is not None:
      hf.copy_tokenizer_files(tokenizer_src, tmp / TOKENIZER_DIR)
  # Leaving the block waits for orbax's background writes to finish.
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp.resolve() / PARAMS_DIR, params)


def _save_model_multiprocess(path: pathlib.Path, params, cfg, tokenizer_src, overwrite):
  """The same, when several processes hold parts of ``params``: every process
  writes its shards through orbax into one staging directory (the run
  directory is on a filesystem they share); process 0 writes the rest and
  moves the directory into place once all have finished."""
  primary = jax.process_index() == 0
  tmp = path.with_name(f".{path.name}.partial")
  if primary:
    if path.is_dir() and any(path.iterdir()) and not overwrite:
      raise ValueError(f"output directory {path} is not empty; choose another one or "
                       "overwrite it")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
  multihost_utils.sync_global_devices(f"jaxsft save_model {path}: staged")
  _write(tmp, params, cfg, tokenizer_src, primary)
  multihost_utils.sync_global_devices(f"jaxsft save_model {path}: written")
  if primary:
    if path.exists():
      old = path.with_name(f".{path.name}.old")
      shutil.rmtree(old, ignore_errors=True)
      path.rename(old)
      tmp.rename(path)
      shutil.rmtree(old)
    else:
      tmp.rename(path)
  multihost_utils.sync_global_devices(f"jaxsft save_model {path}: done")
  return path


def model_config(path: PathLike) -> ModelConfig:
  """The model config of the checkpoint at ``path`` (without reading its weights)."""
  return ModelConfig.from_json((pathlib.Path(path) / CONFIG_FILE).read_text())


def load_model(path: PathLike, mesh=None, rules=None, dtypes=None) -> tuple[ModelConfig, dict]:
  """The config and parameters of the checkpoint at ``path``, each parameter
  restored onto its sharding from ``sharding.param_shardings(…, mesh, rules)``
  (one device without a mesh), in the dtype it was saved in or, where
  ``dtypes`` (a tree of the parameters' structure) says another, cast to that
  one as it is read."""
  path = pathlib.Path(path)
  if not is_checkpoint(path):
    if (path / hf.CONFIG_FILE).is_file():
      raise ValueError(f"{path} is a Hugging Face model directory, not a jaxsft checkpoint; "
                       "read it with jaxsft.hf.load_params")
    raise ValueError(f"{path} is not a jaxsft checkpoint (it needs {CONFIG_FILE} and "
                     f"{PARAMS_DIR}/)")
  cfg = model_config(path)
  abstract = llama.abstract_params(cfg)
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
  else:
    shardings = sharding_lib.param_shardings(abstract, mesh,
                                             rules or sharding_lib.DEFAULT_RULES)
  if dtypes is None:
    dtypes = jax.tree.map(lambda a: a.dtype, abstract)
  target = jax.tree.map(lambda a, s, d: jax.ShapeDtypeStruct(a.shape, d, sharding=s),
                        abstract, shardings, dtypes)
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(path.resolve() / PARAMS_DIR, target)
  return cfg, params
