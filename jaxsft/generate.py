"""Batched autoregressive generation over a KV cache, and its CLI.

    python -m jaxsft.generate --model PATH --prompt TEXT [--chat] [--system TEXT]
        [--max-new-tokens N] [--temperature T] [--top-p P] [--seed S] [--dtype D]
        [--mesh AXIS=N,...] [--trust-remote-code]

PATH is a Hugging Face model directory or a jaxsft checkpoint. The CLI prints
the completion only: the new tokens, decoded without special tokens.

How a batch runs: prompts are left-padded to a common length, so every row's
last prompt token sits in the same column and new tokens are written to the
same cache slot in every row. One ``decode_step`` over the whole prompt fills
the cache; then a ``lax.while_loop`` feeds one token per step until every row
has produced an end-of-sequence token or the budget runs out. Shapes are
bucketed (batch, prompt length, new-token budget) so that similar calls reuse
one compiled program.
"""
from __future__ import annotations

import argparse
import json
import contextlib
import functools
import pathlib
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft import checkpoint
from jaxsft import hf
from jaxsft import sharding as sharding_lib
from jaxsft.data import templates
from jaxsft.models import llama
from jaxsft.models.model_config import ModelConfig
from jaxsft.peft import lora
from jaxsft.peft import methods as peft_methods
from jaxsft.peft import nf4
from jaxsft.peft import prompts as prompts_lib

DEFAULT_MAX_NEW_TOKENS = 256


# ----------------------------------------------------------------------------- sampling

def _top_p_filter(logits: jax.Array, top_p: jax.Array) -> jax.Array:
  """Keep the smallest set of highest-probability tokens whose mass reaches
  ``top_p`` (at least one token); the rest get -inf."""
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = mass_before < top_p
  keep = keep.at[:, 0].set(True)
  cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits >= cutoff, logits, -jnp.inf)


def _next_token(logits, rng, temperature, top_p, sample: bool):
  """Greedy (first maximum, as torch.argmax) or temperature + nucleus sampling."""
  if not sample:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = _top_p_filter(logits / temperature, top_p)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------- the loop

@functools.partial(jax.jit, static_argnames=("cfg", "max_out", "sample"))
def _generate_padded(cfg: ModelConfig, params, tokens, valid, max_new_tokens, eos_ids,
                     temperature, top_p, rng, pad_id, *, max_out: int, sample: bool):
  """New tokens [B, max_out] for left-padded ``tokens`` [B, P] (``valid`` marks
  real tokens; a row whose last column is invalid is a batch-padding row).

  ``max_new_tokens`` ≤ ``max_out`` is traced, so budgets within one bucket
  share a compilation. Entries after a row's end-of-sequence token, and past
  the budget, are ``pad_id``.
  """
  b, p = tokens.shape
  # Positions count real tokens only (HF: cumsum(attention_mask) - 1).
  positions = jnp.maximum(jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1, 0)
  # Slots: P for the prompt, then one per fed-back token (the last new token is
  # never fed back, so max_out - 1 would do; one spare keeps the arithmetic plain).
  cache = llama.init_cache(cfg, b, p + max_out, params=params)  # prefixes, if any, first
  # Prefill. Its logits are unused, so XLA drops the [B, P, V] projection.
  _, cache = llama.decode_step(cfg, params, cache, tokens, positions, valid)
  # The loop's first step re-runs the last prompt token in its own slot: that
  # rewrites the same key/value (same token, same position, same RoPE — also
  # for dynamic NTK, whose base follows the largest position in the call) and
  # yields the logits of the first new token, without a special first step.
  cache["index"] = cache["index"] - 1

  def cond(state):
    step, _, _, _, _, done = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(state):
    step, token, position, cache, out, done = state
    logits, cache = llama.decode_step(cfg, params, cache, token[:, None], position[:, None],
                                      jnp.ones((b, 1), bool))
    new = _next_token(logits[:, 0], jax.random.fold_in(rng, step), temperature, top_p, sample)
    new = jnp.where(done, pad_id, new)
    out = jax.lax.dynamic_update_slice_in_dim(out, new[:, None], step, axis=1)
    done = done | jnp.any(new[:, None] == eos_ids[None, :], axis=-1)
    return step + 1, new, position + 1, cache, out, done

  state = (jnp.zeros((), jnp.int32), tokens[:, -1], positions[:, -1], cache,
           jnp.full((b, max_out), pad_id, jnp.int32), ~valid[:, -1])
  return jax.lax.while_loop(cond, body, state)[4]


