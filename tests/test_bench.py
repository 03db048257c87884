"""The benchmark CLI runs and reports what it promises; the FLOP formula it
reports (jaxsft.metrics) agrees with XLA's own count. Speed is measured by
benchmarks, never asserted here."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import pytest

from jaxsft import bench, metrics
from jaxsft.models import llama

STEP_KEYS = {"shape", "layers", "batch", "seq_len", "dtype", "remat", "backend", "device",
             "jax_version", "step", "params", "compile_s", "step_s", "tokens_per_s",
             "nonpad_tokens_per_s", "flops_per_step", "mfu", "peak_memory_bytes",
             "peak_memory_source", "loss"}


def test_cli_prints_a_table_then_one_json_line():
  cmd = [sys.executable, "-m", "jaxsft.bench", "--shape", "tiny", "--layers", "2",
         "--seq-len", "64", "--batch", "2", "--steps", "2"]
  env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert len(lines) > 1  # the table comes first
  result = json.loads(lines[-1])
  assert STEP_KEYS <= set(result), STEP_KEYS - set(result)
  assert result["layers"] == 2 and result["batch"] == 2 and result["seq_len"] == 64
  assert result["params"] == bench.param_count(
      llama.abstract_params(bench.SHAPES["tiny"].replace(num_layers=2)))
  assert result["flops_per_step"] == metrics.train_flops(
      bench.SHAPES["tiny"].replace(num_layers=2), 2, 64)
  assert result["step_s"] > 0 and result["compile_s"] > 0 and result["peak_memory_bytes"] > 0
  assert result["tokens_per_s"] == pytest.approx(2 * 64 / result["step_s"])
  if result["backend"] == "cpu":
    assert result["mfu"] is None
  # Random weights and uniform tokens: the loss is about log(vocab).
  assert result["loss"] == pytest.approx(math.log(8192), rel=0.1)


def test_compile_scaling_compiles_abstract_shapes(capsys):
  result = bench.main(["--shape", "tiny", "--compile-scaling", "1,3", "--seq-len", "16",
                       "--batch", "1", "--dtype", "float32"])
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
  rows = result["compile_scaling"]
  assert [r["layers"] for r in rows] == [1, 3]
  assert all(r["total_s"] == pytest.approx(r["lower_s"] + r["compile_s"]) for r in rows)
  assert result["compile_ratio"] == pytest.approx(rows[1]["total_s"] / rows[0]["total_s"])
  assert rows[1]["params"] > rows[0]["params"]


def test_refuses_shapes_that_do_not_fit_and_says_how_to_shrink(monkeypatch):
  # 64 GiB available: Qwen1.5-72B's fp32 weights alone are 289 GB.
  monkeypatch.setattr(bench, "available_memory", lambda device: (64 * 2**30, "test"))
  with pytest.raises(SystemExit, match="--layers"):
    bench.main(["--shape", "qwen1.5-72b", "--steps", "1"])


def test_cli_rejects_conflicting_layer_options():
  with pytest.raises(SystemExit):
    bench.parse_args(["--layers", "2", "--compile-scaling", "2,32"])
  with pytest.raises(SystemExit):
    bench.parse_args(["--compile-scaling", "32"])


def _norm_params(cfg) -> int:
  return (2 * cfg.num_layers + 1) * cfg.hidden_size


@pytest.mark.parametrize("shape", ["tiny", "llama3.2-1b", "mixtral-8x7b"])
def test_matmul_params_are_the_weights_minus_lookups_and_norms(shape):
  cfg = bench.SHAPES[shape]
  if cfg.is_moe:  # with every expert active, all expert weights are multiplied
    cfg = cfg.replace(num_experts_per_tok=cfg.num_experts)
  total = bench.param_count(llama.abstract_params(cfg))
  embedding = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
  assert metrics.matmul_params(cfg) == total - embedding - _norm_params(cfg)


def test_attended_pairs_count_the_causal_and_window_mask():
  cfg = bench.SHAPES["tiny"]
  assert metrics.attended_pairs(cfg, 5) == 1 + 2 + 3 + 4 + 5
  assert metrics.attended_pairs(cfg.replace(sliding_window=2), 5) == 1 + 2 + 2 + 2 + 2


SMALL = dict(num_layers=1, hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2,
             head_dim=32, vocab_size=512, dtype="float32")


@pytest.mark.parametrize("shape,seq_len", [("tiny", 32), ("mixtral-8x7b", 16)])
def test_forward_flops_match_xla_cost_analysis(shape, seq_len):
  """XLA's count of the compiled forward pass, with one layer (XLA counts a
  scan body once, so more layers would be under-counted by XLA, not by us).

  The formula's forward third, corrected for what the implementation really
  does: all T² attention scores (not the causal half), every expert on every
  token (the dense MoE dispatch).
  """
  cfg = bench.SHAPES[shape].replace(**SMALL)
  batch = 2
  compiled = jax.jit(lambda p, x: llama.forward(cfg, p, x)[0]).lower(
      *bench.abstract_inputs(cfg, batch, seq_len)).compile()
  cost = compiled.cost_analysis()
  xla_flops = (cost[0] if isinstance(cost, list) else cost)["flops"]

  expected = metrics.train_flops(cfg, batch, seq_len) / 3
  n_h = cfg.num_heads * cfg.head_dim
  expected += 4 * batch * (seq_len**2 - metrics.attended_pairs(cfg, seq_len)) * n_h
  if cfg.is_moe:
    inactive = cfg.num_experts - cfg.num_experts_per_tok
    expected += 2 * 3 * cfg.hidden_size * cfg.intermediate_size * inactive * batch * seq_len
  # The rest is elementwise work (norms, softmax, RoPE, SiLU): under 2% here.
  assert xla_flops == pytest.approx(expected, rel=0.02)
