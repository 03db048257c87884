"""Generation against transformers' greedy ``generate``, batching, sampling and the CLI."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import peft_fixtures
from jaxsft import checkpoint
from jaxsft import generate as gen
from jaxsft import hf
from jaxsft.models import llama
from jaxsft.models.model_config import Adapters
from jaxsft.peft import methods as peft_methods
from jaxsft.peft import prompts as prompts_lib

NEW_TOKENS = 24


def _prompt(length, seed=0):
  # Ids 5.. avoid the special tokens (pad, <s>, </s>, chat markers).
  return np.random.default_rng(seed).integers(5, 300, size=length).tolist()


def _hf_greedy(model, prompt, new_tokens=NEW_TOKENS, **kw):
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                         dtype=torch.long), do_sample=False, max_new_tokens=new_tokens, **kw)
  return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def llama_model(hf_model_factory):
  d, model = hf_model_factory("llama")
  cfg, params = hf.load_params(d)
  return d, model, cfg, params


# The mistral prompt (13 tokens) is longer than its 8-token sliding window, so
# the window matters in the prefill and in every decode step.
@pytest.mark.parametrize("variant", ["llama", "qwen2", "mistral", "mixtral"])
def test_greedy_matches_transformers(hf_model_factory, variant):
  d, model = hf_model_factory(variant)
  cfg, params = hf.load_params(d)
  prompt = _prompt(13)
  want = _hf_greedy(model, prompt)
  assert len(want) == NEW_TOKENS, "the random model stopped at eos; pick another prompt"
  got = gen.generate(cfg, params, [prompt], NEW_TOKENS)[0]
  assert got == want
  if variant == "mistral":
    # The comparison above would not notice a decode that ignores the window.
    unwindowed = gen.generate(cfg.replace(sliding_window=None), params, [prompt], NEW_TOKENS)[0]
    assert unwindowed != want


# Dynamic NTK RoPE grows its base with the largest position seen, and this
# model's max_position_embeddings is 16: generation runs past it, and the long
# prompt is past it already in the prefill.
@pytest.mark.parametrize("prompt_len", [10, 20])
def test_greedy_matches_transformers_dynamic_rope(hf_model_factory, prompt_len):
  d, _ = hf_model_factory("llama_dynamic")
  # A freshly loaded model: transformers keeps the grown base between calls.
  model = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
  cfg, params = hf.load_params(d)
  prompt = _prompt(prompt_len, seed=1)
  want = _hf_greedy(model, prompt)
  assert len(want) == NEW_TOKENS
  assert gen.generate(cfg, params, [prompt], NEW_TOKENS)[0] == want


def test_stops_at_eos_like_transformers(llama_model):
  _, model, cfg, params = llama_model
  prompt = _prompt(13)
  free = _hf_greedy(model, prompt, eos_token_id=None)
  eos = free[5]  # make the 6th new token (or an earlier copy of it) the end
  want = _hf_greedy(model, prompt, eos_token_id=eos)
  assert want[-1] == eos and len(want) <= 6
  assert gen.generate(cfg, params, [prompt], NEW_TOKENS, eos_token_ids=[eos])[0] == want
  assert gen.generate(cfg, params, [prompt], NEW_TOKENS, eos_token_ids=())[0][:6] == free[:6]


# Prompt lengths and budgets below stay in the buckets of the tests above
# (prompt ≤ 16, new tokens ≤ 32), so they reuse compiled programs.
BATCH = [_prompt(n, seed=n) for n in (3, 14, 9, 1)]


@pytest.mark.parametrize("variant", ["llama", "mistral"])
def test_batched_equals_one_by_one(hf_model_factory, variant):
  d, _ = hf_model_factory(variant)
  cfg, params = hf.load_params(d)
  single = [gen.generate(cfg, params, [p], NEW_TOKENS, eos_token_ids=())[0] for p in BATCH]
  assert gen.generate(cfg, params, BATCH, NEW_TOKENS, eos_token_ids=()) == single
  # A row that ends early stops (eos kept, nothing after it) while the others go on.
  eos = single[1][3]
  ended = gen.generate(cfg, params, BATCH, NEW_TOKENS, eos_token_ids=[eos])
  for row, full in zip(ended, single):
    stop = full.index(eos) + 1 if eos in full else len(full)
    assert row == full[:stop]
  assert len(ended[1]) <= 4


def test_similar_calls_compile_once(llama_model):
  _, _, cfg, params = llama_model
  gen.generate(cfg, params, BATCH, NEW_TOKENS)
  compiled = gen._generate_padded._cache_size()
  # Other prompt lengths, budgets, eos, top_p in the same buckets.
  gen.generate(cfg, params, [_prompt(16), _prompt(2), _prompt(5), _prompt(7)], 17)
  gen.generate(cfg, params, BATCH[::-1], 30, top_p=0.5, eos_token_ids=[7])
  assert gen._generate_padded._cache_size() == compiled


def test_top_p_filter_keeps_the_nucleus():
  logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
  kept = lambda p: np.isfinite(np.asarray(gen._top_p_filter(logits, jnp.float32(p))))[0].tolist()
  assert kept(0.4) == [False, True, False, False]
  assert kept(0.7) == [False, True, False, True]  # 0.5 + 0.3 ≥ 0.7
  assert kept(0.85) == [False, True, True, True]
  assert kept(1.0) == [True, True, True, True]


def test_sampling_is_seeded(llama_model):
  _, _, cfg, params = llama_model
  sample = lambda seed, **kw: gen.generate(cfg, params, BATCH, NEW_TOKENS, temperature=1.5,
                                           rng=jax.random.key(seed), eos_token_ids=(), **kw)
  assert sample(0) == sample(0)
  assert sample(0) != sample(1)
  # A nucleus this small holds only the most likely token: greedy decoding.
  greedy = gen.generate(cfg, params, BATCH, NEW_TOKENS, eos_token_ids=())
  assert sample(1, top_p=1e-6) == greedy


def test_generate_rejects_bad_arguments(llama_model):
  _, _, cfg, params = llama_model
  with pytest.raises(ValueError, match=r"prompts \[1\] are empty"):
    gen.generate(cfg, params, [[5], []], 4)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    gen.generate(cfg, params, [[5, cfg.vocab_size]], 4)
  with pytest.raises(ValueError, match="top_p"):
    gen.generate(cfg, params, [[5]], 4, temperature=1.0, top_p=0.0)


def test_load_for_inference_reads_hf_dirs_and_checkpoints(llama_model, tmp_path):
  d, _, cfg, params = llama_model
  ckpt = checkpoint.save_model(tmp_path / "ckpt", params, cfg, tokenizer_src=d)
  want = transformers.AutoTokenizer.from_pretrained(d)
  for path in (d, ckpt):
    got_cfg, got_params, tokenizer = gen.load_for_inference(path)
    assert got_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, got_params, params)
    assert tokenizer("Hello 你好")["input_ids"] == want("Hello 你好")["input_ids"]
    assert tokenizer.chat_template == want.chat_template

  bare = checkpoint.save_model(tmp_path / "bare", params, cfg)
  with pytest.raises(ValueError, match="has no tokenizer/ directory"):
    gen.load_for_inference(bare)


# Adapters whose parameters the forward pass reads in fp32 (prompt encoders,
# DoRA's weight norm) next to ones it reads in the compute dtype (LoRA factors).
READ_DTYPE_ADAPTERS = {
    "lora": Adapters(lora_targets=("q_proj", "v_proj", "down_proj"), lora_rank=4,
                     lora_alpha=8.0),
    "dora": Adapters(lora_targets=("q_proj", "up_proj"), lora_rank=4, lora_alpha=8.0,
                     dora=True),
    "p_tuning": Adapters(prompt_tokens=3, prompt_encoder="mlp", prompt_encoder_hidden=8),
}


@pytest.mark.parametrize("name", list(READ_DTYPE_ADAPTERS))
def test_weights_read_in_the_compute_dtype_compute_the_same(llama_model, tmp_path, name):
  """A bf16 model's weights read straight in bf16 (what an 8B model needs to
  fit a 24 GiB card): the same logits, bit for bit, as from its fp32 weights;
  adapter parameters and DoRA-normed weights stay fp32. From a checkpoint with
  adapters, and (lora) from the plain Hugging Face directory too."""
  d, _, cfg, params = llama_model
  adapters = READ_DTYPE_ADAPTERS[name]
  cfg = cfg.replace(dtype="bfloat16", adapters=adapters)
  params = peft_methods.add_params(cfg, jax.tree.map(jnp.copy, params), jax.random.key(1))
  # B is zero at init: random ones make the LoRA/DoRA terms count.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.05 * jax.random.normal(jax.random.key(len(str(p))), x.shape)
      if "_lora_b_" in str(p) else x, params)
  ckpt = checkpoint.save_model(tmp_path / "ckpt", params, cfg, tokenizer_src=d)
  sources = [ckpt, d] if name == "lora" else [ckpt]
  for source in sources:
    n_virtual = adapters.prompt_tokens if source == ckpt else 0
    tokens = jnp.asarray([prompts_lib.virtual_ids(n_virtual).tolist() + _prompt(12)])
    full_cfg, full, _ = gen.load_for_inference(source, dtype="bfloat16", weights="param")
    got_cfg, narrow, _ = gen.load_for_inference(source, dtype="bfloat16", weights="compute")
    assert got_cfg == full_cfg and got_cfg.dtype == "bfloat16"
    narrowed = 0
    for path, x in peft_fixtures.leaves_by_path(narrow).items():
      leaf = path.split("/")[-1]
      kept = ("_lora_" in path or "prompt" in path
              or (adapters.dora and leaf in ("q_dnh", "up_df")))
      want = peft_fixtures.leaves_by_path(full)[path]
      assert want.dtype == np.float32, path
      assert x.dtype == (np.float32 if kept else jnp.bfloat16), (source, path)
      np.testing.assert_array_equal(x, want.astype(x.dtype), err_msg=path)
      narrowed += not kept
    assert narrowed >= 10
    want_logits = np.asarray(llama.forward(full_cfg, full, tokens)[0])
    np.testing.assert_array_equal(np.asarray(llama.forward(got_cfg, narrow, tokens)[0]),
                                  want_logits, err_msg=str(source))


def test_auto_dtype_follows_the_checkpoint_and_keeps_fp32_on_cpu(llama_model, tmp_path):
  """``--dtype auto``: a checkpoint computes in its run's dtype, a Hugging
  Face directory in float32 on CPU (its stored dtype only on GPU/TPU); on
  CPU the weights stay in their saved dtype."""
  d, _, cfg, params = llama_model
  assert hf.stored_dtype(d) == "float32"
  ckpt = checkpoint.save_model(tmp_path / "ckpt", params, cfg.replace(dtype="bfloat16"),
                               tokenizer_src=d)
  bf16_dir = tmp_path / "bf16"
  shutil.copytree(d, bf16_dir)
  config = json.loads((bf16_dir / "config.json").read_text())
  (bf16_dir / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
  assert hf.stored_dtype(bf16_dir) == "bfloat16"
  for source, want in ((ckpt, "bfloat16"), (d, "float32"), (bf16_dir, "float32")):
    got_cfg, got, _ = gen.load_for_inference(source)
    assert got_cfg.dtype == want, source
    assert {x.dtype for x in jax.tree.leaves(got)} == {jnp.dtype(jnp.float32)}
  with pytest.raises(ValueError, match="float64"):
    gen.load_for_inference(d, dtype="float64")


# ----------------------------------------------------------------------------- CLI

def _run_cli(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "jaxsft.generate", *map(str, args)],
                        capture_output=True, text=True, env=env, timeout=300)


def test_cli_prints_the_greedy_continuation(llama_model):
  d, model, _, _ = llama_model
  tokenizer = transformers.AutoTokenizer.from_pretrained(d)
  text = "The quick brown fox"
  want = _hf_greedy(model, tokenizer(text)["input_ids"], 20)
  assert tokenizer.decode(want, skip_special_tokens=True).strip()  # something to compare
  result = _run_cli("--model", d, "--prompt", text, "--max-new-tokens", 20)
  assert result.returncode == 0, result.stderr
  assert result.stdout == tokenizer.decode(want, skip_special_tokens=True) + "\n"


def test_cli_chat_uses_the_chat_template(llama_model, capsys):
  d, model, _, _ = llama_model
  tokenizer = transformers.AutoTokenizer.from_pretrained(d)
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"}]
  ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
  want = _hf_greedy(model, ids["input_ids"], 20)
  assert tokenizer.decode(want, skip_special_tokens=True).strip()
  # In-process (the subprocess test above covers the entry point; a process costs seconds).
  assert gen.main(["--model", str(d), "--prompt", "你好", "--chat", "--system", "Be brief.",
                   "--max-new-tokens", "20"]) == 0
  assert capsys.readouterr().out == tokenizer.decode(want, skip_special_tokens=True) + "\n"


def test_cli_tools_are_written_into_the_prompt(llama_model, tmp_path, capsys):
  """--tools FILE: the chat template writes the schemas into the prompt; the
  continuation is transformers' greedy one from apply_chat_template(tools=...).
  A template that ignores tools is refused rather than silently dropping them."""
  import test_data_tools  # noqa: PLC0415  (its tool-aware template and schemas)
  d, model, _, _ = llama_model
  tool_dir = tmp_path / "tool_model"
  shutil.copytree(d, tool_dir)
  tokenizer = transformers.AutoTokenizer.from_pretrained(d)
  tokenizer.chat_template = test_data_tools.TOOL_TEMPLATE
  tokenizer.save_pretrained(tool_dir)
  tools = tmp_path / "tools.json"
  tools.write_text(json.dumps(test_data_tools.TOOLS))
  messages = [{"role": "user", "content": "Weather in Paris?"}]
  ids = tokenizer.apply_chat_template(messages, tools=test_data_tools.TOOLS,
                                      add_generation_prompt=True, return_dict=True)["input_ids"]
  assert "get_weather" in tokenizer.decode(ids)
  want = _hf_greedy(model, ids, 12)
  assert gen.main(["--model", str(tool_dir), "--prompt", "Weather in Paris?", "--chat",
                   "--tools", str(tools), "--max-new-tokens", "12"]) == 0
  assert capsys.readouterr().out == tokenizer.decode(want, skip_special_tokens=True) + "\n"
  assert gen.main(["--model", str(d), "--prompt", "hi", "--chat", "--tools", str(tools)]) == 2
  assert "does not write tools (the prompt never names ['get_weather'])" in (
      capsys.readouterr().err)
  tools.write_text('{"name": "get_weather"}')
  assert gen.main(["--model", str(tool_dir), "--prompt", "hi", "--chat", "--tools",
                   str(tools)]) == 2
  assert "expected a JSON list of function schemas" in capsys.readouterr().err


def test_cli_errors(llama_model, tmp_path, capsys):
  d, _, cfg, _ = llama_model
  tokenizer = transformers.AutoTokenizer.from_pretrained(d)

  # main()'s return value is the exit status (``sys.exit(main())``).
  def error(*args):
    assert gen.main(["--model", str(d), *map(str, args)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err

  long_prompt = "The quick brown fox jumps over the lazy dog. " * 40
  assert f"model's context is {cfg.max_position_embeddings} tokens" in error(
      "--prompt", long_prompt)
  err = error("--prompt", "hello", "--max-new-tokens", 1000)
  room = cfg.max_position_embeddings - len(tokenizer("hello")["input_ids"])
  assert "--max-new-tokens=1000" in err and f"use --max-new-tokens {room} or less" in err
  assert "--system needs --chat" in error("--prompt", "hi", "--system", "sys")

  no_template = tmp_path / "plain"
  no_template.mkdir()
  for f in d.iterdir():
    if f.name in ("config.json", "generation_config.json", "model.safetensors"):
      shutil.copy(f, no_template)
  tokenizer.chat_template = None
  tokenizer.save_pretrained(no_template)
  assert gen.main(["--model", str(no_template), "--prompt", "hi", "--chat"]) == 2
  assert "no chat template" in capsys.readouterr().err

  assert gen.main(["--model", str(tmp_path / "missing"), "--prompt", "hi"]) == 2
  assert "does not exist" in capsys.readouterr().err
  # Sampling settings are checked before the model is read (a missing one here).
  for args, needle in ((["--temperature", "-1"], "--temperature=-1.0 must be >= 0"),
                       (["--top-p", "1.5"], "--top-p=1.5 must be in (0, 1]")):
    assert gen.main(["--model", str(tmp_path / "missing"), "--prompt", "hi", *args]) == 2
    assert needle in capsys.readouterr().err