def _bucket(n: int, minimum: int) -> int:
  """Round ``n`` up to one of four sizes per power of two (≤ 25% padding)."""
  if n <= minimum:
    return minimum
  step = max(minimum, 1 << max(0, n.bit_length() - 3))
  return -(-n // step) * step


def generate(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, rng: jax.Array | None = None,
             eos_token_ids: Sequence[int] | None = None) -> list[list[int]]:
  """Continue each prompt (a list of token ids) by up to ``max_new_tokens`` tokens.

  Returns the new tokens of each prompt. A row stops after its first token in
  ``eos_token_ids`` (default ``cfg.eos_token_ids``; pass ``()`` to never stop),
  which is included, as in the sequences transformers' ``generate`` returns.
  ``temperature`` 0 is greedy decoding; otherwise logits are divided by it and
  sampled from the smallest set of tokens with probability mass ≥ ``top_p``,
  with ``rng`` (default ``jax.random.key(0)``). Positions may run past
  ``cfg.max_position_embeddings``: callers that must stay inside the trained
  context check it themselves (the CLI does).
  """
  if cfg.has_head:
    raise ValueError(f"the model is a {cfg.problem_type} model (a score head, no lm_head): it "
                     "scores sequences and does not generate")
  if not prompts:
    return []
  empty = [i for i, p in enumerate(prompts) if len(p) == 0]
  if empty:
    raise ValueError(f"prompts {empty} are empty; every prompt needs at least one token")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
  if temperature < 0:
    raise ValueError(f"temperature={temperature} must be ≥ 0 (0 = greedy)")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p} must be in (0, 1]")
  out_of_vocab = sorted({t for p in prompts for t in p if not 0 <= t < cfg.vocab_size})
  if out_of_vocab:
    raise ValueError(f"token ids {out_of_vocab[:5]} are outside the vocabulary "
                     f"[0, {cfg.vocab_size}); was the prompt tokenized for another model?")
  n_virtual = cfg.adapters.virtual_tokens if cfg.adapters is not None else 0
  if n_virtual:  # prompt tuning / P-tuning: the virtual tokens stand before every prompt
    prompts = [prompts_lib.virtual_ids(n_virtual).tolist() + list(p) for p in prompts]
  eos = tuple(cfg.eos_token_ids if eos_token_ids is None else eos_token_ids)
  pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0

  n = len(prompts)
  batch = _bucket(n, 1)
  length = _bucket(max(len(p) for p in prompts), 16)
  max_out = _bucket(max_new_tokens, 16)
  tokens = np.full((batch, length), pad_id, np.int32)
  valid = np.zeros((batch, length), bool)
  for i, p in enumerate(prompts):
    tokens[i, length - len(p):] = p
    valid[i, length - len(p):] = True

  # -1 never matches a token; a fixed length keeps eos sets from recompiling.
  eos_ids = np.full(max(4, len(eos)), -1, np.int32)
  eos_ids[:len(eos)] = eos

  out = _generate_padded(
      cfg, params, jnp.asarray(tokens), jnp.asarray(valid), jnp.int32(max_new_tokens),
      jnp.asarray(eos_ids), jnp.float32(max(temperature, 1e-6)),
      jnp.float32(top_p), jax.random.key(0) if rng is None else rng, jnp.int32(pad_id),
      max_out=max_out, sample=temperature > 0)
  out = np.asarray(out)[:n, :max_new_tokens].tolist()
  results = []
  for row in out:
    stop = next((i for i, t in enumerate(row) if t in eos), None)
    results.append(row if stop is None else row[:stop + 1])
  return results


# ----------------------------------------------------------------------------- loading

DTYPES = ("auto", "float32", "bfloat16", "float16")


