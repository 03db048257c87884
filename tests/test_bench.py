"""The benchmark CLI runs and reports what it promises; the FLOP formula it
reports (jaxsft.metrics) agrees with XLA's own count. Speed is measured by
benchmarks, never asserted here."""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft import bench, losses, metrics, optim
from jaxsft import sharding as sharding_lib
from jaxsft.models import llama

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
hf_peer = pytest.importorskip("hf_peer")  # needs torch (a test dependency)

STEP_KEYS = {"shape", "method", "layers", "batch", "seq_len", "dtype", "remat", "backend",
             "device", "jax_version", "step", "params", "trainable_params", "compile_s", "step_s",
             "tokens_per_s", "nonpad_tokens_per_s", "flops_per_step", "mfu", "peak_mem_gib",
             "peak_memory_bytes", "peak_memory_source", "setup_peak_mem_gib", "loss"}
PEER_KEYS = {"peer_tokens_per_s", "peer_nonpad_tokens_per_s", "peer_peak_mem_gib", "ratio",
             "nonpad_ratio"}
ENV = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
FOUR_DEVICES = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"


def _run_cli(*args, **env):
  cmd = [sys.executable, "-m", "jaxsft.bench", *args]
  return subprocess.run(cmd, capture_output=True, text=True, env={**ENV, **env}, timeout=900)


