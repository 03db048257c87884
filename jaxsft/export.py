"""Export a model as a Hugging Face directory that transformers loads.

  python -m jaxsft.export --checkpoint PATH --out DIR [--dtype bfloat16|float16|float32]
      [--max-shard-size 5GB] [--overwrite] [--trust-remote-code]
      [--peft [--base-model ID] [--pissa-convert]] [--device host|accelerators]

LoRA/DoRA adapters are merged into the weights; with ``--peft`` the adapters
are written as a PEFT adapter directory instead (``jaxsft.peft.export``),
which ``peft.PeftModel.from_pretrained(base, DIR)`` loads. A PiSSA/OLoRA
adapter applies to the residual base its stage trained over, which the export
writes to ``DIR/base``; ``--pissa-convert`` writes instead the plain LoRA of
rank 2r that applies to the model the stage started from (PEFT's conversion,
LLaMA-Factory's ``pissa_convert``; ``jaxsft.peft.export.to_plain_lora``).

PATH is a jaxsft checkpoint (see ``jaxsft.checkpoint``) or a Hugging Face
model directory (re-exported, e.g. to change dtype or sharding). The output
holds config.json, generation_config.json, safetensors and the tokenizer files.
A model with a classification or reward head (a cls/reward stage) is written
as the family's ``*ForSequenceClassification`` (``score.weight``, num_labels,
id2label/label2id, pad_token_id) for ``AutoModelForSequenceClassification``;
with ``--peft`` its adapter is PEFT's ``SEQ_CLS`` task, the head saved beside
the LoRA factors (see ``jaxsft.peft.export``).
The weights are read and merged in the host's memory (``--device host``, as
LLaMA-Factory's ``export_device: cpu``): exporting needs no accelerator
memory, so an 8B LoRA run's checkpoint exports beside a GPU that trains on,
or one too small for its fp32 weights. A jaxsft checkpoint is streamed: one
layer's module (e.g. its MLP) is read, merged with its adapters and written
at a time (``streamed_tensors``, ``hf.save_tensors``), so the host holds one
module of one layer and the tensor being written, whatever the model's size;
a PEFT export reads the adapter parameters alone. Other sources (a Hugging
Face directory, a checkpoint written before layers were stored one by one)
are read whole: ``--device accelerators`` spreads them over every local
device, for a model larger than the host's memory, and a ``--dtype``
narrower than the weights' is the dtype they are read in (``read_dtypes``).
Mistakes in the arguments or inputs print ``error: …`` and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft import checkpoint as checkpoint_lib
from jaxsft import hf
from jaxsft import sharding as sharding_lib
from jaxsft.models import llama
from jaxsft.models.model_config import EXPERT_TARGETS, PRINCIPAL_INITS
from jaxsft.peft import export as peft_export
from jaxsft.peft import methods as peft_methods

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
  """Bytes in a size such as "5GB" (10^9, as transformers counts), "500MiB" or "1024"."""
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
  unit = m and m.group(2).lower()
  if not m or unit not in _UNITS or float(m.group(1)) <= 0:
    raise ValueError(f"size {text!r} is not a positive size like 5GB, 500MB or 2GiB")
  return int(float(m.group(1)) * _UNITS[unit])


def export(source: hf.PathLike, out: hf.PathLike, dtype: str | None = None,
           max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES, trust_remote_code: bool = False,
           overwrite: bool = False, peft: bool = False,
           base_model: str | None = None, device: str = "host",
           pissa_convert: bool = False) -> pathlib.Path:
  """Write the model at ``source`` (jaxsft checkpoint or HF directory) to ``out``
  in Hugging Face format, adapters merged; with ``peft``, a PEFT adapter
  directory instead, with ``pissa_convert`` a PiSSA/OLoRA adapter as the plain
  LoRA over the stage's original base (see the module docstring)."""
  if pissa_convert and not peft:
    raise ValueError("--pissa-convert rewrites a PEFT adapter: add --peft (a merged export "
                     "needs no conversion)")
  if base_model is not None and not peft:
    raise ValueError("--base-model names the model a PEFT adapter applies to: add --peft "
                     "(a merged export holds its base)")
  source = pathlib.Path(source)
  if not source.is_dir():
    raise ValueError(f"checkpoint {source} does not exist (or is not a directory)")
  _check_out(source, pathlib.Path(out), overwrite)
  if device == "host" and checkpoint_lib.is_checkpoint(source):
    written = _export_streamed(source, pathlib.Path(out), dtype, max_shard_bytes,
                               trust_remote_code, overwrite, peft, base_model, pissa_convert)
    if written is not None:
      return written
  mesh = _export_mesh(device)
  if checkpoint_lib.is_checkpoint(source):
    dtypes = None if peft else read_dtypes(checkpoint_lib.model_config(source), dtype)
    cfg, params = checkpoint_lib.load_model(source, mesh, dtypes=dtypes)
    tokenizer_src = source / checkpoint_lib.TOKENIZER_DIR
  elif (source / hf.CONFIG_FILE).is_file():
    source_cfg = hf.config_from_hf(source)
    dtypes = None if peft else read_dtypes(source_cfg, dtype)
    cfg, params = hf.load_params(source, source_cfg, mesh=mesh, dtypes=dtypes)
    tokenizer_src = source
  else:
    raise ValueError(hf.run_artifact(source) or (
        f"{source} is neither a jaxsft checkpoint ({checkpoint_lib.CONFIG_FILE} and "
        f"{checkpoint_lib.PARAMS_DIR}/) nor a Hugging Face model directory ({hf.CONFIG_FILE} "
        "and safetensors)"))
  tokenizer_src = _checked_tokenizer(tokenizer_src, trust_remote_code)
  if peft:
    base_cfg = cfg.replace(adapters=None)
    return _export_peft(source, cfg, params, pathlib.Path(out), tokenizer_src, dtype,
                        overwrite, base_model, lambda d: hf.save_params(
                            peft_methods.base_params(params), base_cfg, d,
                            tokenizer_src=tokenizer_src, max_shard_bytes=max_shard_bytes,
                            overwrite=True), pissa_convert)
  cfg, params = peft_methods.merge(cfg, params, donate=True)
  return hf.save_params(params, cfg, out, tokenizer_src=tokenizer_src,
                        max_shard_bytes=max_shard_bytes, dtype=dtype, overwrite=overwrite)