def load_for_inference(path, trust_remote_code: bool = False, dtype: str = "auto",
                       weights: str = "auto", mesh=None, tokenizer: bool = True,
                       quantization: str | None = None):
  """(cfg, params, tokenizer) from a Hugging Face model directory or a jaxsft
  checkpoint (whose tokenizer lives in ``PATH/tokenizer``); the tokenizer is
  None with ``tokenizer=False`` (then none needs to be there).

  ``mesh``: the weights are split over its devices as the trainer splits them
  (``sharding.param_shardings``; ``tensor`` splits heads, ffn and vocab, the
  natural choice for decoding); then run the model under ``jax.set_mesh(mesh)``.
  Without one, everything sits on the first device. On a GPU/TPU, weights that
  cannot fit on the devices are refused before any is read, with the mesh to ask for.

  ``quantization`` "nf4": the decoder's projections (adapter factors aside)
  held in 4 bits as a QLoRA stage holds them (``jaxsft.peft.nf4``, with
  double quantization; transformers' ``load_in_4bit``), read into host memory
  and quantized onto the devices a layer at a time: a model whose weights do
  not fit the devices in 16 bits decodes in its 4-bit form. A QLoRA stage's
  final checkpoint so computes what the stage trained.

  ``dtype``: the compute dtype (``cfg.dtype``). ``"auto"``: a checkpoint's own
  (the run's ``model.dtype``); for a Hugging Face directory, the dtype its
  config.json stores the weights in on a GPU/TPU (bf16 for most published
  models, as transformers loads them), float32 on CPU.

  ``weights``: the dtype the weights are read in. ``"compute"``: every weight
  the forward pass only ever reads cast to the compute dtype is read in it, so
  the model computes exactly what it would from its full-precision weights and
  an 8B model takes 15 GiB on the device instead of 30 (adapter parameters,
  which prompt encoders and DoRA use in fp32, and the weights DoRA takes the
  norm of keep their saved dtype). ``"param"``: as saved. ``"auto"``:
  ``"compute"`` on GPU/TPU, ``"param"`` on CPU (where XLA computes bf16
  matmuls in fp32 and would keep fp32 copies of bf16 weights besides them, as
  for the trainer's ``frozen_dtype``).
  """
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r} is not one of {list(DTYPES)}")
  if weights not in ("auto", "compute", "param"):
    raise ValueError(f"weights={weights!r} is not one of ['auto', 'compute', 'param']")
  path = pathlib.Path(path)
  if not path.exists():
    raise ValueError(f"model path {path} does not exist")
  on_cpu = sharding_lib.compute_platform() == "cpu"
  is_checkpoint = checkpoint.is_checkpoint(path)
  if is_checkpoint:
    tokenizer_dir = path / checkpoint.TOKENIZER_DIR
    if tokenizer and not tokenizer_dir.is_dir():
      raise ValueError(f"checkpoint {path} has no {checkpoint.TOKENIZER_DIR}/ directory (it was "
                       "saved without a tokenizer source); copy the base model's tokenizer "
                       f"files into {tokenizer_dir}")
    cfg = checkpoint.model_config(path)
  else:
    cfg = hf.config_from_hf(path)
    stored = hf.stored_dtype(path)
    cfg = cfg.replace(dtype="float32" if on_cpu or stored is None else stored)
    tokenizer_dir = path
  if dtype != "auto":
    cfg = cfg.replace(dtype=dtype)
  abstract = llama.abstract_params(cfg)
  dtypes = None
  if weights == "compute" or (weights == "auto" and not on_cpu):
    dtypes = read_dtypes(abstract, cfg.dtype)
  typed = abstract if dtypes is None else jax.tree.map(
      lambda a, t: jax.ShapeDtypeStruct(a.shape, t), abstract, dtypes)
  host = None
  if quantization is not None:
    host = _quantized_leaves(cfg, abstract, quantization)
    store = lambda p: _store_4bit(p, host, mesh)  # noqa: E731
    check_fits(jax.eval_shape(store, typed), mesh, path)
  else:
    check_fits(typed, mesh, path)
  if is_checkpoint:
    _, params = checkpoint.load_model(path, mesh=mesh, dtypes=dtypes, host=host)
  else:
    _, params = hf.load_params(path, cfg, mesh=mesh, dtypes=dtypes, host=host)
  if quantization is not None:
    params = store(params)
  return cfg, params, (hf.load_tokenizer(tokenizer_dir, trust_remote_code) if tokenizer else None)


def _quantized_leaves(cfg: ModelConfig, abstract, quantization: str):
  """Where ``--quantization`` puts 4-bit weights: every decoder projection
  (``nf4.quantizable``), unless DoRA adapts the model (its norm needs them)."""
  if quantization not in peft_methods.QUANTIZATIONS:
    raise ValueError(f"--quantization {quantization!r} is not one of "
                     f"{list(peft_methods.QUANTIZATIONS)}")
  if cfg.adapters is not None and cfg.adapters.dora:
    raise ValueError("--quantization: this checkpoint has DoRA adapters, whose magnitudes are "
                     "relative to the full-precision weights; export it merged first")
  if jax.process_count() > 1:
    raise ValueError("--quantization runs on a single process")
  return jax.tree_util.tree_map_with_path(
      lambda p, _: nf4.quantizable(sharding_lib.path_names(p)) is not None, abstract)


def _store_4bit(params, quantized, mesh):
  """``params`` with the ``quantized`` leaves in the 4-bit form (``nf4.store``)."""
  frozen = jax.tree.map(lambda q: not q, quantized)  # nf4.store takes the trainable mask
  return nf4.store(params, frozen, True, mesh)