def test_cli_prints_a_table_then_one_json_line(tmp_path):
  # compile_s times a compile even where JAX's persistent cache is on: the
  # bench turns it off, so nothing is written to (or read from) it.
  xla_cache = tmp_path / "xla_cache"
  out = _run_cli("--shape", "tiny", "--layers", "2", "--seq-len", "64", "--batch", "2",
                 "--steps", "2", "--profile", str(tmp_path / "trace"), "--profile-steps", "1",
                 JAX_COMPILATION_CACHE_DIR=str(xla_cache),
                 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  assert out.returncode == 0, out.stderr
  assert not list(xla_cache.glob("*")), "the bench used the persistent compilation cache"
  assert list((tmp_path / "trace").rglob("*.xplane.pb")), "--profile wrote no trace"
  # ... and its report: every listed op is an instruction of the step's HLO.
  summary = json.loads((tmp_path / "trace" / "summary.json").read_text())
  hlo = (tmp_path / "trace" / "step.hlo.txt").read_text()
  assert summary["steps"] == 1 and summary["categories"]["matmul"] > 0
  assert all(f"%{r['op']} = " in hlo for r in summary["ops"]), "ops not found in the HLO"
  assert "by category" in out.stdout
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
  assert result["nonpad_tokens_per_s"] == result["tokens_per_s"]  # unpacked rows: no padding
  assert result["trainable_params"] == result["params"]  # method full
  assert result["fused_projections"] == "off"  # auto, as run: a CPU leaves them separate
  # The memory check reads the compiled step's own buffer assignment: at least
  # the fp32 weights, their gradients and AdamW's two moments (16 bytes a
  # weight), and no more than the whole process ever held.
  assert result["memory_estimate_source"] == "compiled memory_analysis"
  assert 16 * result["params"] <= result["memory_estimate_bytes"] < result["peak_memory_bytes"]
  # The set-up's peak is read before the steps: no more than the final peak.
  assert 0 < result["setup_peak_mem_gib"] <= result["peak_mem_gib"]
  if result["backend"] == "cpu":
    assert result["mfu"] is None
  # Random weights and uniform tokens: the loss is about log(vocab).
  assert result["loss"] == pytest.approx(math.log(8192), rel=0.1)


def test_peer_runs_in_the_same_invocation_on_the_same_packed_examples():
  """--peer hf: the PyTorch peer trains on the very examples jaxsft packs, and
  the JSON line reports both sides and their ratios."""
  pytest.importorskip("torch")
  out = _run_cli("--shape", "tiny", "--layers", "1", "--seq-len", "64", "--batch", "2",
                 "--steps", "1", "--warmup", "0", "--dtype", "float32",
                 "--packed-lengths", "fixed:20", "--peer", "hf")
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert STEP_KEYS | PEER_KEYS <= set(result), (STEP_KEYS | PEER_KEYS) - set(result)
  assert result["ratio"] == pytest.approx(result["tokens_per_s"] / result["peer_tokens_per_s"])
  assert result["nonpad_ratio"] == pytest.approx(
      result["nonpad_tokens_per_s"] / result["peer_nonpad_tokens_per_s"])
  # 3 examples of 20 fill each 64-token row; the peer's batches of 2 are
  # padded to 20 = no padding, so its non-pad rate equals its rate.
  assert result["examples"] == 3 * 2 and result["nonpad_fraction"] == pytest.approx(60 / 64)
  assert result["peer_nonpad_tokens_per_s"] == pytest.approx(result["peer_tokens_per_s"])
  assert result["peer_loss"] == pytest.approx(math.log(8192), rel=0.1)


def test_packed_examples_are_the_peers_examples_and_counted_right():
  cfg = bench.SHAPES["tiny"]
  rows, ex = bench.packed_batches(cfg, "sft", n_batches=3, batch=4, seq_len=512, seed=0)
  lengths = ex["ex_lengths"]
  assert rows["tokens"].shape == (3, 4, 512)
  # Every example is in exactly one row, whole, with its own tokens and mask.
  assert sum(len(b) for b in ex["lengths_per_batch"]) == len(lengths)
  for b in range(3):
    seg = rows["segment_ids"][b]
    assert np.count_nonzero(seg) == ex["lengths_per_batch"][b].sum()
    # Segment lengths in each row are example lengths; positions restart per segment.
    per_row = [np.bincount(row)[1:] for row in seg]
    assert sorted(np.concatenate(per_row).tolist()) == sorted(ex["lengths_per_batch"][b].tolist())
    for row_seg, row_pos in zip(seg, rows["positions"][b]):
      for s in range(1, row_seg.max() + 1):
        np.testing.assert_array_equal(row_pos[row_seg == s], np.arange((row_seg == s).sum()))
  flat = np.concatenate([rows["tokens"][b][rows["segment_ids"][b] > 0] for b in range(3)])
  assert np.count_nonzero(np.concatenate([rows["segment_ids"][b].ravel() for b in range(3)])) \
      == lengths.sum() == len(ex["ex_tokens"]) == len(flat)
  assert sorted(flat.tolist()) == sorted(ex["ex_tokens"].tolist())
  # The first quarter of every example is the untrained prompt.
  starts = np.concatenate([[0], np.cumsum(lengths)])
  for i in range(len(lengths)):
    mask = ex["ex_loss_mask"][starts[i]:starts[i + 1]]
    assert mask[:lengths[i] // 4].sum() == 0 and mask[lengths[i] // 4:].all()
  # Packing fills the rows; lengths look like SFT data (median ~250, clipped).
  assert np.count_nonzero(rows["segment_ids"]) / rows["segment_ids"].size > 0.9
  assert 16 <= lengths.min() and lengths.max() <= 512
  # The peer's padded batches hold the same non-pad tokens.
  peer_nonpad = sum(real for *_, real in hf_peer.batches(
      {"ex_tokens": ex["ex_tokens"], "ex_loss_mask": ex["ex_loss_mask"], "ex_lengths": lengths,
       "batch": np.array(4)}))
  assert peer_nonpad == lengths.sum()


def test_length_distributions():
  rng = np.random.default_rng(0)
  sft = bench.draw_lengths("sft", 20000, 4096, rng)
  assert 230 <= np.median(sft) <= 270 and np.percentile(sft, 99) > 1000
  assert (bench.draw_lengths("fixed:100", 5, 64, rng) == 64).all()  # clipped to seq_len
  for bad in ("lognormal", "fixed:0", "fixed:x"):
    with pytest.raises(argparse.ArgumentTypeError, match="sft"):
      bench.parse_lengths(bad)


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


def test_cli_rejects_bad_input_with_a_clear_error(capsys):
  for argv, message in [
      (["--layers", "2", "--compile-scaling", "2,32"], "--layers and --compile-scaling"),
      (["--compile-scaling", "0,32"], "positive layer counts"),
      (["--compile-scaling", "2,32", "--peer", "hf"], "drop --peer"),
      (["--lora-rank", "8"], "method full trains none"),
      (["--shape", "gpt5"], "invalid choice: 'gpt5'"),
      (["--method", "qlora"], "invalid choice: 'qlora'"),
      (["--quantization", "nf4"], "it needs --method lora, not full"),
      (["--shape", "tiny", "--seq-len", "8192"], "exceeds the context of shape 'tiny' (4096"),
      (["--packed-lengths", "zipf"], "sft' or 'fixed:N'"),
      (["--method", "freeze", "--peer", "hf"], "full, lora and dora"),
      (["--method", "freeze", "--peer", "hf-compile"], "full, lora and dora"),
      (["--peer-compile"], "--peer-compile needs --peer hf"),
      (["--batch", "0"], "--batch must be positive"),
      (["--packed-lengths", "fixed:1000", "--seq-len", "64"],
       "examples longer than --seq-len 64 do not fit a row"),
      (["--compile-scaling", "2", "--target", "h999"],
       "--target: GPU target 'h999' is neither one of"),
      (["--profile", __file__], "exists and is not a directory"),
      (["--shape", "tiny", "--method", "lora", "--quantization", "nf4"],
       "input width 688 (shape (1, 688, 256)) is not a multiple of 64")]:
    with pytest.raises(SystemExit) as e:
      bench.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err, argv


def test_a_peft_method_adds_its_adapters_and_trains_only_them():
  stage = bench.make_stage(bench.parse_args(["--method", "lora"]))
  cfg = bench.SHAPES["tiny"].replace(num_layers=1)
  cfg, params = bench._prepare_method(cfg, llama.abstract_params(cfg), stage, jax.random.key(0))
  assert cfg.adapters is not None and cfg.adapters.lora_rank == stage.peft.rank
  mask = optim.trainable_mask(params, stage)
  trained = [("/".join(sharding_lib.path_names(p)), m)
             for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]]
  assert all(m == ("_lora_" in name) for name, m in trained), trained


def test_qlora_holds_the_frozen_projections_in_4_bits():
  """--quantization nf4: the bench's state (as the trainer's, trainer.store_params)
  holds each frozen projection weight in 0.5 byte plus its 8-bit scale and
  the scales' scales, against 4 bytes in fp32; the step still counts the
  projections' matmul FLOPs."""
  sizes = {}
  for extra in ([], ["--quantization", "nf4"]):
    args = bench.parse_args(["--shape", "llama3.2-1b", "--layers", "2", "--method", "lora",
                             "--dtype", "float32", "--frozen-dtype", "param", *extra])
    stage = bench.make_stage(args)
    cfg, params = bench._prepare_method(bench.model_config(args), llama.abstract_params(
        bench.model_config(args)), stage, jax.random.key(0))
    sh = bench.sharded_step(cfg, params, stage, 2, 0, bench.bench_mesh(args))
    sizes[bool(extra)] = sum(x.size * x.dtype.itemsize
                             for x in jax.tree_util.tree_leaves(sh.abstract_state))
  c = bench.SHAPES["llama3.2-1b"]
  per_layer = (c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
               + c.num_heads * c.head_dim * c.hidden_size + 3 * c.hidden_size * c.intermediate_size)
  per_weight = 4 - (0.5 + 1 / 64 + 4 / (64 * 256))
  assert sizes[False] - sizes[True] == pytest.approx(2 * per_layer * per_weight, rel=1e-4)


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
  token (the dense MoE dispatch, asked for: XLA counts the routed dispatches'
  switch branches and scan bodies once, not as run).
  """
  cfg = bench.SHAPES[shape].replace(**SMALL, moe_dispatch="dense")
  batch = 2
  compiled = jax.jit(lambda p, x: llama.forward(cfg, p, x)[0]).lower(
      llama.abstract_params(cfg), jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)).compile()
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


def test_packed_flops_count_each_examples_own_causal_pairs():
  """By hand: packed examples of 3 and 5 tokens are 8 tokens of 6·N_matmul and
  (1+2+3) + (1+2+3+4+5) attended pairs, not one 8-token sequence's 36."""
  cfg = bench.SHAPES["tiny"].replace(**SMALL)
  n, nh = metrics.matmul_params(cfg), cfg.num_heads * cfg.head_dim
  got = metrics.train_flops(cfg, 1, 8, lengths=np.array([3, 5]))
  assert got == 6 * n * 8 + 12 * cfg.num_layers * (6 + 15) * nh
  assert metrics.train_flops(cfg, 2, 8) == 6 * n * 16 + 12 * cfg.num_layers * 2 * 36 * nh


def test_method_weights_count_frozen_base_and_trained_adapters():
  """LoRA-style trees: every base matmul weight frozen (4 FLOPs/token), each
  added factor trained (6); norms and the embedding lookup count nothing."""
  cfg = bench.SHAPES["tiny"].replace(**SMALL)
  params = llama.abstract_params(cfg)
  r = 4
  lora = dict(params)
  lora["layers"] = dict(params["layers"])
  lora["layers"]["attn"] = dict(params["layers"]["attn"], q_lora_a_dr=jax.ShapeDtypeStruct(
      (cfg.num_layers, cfg.hidden_size, r), jnp.float32))
  trainable = jax.tree_util.tree_map_with_path(
      lambda path, _: "lora" in str(path), lora)
  frozen, adapter = bench.method_weights(cfg, cfg, lora, trainable)
  assert frozen == metrics.matmul_params(cfg)
  assert adapter == cfg.num_layers * cfg.hidden_size * r
  total = sum(metrics.matmul_weight_count(cfg, bench.sharding_lib.path_names(p), x.shape)
              for p, x in jax.tree_util.tree_flatten_with_path(params)[0])
  assert total == metrics.matmul_params(cfg)


@pytest.mark.parametrize("frozen", [False, True])
def test_train_flops_match_xla_cost_of_the_backward(frozen):
  """XLA's count of forward+backward (one layer, seq 32: one attention block,
  all T² scores) against the formula. Frozen: the gradient of the embedding
  only, so every matmul weight needs its input gradient but none its own
  (4·N per token; the fused loss then skips d W too)."""
  cfg = bench.SHAPES["tiny"].replace(**SMALL)
  batch, seq_len = 2, 32
  tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)

  def loss(params, tokens):
    hidden, _ = llama.hidden_states(cfg, params, tokens)
    targets, weights = losses.next_token_targets(tokens)
    return losses.masked_cross_entropy(hidden, llama.unembedding(cfg, params), targets,
                                       weights)[0]

  def grad(params, tokens):
    if not frozen:
      return jax.grad(loss)(params, tokens)
    def of_embedding(emb):
      constants = jax.tree_util.tree_map(jax.lax.stop_gradient, params)
      return loss(dict(constants, embed={"embedding_vd": emb}), tokens)
    return jax.grad(of_embedding)(params["embed"]["embedding_vd"])

  compiled = jax.jit(grad).lower(llama.abstract_params(cfg), tokens).compile()
  cost = compiled.cost_analysis()
  xla_flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
  n = metrics.matmul_params(cfg)
  expected = metrics.train_flops(cfg, batch, seq_len, frozen=n if frozen else 0)
  # The XLA attention path computes all T² scores (12 FLOPs per pair and
  # head dim with backward, where the formula keeps the causal half).
  nh = cfg.num_heads * cfg.head_dim
  expected += 12 * batch * (seq_len**2 - metrics.attended_pairs(cfg, seq_len)) * nh
  assert xla_flops == pytest.approx(expected, rel=0.03)