def _check_out(source: pathlib.Path, out: pathlib.Path, overwrite: bool) -> None:
  """Refuse an ``out`` that the export would replace before reading a weight:
  one that ``hf.staged_dir`` refuses, and one that is or contains ``source``
  (replacing it deletes the checkpoint being exported; a Hugging Face
  directory may be rewritten in place, having been read whole first)."""
  hf.check_output_dir(out, overwrite)
  src, dst = source.resolve(), out.resolve()
  if src.is_relative_to(dst) and (src != dst or checkpoint_lib.is_checkpoint(source)):
    raise ValueError(f"--out {out} {'is' if src == dst else 'contains'} the checkpoint being "
                     f"exported ({source}); writing there would delete it: choose another --out")


def _export_streamed(source: pathlib.Path, out: pathlib.Path, dtype, max_shard_bytes: int,
                     trust_remote_code: bool, overwrite: bool, peft: bool,
                     base_model: str | None, pissa_convert: bool = False
                     ) -> pathlib.Path | None:
  """``export`` of a jaxsft checkpoint without holding its weights: merged, a
  layer's module at a time (``streamed_tensors``); with ``peft``, the adapter
  from the adapter parameters alone (and, when the base must be written, the
  base streamed too). None when the checkpoint cannot be read a layer at a
  time (stored before layers were stored one by one, or freeze tuning's split
  stack): the caller reads it whole."""
  cfg = checkpoint_lib.model_config(source)
  if cfg.adapters is not None and cfg.adapters.frozen_layers:
    return None
  stored = checkpoint_lib.stored_params(source)
  if not all(a.sliceable for path, a in stored.items() if path.startswith("layers/")):
    return None
  tokenizer_src = _checked_tokenizer(source / checkpoint_lib.TOKENIZER_DIR, trust_remote_code)
  base_cfg = cfg.replace(adapters=None)
  if not peft:
    peft_methods.check_mergeable(cfg)
    return hf.save_tensors(streamed_tensors(cfg, stored, dtype), base_cfg, out,
                           tokenizer_src=tokenizer_src, max_shard_bytes=max_shard_bytes,
                           dtype=dtype, overwrite=overwrite)
  adapter_params: dict = {}
  for path, array in stored.items():
    names = path.split("/")
    if any(peft_methods.is_adapter_name(n) for n in names) or names[0] == "score":
      node = adapter_params
      for n in names[:-1]:
        node = node.setdefault(n, {})
      node[names[-1]] = array.read()
  return _export_peft(source, cfg, adapter_params, out, tokenizer_src, dtype, overwrite,
                      base_model, lambda d: hf.save_tensors(
                          streamed_tensors(base_cfg, stored), base_cfg, d,
                          tokenizer_src=tokenizer_src, max_shard_bytes=max_shard_bytes,
                          overwrite=True), pissa_convert)