def weight_bytes_per_device(params, mesh=None) -> int:
  """The bytes of ``params`` (abstract is fine) on the fullest device: all of
  them without a mesh, one shard of each leaf on ``mesh``."""
  if mesh is None:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
  return sharding_lib.bytes_per_device(params, sharding_lib.param_shardings(params, mesh))


def check_fits(params, mesh, path) -> None:
  """A clear error, before any weight is read, when ``params`` (abstract) would
  fill the devices' memory on ``mesh`` (the first device without one): the
  alternative is an allocation failure deep inside XLA halfway through loading.
  Devices that report no memory limit (CPU) are not checked."""
  device = jax.local_devices()[0]  # this process's (another's may not answer)
  limit = sharding_lib.device_bytes(device)
  if limit is None:
    return
  need = weight_bytes_per_device(params, mesh)
  # The cache and activations need room too: weights may take 90% at most.
  if need <= 0.9 * limit:
    return
  gib = 2 ** 30
  where = f"{mesh.size} devices (--mesh {_mesh_spec(mesh)})" if mesh is not None else "one device"
  n = jax.device_count()
  fit = -(-need * (mesh.size if mesh is not None else 1) // int(0.9 * limit))
  hint = (f"split them over up to {n} devices with --mesh tensor=N or fsdp=N (jax sees {n}; "
          "the data axis copies weights rather than splitting them)" if n >= fit else
          f"they need about {fit} such devices and jax sees {n}: use a narrower --dtype, or a "
          "machine with more accelerator memory")
  raise ValueError(f"{path}: the weights take {need / gib:.3g} GiB per device on {where}, but "
                   f"a {device.device_kind} has {limit / gib:.3g} GiB for JAX (weights may take "
                   f"90% of it, the rest is for the KV cache and activations); {hint}")


def on_mesh(mesh):
  """``jax.set_mesh(mesh)``, or nothing without a mesh: the model code finds the
  mesh while tracing (MoE dispatch, activation and cache constraints)."""
  return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def _mesh_spec(mesh) -> str:
  return ",".join(f"{a}={n}" for a, n in sharding_lib.split_axes(mesh).items()) or "fsdp=1"


def inference_mesh(spec: dict[str, int] | None):
  """The mesh of a ``--mesh`` spec over every device (None: no mesh), with
  the reason when the devices cannot fill it."""
  if spec is None:
    return None
  try:
    return sharding_lib.make_mesh(spec)
  except ValueError as e:
    raise ValueError(f"--mesh: {e} (XLA_FLAGS=--xla_force_host_platform_device_count=N "
                     "simulates N devices on a CPU)") from None


def read_dtypes(params, compute_dtype):
  """The dtype to read each leaf of ``params`` (abstract is fine) in for
  inference: ``compute_dtype`` where the forward pass casts the leaf to it
  before any use (so reading it narrower changes no result), the leaf's own
  dtype for the rest: adapter parameters (prompt encoders compute in fp32;
  they are small) and a DoRA-adapted weight, whose norm DoRA takes in fp32."""
  compute = jnp.dtype(compute_dtype)

  def walk(tree, in_adapter=False):
    out = {}
    for name, leaf in tree.items():
      adapter = in_adapter or peft_methods.is_adapter_name(name)
      if hasattr(leaf, "items"):
        out[name] = walk(leaf, adapter)
        continue
      keep = (adapter
              or not jnp.issubdtype(leaf.dtype, jnp.floating)
              or leaf.dtype.itemsize <= compute.itemsize
              or (name in lora.WEIGHTS and lora.factor_names(name)[2] in tree))
      out[name] = jnp.dtype(leaf.dtype) if keep else compute
    return out
  return walk(params)


# ----------------------------------------------------------------------------- CLI

def prompt_tokens(tokenizer, prompt: str, chat: bool, system: str | None,
                  tools: list | None = None) -> list[int]:
  """The prompt's token ids: ``tokenizer(prompt)`` as is, or, with ``chat``,
  the tokenizer's chat template with a generation prompt (system message
  first; ``tools``, function schemas, as the template writes them)."""
  if not chat:
    if system is not None or tools is not None:
      raise ValueError(f"{'--system' if system is not None else '--tools'} needs --chat (it "
                       "only exists in a conversation)")
    return list(tokenizer(prompt)["input_ids"])
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError("--chat: this model's tokenizer has no chat template; run without --chat "
                     "to feed the prompt as plain text")
  messages = [{"role": "system", "content": system}] if system is not None else []
  messages.append({"role": "user", "content": prompt})
  text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                       tools=tools)
  missing = [n for n in templates.tool_names([], tools) if n not in text]
  if missing:
    raise ValueError(f"--tools: this model's chat template does not write tools (the prompt "
                     f"never names {missing[:3]}); it was not made for tool use")
  # The template writes its own special tokens (apply_chat_template's tokenization).
  return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def read_tools(path: str) -> list:
  """Function schemas from a JSON file: a list of them (OpenAI's ``tools``)."""
  try:
    tools = json.loads(pathlib.Path(path).read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"--tools {path}: {e}") from None
  if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
    raise ValueError(f"--tools {path}: expected a JSON list of function schemas (objects)")
  return tools


