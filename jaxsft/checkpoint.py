"""jaxsft model checkpoints: the model config, the parameters, and the tokenizer.

A checkpoint is a directory:
  model_config.json   ``ModelConfig.to_json()``
  params/             the parameter tree, written by orbax (``StandardCheckpointer``),
                      each stacked layer parameter in chunks of one layer or less
  tokenizer/          tokenizer files, when a source was given

Parameters are restored straight onto their target shardings, or read a
layer at a time on the host (``stored_params``: exporting a model larger than
the host's memory). Hugging Face directories are a different format: see
``jaxsft.hf``.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
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
  # Stacked layer parameters are stored in chunks of at most one layer, so that
  # one layer can be read without the rest (stored_params).
  save_args = jax.tree_util.tree_map_with_path(
      lambda path, _: ocp.SaveArgs(shard_axes=(0,) if _stacked(path) else ()), params)
  # Leaving the block waits for orbax's background writes to finish.
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp.resolve() / PARAMS_DIR, params, save_args=save_args)


def _stacked(path) -> bool:
  """Whether the parameter at ``path`` has the layer axis first (the scanned stack)."""
  return sharding_lib.path_names(path)[0] == "layers"


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
  file = pathlib.Path(path) / CONFIG_FILE
  try:
    return ModelConfig.from_json(file.read_text())
  except (OSError, ValueError, TypeError, AttributeError) as e:
    raise ValueError(f"{file} cannot be read as a model config ({e}); the checkpoint is "
                     "damaged: copy it again or re-run the stage that wrote it") from None


def error_gist(e: BaseException) -> str:
  """The gist of a reader's error: the first line of the innermost error it
  was raised from (orbax wraps TensorStore's), without the long spec
  TensorStore appends."""
  while e.__cause__ is not None or e.__context__ is not None:
    e = e.__cause__ or e.__context__
  text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  return text.split(" [tensorstore_spec=")[0].split(" See full TensorStore details")[0][:400]


def out_of_memory(e: BaseException) -> bool:
  """Whether a failed read ran out of host or device memory (not a fault of
  the files read)."""
  return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e)


def _restore(checkpointer, params_dir: pathlib.Path, target):
  """``checkpointer.restore`` of ``target``, a failure (orbax and TensorStore
  raise their own kinds) as one ValueError that names the checkpoint."""
  try:
    return checkpointer.restore(params_dir, target)
  except Exception as e:  # noqa: BLE001 — whatever the reader raises, the files are at fault
    if out_of_memory(e):
      raise  # the files are not at fault
    raise ValueError(f"{params_dir.parent}: its parameters cannot be read "
                     f"({error_gist(e)}); the checkpoint is damaged or "
                     "incomplete: copy it again or re-run the stage that wrote it") from None


def load_model(path: PathLike, mesh=None, rules=None, dtypes=None,
               host=None) -> tuple[ModelConfig, dict]:
  """The config and parameters of the checkpoint at ``path``, each parameter
  restored onto its sharding from ``sharding.param_shardings(…, mesh, rules)``
  (one device without a mesh), in the dtype it was saved in or, where
  ``dtypes`` (a tree of the parameters' structure) says another, cast to that
  one as it is read. ``host`` (a tree of bools of that structure): its True
  leaves are read into host numpy arrays instead, layer by layer where the
  checkpoint allows (``stored_params``)."""
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
  if host is None or not any(jax.tree_util.tree_leaves(host)):
    with ocp.StandardCheckpointer() as checkpointer:
      params = _restore(checkpointer, path.resolve() / PARAMS_DIR, target)
    return cfg, params
  stored = stored_params(path)

  def read(tree_path, leaf):
    array = stored["/".join(sharding_lib.path_names(tree_path))]
    if not array.sliceable:
      return array.read().astype(leaf.dtype)
    out = np.empty(leaf.shape, leaf.dtype)
    for i in range(leaf.shape[0]):
      out[i] = array.read(i)
    return out
  on_device = jax.tree.map(lambda t, h: None if h else t, target, host)
  with ocp.StandardCheckpointer() as checkpointer:
    # Orbax restores the subtree it is given a target for; the rest is read here.
    placed = _restore(checkpointer, path.resolve() / PARAMS_DIR, on_device)
  return cfg, jax.tree_util.tree_map_with_path(
      lambda p, t, h, x: read(p, t) if h else x, target, host, placed)


class StoredArray:
  """One parameter of a checkpoint on disk: ``read()`` the whole of it, or
  ``read(i)`` its i-th slice along the first axis (one layer of a stacked
  parameter) without reading the rest, when ``sliceable``."""

  def __init__(self, store: ts.TensorStore, where: str = "parameter"):
    self._store, self.where = store, where
    self.shape = tuple(store.shape)
    self.dtype = np.dtype(store.dtype.numpy_dtype)
    chunk = store.chunk_layout.read_chunk.shape
    self.sliceable = bool(self.shape) and chunk is not None and chunk[0] == 1

  def read(self, index: int | None = None) -> np.ndarray:
    return np.asarray(self.read_async(index).result())

  def read_async(self, index: int | None = None) -> "_Read":
    """``read`` started: its ``result()`` is the array; several reads in
    flight at once overlap their I/O."""
    return _Read((self._store if index is None else self._store[index]).read(), self.where)


class _Read:
  """A read in flight; ``result()`` fails as a ValueError naming the
  parameter, and saying what to do, where TensorStore cannot read it."""

  def __init__(self, future: ts.Future, where: str):
    self._future, self._where = future, where

  def result(self) -> np.ndarray:
    try:
      return self._future.result()
    except Exception as e:  # noqa: BLE001 — TensorStore's errors: the file is at fault
      raise ValueError(f"{self._where} cannot be read ({error_gist(e)}); the "
                       "checkpoint is damaged or incomplete: copy it again or re-run the "
                       "stage that wrote it") from None


def stored_params(path: PathLike) -> dict[str, StoredArray]:
  """The parameters of the checkpoint at ``path`` by path (``"layers/mlp/up_df"``),
  opened for reading on the host without holding any of them in memory.

  Orbax restores whole arrays; this opens the same TensorStore arrays that
  orbax wrote (its OCDBT/zarr layout, as the checkpoint's ``_METADATA`` says),
  so that an export can read a stacked parameter one layer at a time.
  Checkpoints written before stacked parameters were chunked by layer read
  whole (``StoredArray.sliceable`` is False)."""
  path = pathlib.Path(path)
  if not is_checkpoint(path):
    raise ValueError(f"{path} is not a jaxsft checkpoint (it needs {CONFIG_FILE} and "
                     f"{PARAMS_DIR}/)")
  params_dir = (path / PARAMS_DIR).resolve()
  meta_file = params_dir / "_METADATA"
  try:
    meta = json.loads(meta_file.read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read {meta_file} (orbax's index of the parameters): {e}; "
                     "the checkpoint is incomplete or not written by jaxsft") from None
  driver = "zarr3" if meta.get("use_zarr3") else "zarr"
  out = {}
  abstract = llama.abstract_params(model_config(path))
  for tree_path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    path_names = sharding_lib.path_names(tree_path)
    name = ".".join(path_names)
    if meta.get("use_ocdbt", True):
      kvstore = {"driver": "ocdbt", "base": f"file://{params_dir}/", "path": f"{name}/"}
    else:
      kvstore = {"driver": "file", "path": f"{params_dir / name}/"}
    try:
      store = ts.open({"driver": driver, "kvstore": kvstore}, open=True, read=True).result()
    except ValueError as e:
      raise ValueError(f"{params_dir}: cannot open parameter {'/'.join(path_names)} "
                       f"({error_gist(e)}); "
                       "the checkpoint is incomplete or does not match its "
                       f"{CONFIG_FILE}") from None
    array = StoredArray(store, f"{params_dir}: parameter {'/'.join(path_names)}")
    if array.shape != tuple(leaf.shape):
      raise ValueError(f"{params_dir}: parameter {'/'.join(path_names)} has shape "
                       f"{list(array.shape)}, but {CONFIG_FILE} implies {list(leaf.shape)}")
    out["/".join(path_names)] = array
  return out