def _checked_tokenizer(tokenizer_src: pathlib.Path, trust_remote_code: bool):
  """``tokenizer_src`` once its tokenizer loads (failing before anything is
  written), or None with a warning when it holds no tokenizer files."""
  if any((tokenizer_src / name).is_file() for name in hf.TOKENIZER_FILES):
    hf.load_tokenizer(tokenizer_src, trust_remote_code)
    return tokenizer_src
  print(f"warning: no tokenizer files in {tokenizer_src}; the export will have none",
        file=sys.stderr)
  return None


def streamed_tensors(cfg, stored: dict[str, checkpoint_lib.StoredArray], dtype=None):
  """``hf.save_tensors``' source for the merged model of a ``cfg`` checkpoint
  whose parameters are ``stored`` (``checkpoint.stored_params``), in ``dtype``
  (default: the parameters'): each tensor comes from its module (e.g.
  ``layers/mlp``) read at one layer, adapters folded in as
  ``peft.methods.merge`` folds them (the same values), then cast. The last
  module read is kept, since transformers' order asks for its weights one
  after another; the host holds one layer's module and nothing else."""
  host = sharding_lib.host_device()
  out_dtype = jnp.dtype(dtype or cfg.param_dtype)

  def fold(leaves):
    if cfg.adapters is not None:
      leaves = peft_methods.merged_module(leaves, cfg.adapters)
    return {k: v.astype(out_dtype) for k, v in leaves.items()}
  # XLA casts and merges on all the host's cores (numpy's bf16 cast is serial);
  # one compile per kind of module, the layers sharing theirs.
  fold = jax.jit(fold)
  cache: dict[tuple[str, int | None], dict] = {}

  def module_at(module: str, layer: int | None) -> dict:
    if (module, layer) not in cache:
      cache.clear()  # one module at a time
      prefix = module + "/"
      reads = {path[len(prefix):]: array.read_async(layer)
               for path, array in stored.items()
               if path.startswith(prefix) and "/" not in path[len(prefix):]}
      inputs = {name: reads.pop(name).result() for name in list(reads)}
      with jax.default_device(host):
        leaves = fold(inputs)
      del inputs  # the read arrays go before the next module comes
      cache[(module, layer)] = jax.tree.map(np.asarray, leaves)
    return cache[(module, layer)]

  def tensor(path: str, position: tuple[int, ...]) -> np.ndarray:
    module, name = path.rsplit("/", 1)
    layer = position[0] if path.startswith("layers/") else None
    inner = position[1:] if layer is not None else position
    return module_at(module, layer)[name][inner]

  return tensor