def test_mesh_shards_the_step_as_the_trainer_does(capsys):
  """--mesh over 4 simulated devices (fsdp=2 × tensor=2): the same losses as
  one device, throughput per device, and a smaller per-device memory figure;
  bad meshes are refused with the reason."""
  common = ("--shape", "tiny", "--seq-len", "64", "--batch", "4", "--steps", "2",
            "--warmup", "1", "--dtype", "float32")
  env = {**ENV, "XLA_FLAGS": FOUR_DEVICES}
  run = lambda *a: subprocess.run([sys.executable, "-m", "jaxsft.bench", *common, *a],  # noqa: E731
                                  capture_output=True, text=True, env=env, timeout=900)
  one, four = run("--layers", "2"), run("--layers", "2", "--mesh", "fsdp=2,tensor=2")
  assert one.returncode == 0 and four.returncode == 0, one.stderr[-2000:] + four.stderr[-2000:]
  one, four = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (one, four))
  assert one["n_devices"] == 1 and one["mesh"] is None
  assert four["n_devices"] == 4 and four["mesh"] == {"fsdp": 2, "tensor": 2}
  assert four["loss"] == pytest.approx(one["loss"], abs=1e-4)
  assert four["tokens_per_s_per_device"] == pytest.approx(four["tokens_per_s"] / 4)
  # The compiled figure is per device: weights, moments and activations split.
  assert four["memory_estimate_bytes"] < one["memory_estimate_bytes"] / 2
  # One device holds the whole state: fp32 weights and AdamW's two moments.
  assert one["state_bytes_per_device"] == pytest.approx(12 * one["params"], rel=1e-3)
  assert four["state_bytes_per_device"] < one["state_bytes_per_device"] / 3
  # --compile-scaling compiles the same sharded step without allocating: XLA's
  # memory analysis of it is one device's (its arguments are, to the byte,
  # the state's shards the run above placed on a device plus that device's
  # rows: batch 4 over fsdp=2 is 2 rows of tokens and loss mask), and it is
  # the very figure the run's memory check read.
  scaling = run("--compile-scaling", "2", "--mesh", "fsdp=2,tensor=2")
  assert scaling.returncode == 0, scaling.stderr[-2000:]
  scaling = json.loads(scaling.stdout.strip().splitlines()[-1])
  assert scaling["n_devices"] == 4 and scaling["mesh"] == {"fsdp": 2, "tensor": 2}
  (row,) = scaling["compile_scaling"]
  assert row["argument_bytes"] == four["state_bytes_per_device"] + 2 * (2 * 64 * 4)
  assert row["state_bytes_per_device"] == four["state_bytes_per_device"]
  assert row["memory_bytes_per_device"] == four["memory_estimate_bytes"]
  bad = run("--mesh", "fsdp=4", "--batch", "6")
  assert bad.returncode == 2 and "does not split over the mesh's 4" in bad.stderr
  assert "axis=size pairs over data, fsdp, tensor, expert" in str(
      pytest.raises(argparse.ArgumentTypeError, sharding_lib.mesh_arg, "pipe=2").value)
  # A mesh the devices cannot fill: exit 2, and the reason.
  with pytest.raises(SystemExit) as e:
    bench.bench_mesh(bench.parse_args(["--mesh", "fsdp=3"]))
  assert e.value.code == 2
  assert f"needs 3 devices, but {jax.device_count()} are available" in capsys.readouterr().err