def _parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m jaxsft.generate", description=__doc__.split(
      "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", required=True,
                      help="Hugging Face model directory or jaxsft checkpoint")
  parser.add_argument("--prompt", required=True)
  parser.add_argument("--chat", action="store_true",
                      help="wrap the prompt in the tokenizer's chat template")
  parser.add_argument("--system", default=None, help="system message (with --chat)")
  parser.add_argument("--tools", default=None, metavar="FILE",
                      help="with --chat: a JSON list of function schemas the model may call, "
                           "written into the prompt by the chat template")
  parser.add_argument("--max-new-tokens", type=int, default=None,
                      help=f"default: {DEFAULT_MAX_NEW_TOKENS}, or what the context leaves")
  parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
  parser.add_argument("--top-p", type=float, default=1.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--dtype", choices=DTYPES, default="auto",
                      help="compute dtype (auto: a checkpoint's own; a Hugging Face model's "
                           "stored dtype on GPU/TPU, float32 on CPU); on GPU/TPU the weights "
                           "are read in it too")
  add_mesh_argument(parser)
  add_quantization_argument(parser)
  parser.add_argument("--trust-remote-code", action="store_true",
                      help="allow custom tokenizer code shipped with the model")
  return parser.parse_args(argv)


def add_quantization_argument(parser: argparse.ArgumentParser) -> None:
  """The inference CLIs' ``--quantization``."""
  parser.add_argument("--quantization", choices=peft_methods.QUANTIZATIONS, default=None,
                      help="hold the decoder's projections in 4 bits (NF4, as transformers' "
                           "load_in_4bit and a QLoRA stage): a quarter of bf16's memory")


def add_mesh_argument(parser: argparse.ArgumentParser) -> None:
  """The inference CLIs' ``--mesh``."""
  parser.add_argument("--mesh", type=sharding_lib.mesh_arg, default=None, metavar="AXIS=N,...",
                      help="split the weights over several devices, e.g. tensor=8 (heads, "
                           "ffn and vocab split; -1 takes every device) or fsdp=8; default: "
                           "the first device holds the whole model")


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(argv)
  try:
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
      raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be at least 1")
    # Before the model loads (minutes for a large one), not after.
    if args.temperature < 0:
      raise ValueError(f"--temperature={args.temperature} must be >= 0 (0 = greedy)")
    if not 0 < args.top_p <= 1:
      raise ValueError(f"--top-p={args.top_p} must be in (0, 1]")
    mesh = inference_mesh(args.mesh)
    cfg, params, tokenizer = load_for_inference(args.model, args.trust_remote_code, args.dtype,
                                                mesh=mesh, quantization=args.quantization)
    tools = read_tools(args.tools) if args.tools is not None else None
    tokens = prompt_tokens(tokenizer, args.prompt, args.chat, args.system, tools)
    if not tokens:
      raise ValueError("the prompt is empty after tokenization; give a non-empty --prompt")
    # Prompt/prefix tuning's virtual tokens take the first positions.
    a = cfg.adapters
    context = cfg.max_position_embeddings - (
        (a.virtual_tokens or a.prefix_tokens) if a is not None else 0)
    if len(tokens) >= context:
      raise ValueError(f"the prompt is {len(tokens)} tokens, but the model's context is "
                       f"{context} tokens (max_position_embeddings); shorten the prompt")
    if args.max_new_tokens is None:  # not asked for: stop where the context ends
      args.max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, context - len(tokens))
    if len(tokens) + args.max_new_tokens > context:
      raise ValueError(
          f"the prompt ({len(tokens)} tokens) plus --max-new-tokens={args.max_new_tokens} "
          f"exceeds the model's context of {context} tokens (max_position_embeddings); "
          f"use --max-new-tokens {context - len(tokens)} or less")
    with on_mesh(mesh):
      [new] = generate(cfg, params, [tokens], args.max_new_tokens,
                       temperature=args.temperature, top_p=args.top_p,
                       rng=jax.random.key(args.seed))
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(tokenizer.decode(new, skip_special_tokens=True))
  return 0


if __name__ == "__main__":
  sys.exit(main())