def read_dtypes(cfg, dtype: str | None):
  """The dtype to read each parameter of a ``cfg`` model in when exporting in
  ``dtype``: the narrower of ``dtype`` and the parameter's, so that an fp32
  checkpoint exported in bf16 takes half the memory to hold, with the same
  bytes written (the cast happens on reading instead of on writing). Every
  parameter of a module holding adapter factors is read as saved: merging adds
  the adapter to the full-precision weight before the one rounding. None when
  nothing would be narrower."""
  if dtype is None:
    return None
  narrow = jnp.dtype(dtype)

  def walk(tree):
    adapted = any(peft_methods.is_adapter_name(name) for name in tree)
    out = {}
    for name, leaf in tree.items():
      if hasattr(leaf, "items"):
        out[name] = walk(leaf)
      elif (adapted or not jnp.issubdtype(leaf.dtype, jnp.floating)
            or jnp.dtype(leaf.dtype).itemsize <= narrow.itemsize):
        out[name] = jnp.dtype(leaf.dtype)
      else:
        out[name] = narrow
    return out

  abstract = llama.abstract_params(cfg)
  dtypes = walk(abstract)
  narrowed = any(d != a.dtype for d, a in zip(jax.tree.leaves(dtypes), jax.tree.leaves(abstract)))
  return dtypes if narrowed else None


def _export_mesh(device: str):
  """Where the export holds the weights (module docstring): one host CPU
  device, or every local device (None: the default device)."""
  if device not in ("host", "accelerators"):
    raise ValueError(f"device={device!r}: use 'host' or 'accelerators'")
  host = sharding_lib.host_device() if device == "host" else None
  if host is not None:  # (None: JAX_PLATFORMS without cpu: the accelerators it is)
    return sharding_lib.make_mesh(devices=[host])
  return sharding_lib.make_mesh() if jax.local_device_count() > 1 else None