def test_lora_rank_and_targets_reach_both_sides():
  """--lora-rank/--lora-targets, expert targets included, give jaxsft and the
  PEFT peer the same adapters: the same trainable parameter count (PEFT's own
  count is the reference); unknown targets are refused with the valid names."""
  out = _run_cli("--shape", "tiny-moe", "--layers", "1", "--seq-len", "32", "--batch", "2",
                 "--steps", "1", "--warmup", "0", "--dtype", "float32", "--method", "lora",
                 "--lora-rank", "4", "--lora-targets", "q_proj,v_proj,expert_gate_up,expert_down",
                 "--peer", "hf")
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["trainable_params"] == result["peer_trainable_params"]
  bad = _run_cli("--shape", "tiny-moe", "--layers", "1", "--method", "lora",
                 "--lora-targets", "q_proj,nope")
  assert bad.returncode == 2 and "expert_gate_up" in bad.stderr


FSDP_COLLECTIVES = r'''
import json, re
from jaxsft import bench
args = bench.parse_args(["--shape", "tiny", "--seq-len", "48", "--batch", "4", "--dtype",
                         "float32", "--compile-scaling", "2", "--mesh", "fsdp=4"])
compiled, _, _ = bench.compile_step(bench.model_config(args).replace(num_layers=2), 4, 48,
                                    bench.make_stage(args), bench.bench_mesh(args))
print(json.dumps(re.findall(r"(\S+\[[0-9,]*\])\S* (all-reduce|all-gather|reduce-scatter|all-to-all)\(",
                            compiled.as_text())))
'''


def test_fsdp_gathers_weights_and_keeps_rows_split():
  """Under fsdp=4 every device computes its own rows with each layer's weights
  gathered: no float activation (192 = 4 rows x 48 tokens, or [4,48,...]) is
  all-reduced or gathered. Without the row constraint (sharding.constrain_rows)
  XLA followed the D-sharded weights, ran every layer on the global batch and
  all-reduced [192, 688] activations (4.4x slower at fsdp=8 on CPU)."""
  env = {**ENV, "XLA_FLAGS": FOUR_DEVICES}
  out = subprocess.run([sys.executable, "-c", FSDP_COLLECTIVES], capture_output=True, text=True,
                       env=env, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  collectives = json.loads(out.stdout.strip().splitlines()[-1])
  gathered = [shape for shape, op in collectives if op == "all-gather" and shape.startswith("f32")]
  assert gathered, collectives  # the weights, layer by layer
  activations = [(shape, op) for shape, op in collectives
                 if shape.startswith(("f32[192,", "f32[4,48", "bf16[192,", "bf16[4,48"))]
  assert not activations, activations