def _export_peft(source: pathlib.Path, cfg, params, out: pathlib.Path, tokenizer_src, dtype,
                 overwrite: bool, base_model: str | None,
                 write_base: Callable[[pathlib.Path], object],
                 pissa_convert: bool = False) -> pathlib.Path:
  """The adapter of ``params`` (which may hold the adapter parameters alone)
  as a PEFT directory. Its base model is ``base_model`` if given, else the
  Hugging Face directory the checkpoint recorded as identical to its frozen
  weights, else those weights, which ``write_base(DIR)`` writes, exported to
  ``OUT/base``. ``pissa_convert``: a PiSSA/OLoRA adapter as the plain LoRA
  over the model its stage started from (``peft_export.to_plain_lora``)."""
  if cfg.adapters is None:
    raise ValueError(f"{source} has no adapters (method 'full'); export it without --peft")
  record = {}
  if (source / peft_export.BASE_FILE).is_file():
    record = json.loads((source / peft_export.BASE_FILE).read_text())
  changed = record.get("base_changed") or (
      f"its LoRA started from {cfg.adapters.lora_init!r}, which left the residual as the base"
      if cfg.adapters.lora_init in PRINCIPAL_INITS else None)
  init_dir = None
  if pissa_convert:
    init_dir, changed, base_model = _conversion(source, cfg, record, base_model)
  if base_model is not None and changed:
    convert = (", or convert it to a plain LoRA over the original model with --pissa-convert"
               if "lora_init" in record else "")
    raise ValueError(f"{source}: {changed}, so the adapter does not apply to {base_model}; "
                     "export without --base-model (the checkpoint's own base is written to "
                     f"OUT/base beside the adapter){convert}, or merged, without --peft")
  if base_model is None:
    base_model = record.get("base_model_name_or_path")
  np_dtype = {"bfloat16": None, "float16": np.float16, "float32": np.float32, None: np.float32}[
      dtype]
  if np_dtype is None:
    raise ValueError("--dtype bfloat16 is not supported for PEFT adapters (safetensors from "
                     "numpy); use float32 or float16")
  with hf.staged_dir(out, overwrite) as tmp:
    peft_export.save_adapter(cfg, params, tmp, base_model, np_dtype)  # refuses unsupported kinds
    if init_dir is not None:
      peft_export.to_plain_lora(tmp, init_dir)
    if base_model is None:
      write_base(tmp / "base")
      config = json.loads((tmp / peft_export.ADAPTER_CONFIG).read_text())
      config["base_model_name_or_path"] = str((out / "base").resolve())
      (tmp / peft_export.ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer_src is not None:
      hf.copy_tokenizer_files(tokenizer_src, tmp)
  return out


def _conversion(source: pathlib.Path, cfg, record: dict, base_model: str | None):
  """(the stage's initial factors, no base change, the original base) for
  ``--pissa-convert``, or a ValueError saying why this checkpoint has none."""
  if cfg.adapters.lora_init not in PRINCIPAL_INITS:
    raise ValueError(f"{source}: --pissa-convert converts a LoRA that started from PiSSA or "
                     f"OLoRA (peft.init); this one started from {cfg.adapters.lora_init!r} and "
                     "applies to its base as it is: drop --pissa-convert")
  if any(t in EXPERT_TARGETS for t in cfg.adapters.lora_targets):
    raise ValueError(f"{source}: --pissa-convert does not cover LoRA on MoE experts; export "
                     "without it (the adapter and its residual base)")
  if "lora_init" not in record:
    raise ValueError(f"{source}: cannot convert to a plain LoRA: the checkpoint records no "
                     "factors its stage started from (a stage that also trained base weights, "
                     "full_then_lora or peft.train_modules, has no plain-LoRA form; runs of "
                     "several processes, or before jaxsft saved them, did not save them). "
                     "Export without --pissa-convert: the adapter and its residual base in "
                     "OUT/base")
  base_model = base_model or record.get("original_base")
  if base_model is None:
    raise ValueError(f"{source}: the stage did not start from a Hugging Face directory; name "
                     "the model it started from with --base-model")
  return pathlib.Path(record["lora_init"]), None, base_model


def _size_arg(text: str) -> int:
  try:
    return parse_size(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jaxsft.export", description=__doc__.split(
      "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True,
                      help="a jaxsft checkpoint or a Hugging Face model directory")
  parser.add_argument("--out", required=True, help="the Hugging Face directory to write")
  parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                      help="dtype of the saved weights (default: the model's parameter dtype)")
  parser.add_argument("--max-shard-size", type=_size_arg, default=hf.DEFAULT_MAX_SHARD_BYTES,
                      help="largest safetensors file, e.g. 5GB (default) or 2GiB")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace --out if it exists and is not empty")
  parser.add_argument("--trust-remote-code", action="store_true",
                      help="allow a tokenizer that ships its own Python code to be loaded "
                           "(to check it) — only for code you trust")
  parser.add_argument("--peft", action="store_true",
                      help="write a PEFT adapter directory (LoRA, DoRA, prompt/P-/prefix "
                           "tuning; with a head: SEQ_CLS) instead of merged weights")
  parser.add_argument("--base-model",
                      help="with --peft: the adapter config's base_model_name_or_path (e.g. a "
                           "hub id); default: the recorded source directory, or the "
                           "checkpoint's base weights exported to OUT/base")
  parser.add_argument("--pissa-convert", action="store_true",
                      help="with --peft, for a PiSSA/OLoRA stage: write the plain LoRA (rank "
                           "2r) over the model the stage started from, instead of the adapter "
                           "and its residual base")
  parser.add_argument("--device", choices=("host", "accelerators"), default="host",
                      help="hold and merge the weights in the host's memory (default) or "
                           "spread over the local accelerators (for a model larger than "
                           "the host's memory)")
  args = parser.parse_args(argv)
  if args.device == "host":
    # Not even initialized: a GPU that trains on (or has no room) is left alone.
    jax.config.update("jax_platforms", "cpu")
  try:
    out = export(args.checkpoint, args.out, dtype=args.dtype,
                 max_shard_bytes=args.max_shard_size, trust_remote_code=args.trust_remote_code,
                 overwrite=args.overwrite, peft=args.peft, base_model=args.base_model,
                 device=args.device, pissa_convert=args.pissa_convert)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
