"""The training loop: stages, accumulation, checkpoints and resume, logging, bad input."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers

import train_fixtures
from jaxsft import checkpoint, config as config_lib, evaluate, optim, sharding, trainer
from jaxsft.data import pipeline as data_pipeline
from jaxsft.data import templates
from jaxsft.models import ModelConfig, llama

REPO = pathlib.Path(__file__).resolve().parents[1]


def _rows(out):
  return [json.loads(l) for l in (pathlib.Path(out) / "metrics.jsonl").read_text().splitlines()]


def _final_params(out, stage="sft"):
  return checkpoint.load_model(pathlib.Path(out) / "stages" / stage / "final")[1]


def _assert_trees_equal(a, b, atol=0.0):
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), atol=atol, rtol=0), a, b)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("run")
  config = train_fixtures.tiny_config(root / "data", root / "out", cpt_steps=24, sft_steps=8)
  config.stages.sft.eval_every = 4
  config.stages.sft.data.eval_fraction = 0.1
  config.export.hf = True
  trainer.train(config)
  return root / "out"


def test_run_writes_what_the_design_promises(finished_run):
  out = finished_run
  for name in ("config.json", "metrics.jsonl", "loss.png", "hf/config.json",
               "hf/model.safetensors", "hf/tokenizer.json",
               "stages/cpt/final/model_config.json", "stages/sft/final/params"):
    assert (out / name).exists(), name
  rows = _rows(out)
  train = [r for r in rows if r["split"] == "train"]
  assert {r["stage"] for r in train} == {"cpt", "sft"}
  for key in ("stage", "step", "loss", "lr", "grad_norm", "tokens_per_s", "trained_tokens",
              "mfu", "nonpad_tokens_per_s"):
    assert key in train[0], key
  assert any(r["split"] == "eval" and r["loss"] is not None for r in rows)
  cpt = [r["loss"] for r in train if r["stage"] == "cpt"]
  assert cpt[-1] < cpt[0] - 0.5, f"the CPT loss should fall: {cpt}"


def test_export_loads_in_transformers_with_the_same_logits(finished_run):
  import torch
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(finished_run / "hf").eval()
  cfg, params = checkpoint.load_model(finished_run / "stages" / "sft" / "final")
  tokens = np.arange(3, 23)[None]
  with torch.no_grad():
    ref = model(torch.tensor(tokens)).logits.numpy()
  ours, _ = llama.forward(cfg, params, jnp.asarray(tokens))
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4)


def test_rerun_of_a_finished_run_does_nothing_new(finished_run, tmp_path):
  before = _rows(finished_run)
  config = train_fixtures.tiny_config(finished_run.parent / "data", finished_run, cpt_steps=24,
                                      sft_steps=8)
  config.stages.sft.eval_every = 4
  config.stages.sft.data.eval_fraction = 0.1
  config.export.hf = True
  trainer.train(config)
  assert _rows(finished_run) == before


def _batch(cfg, rows=8, seq=16, seed=0):
  rng = np.random.RandomState(seed)
  tokens = rng.randint(3, cfg.vocab_size, (rows, seq)).astype(np.int32)
  segments = np.ones_like(tokens)
  segments[::3, seq - 5:] = 0  # some padding
  loss_mask = (rng.rand(rows, seq) > 0.3).astype(np.int32)
  positions = np.broadcast_to(np.arange(seq, dtype=np.int32), tokens.shape).copy()
  return {"tokens": tokens, "loss_mask": loss_mask, "segment_ids": segments,
          "positions": positions}


def test_gradient_accumulation_equals_one_big_batch():
  cfg = ModelConfig(**{**train_fixtures.TINY_MODEL, "vocab_size": 64})
  params = llama.init_params(cfg, jax.random.key(0))
  # Plain SGD with lr 1: the update is the gradient itself (Adam's first step
  # would normalize it away and hide an accumulation bug).
  tx, lr = optax.sgd(1.0), optax.constant_schedule(1.0)
  batch = _batch(cfg)
  results = {}
  for k in (1, 4):
    state = trainer.init_state(params, tx, seed=0)
    step = jax.jit(trainer.make_train_step(cfg, tx, lr, k))
    new_state, m = step(state, batch)
    results[k] = (new_state.params, float(m["loss"]), float(m["trained_tokens"]))
  # the token-weighted mean differs from a mean of per-micro-batch means here
  assert len({int(m) for m in _batch(cfg)["loss_mask"].reshape(4, -1).sum(1)}) > 1
  for k in (4,):
    _assert_trees_equal(results[1][0], results[k][0], atol=1e-6)
    assert results[k][1] == pytest.approx(results[1][1], abs=1e-6)
    assert results[k][2] == results[1][2]


def test_each_eval_dataset_is_scored_on_its_own(tmp_path):
  """With several eval datasets the eval row carries each one's loss, equal to
  evaluating that dataset alone, and the overall loss weighs them by tokens."""
  files = train_fixtures.write_data(tmp_path / "data")
  tok = transformers.AutoTokenizer.from_pretrained(files["tokenizer"])
  cfg = ModelConfig(**train_fixtures.TINY_MODEL)
  params = llama.init_params(cfg, jax.random.key(0))
  eval_fn = jax.jit(trainer.make_eval_step(cfg, "sft"))
  stage = config_lib.stage(objective="sft", data=dict(datasets=[str(files["chat"])]))
  bsh = trainer.batch_sharding(sharding.make_mesh())

  def row(eval_files):
    data = dict(datasets=[str(files["chat"])], eval_datasets=[str(f) for f in eval_files],
                template="chatml", cache_dir=str(tmp_path / "cache"))
    pipe = data_pipeline.build(data, tok, seq_len=64, seed=0, objective="sft")
    return trainer.evaluate(eval_fn, params, pipe, 4, bsh, stage, "sft", 1)

  both = row([files["text"], files["chat"]])
  assert len(both["datasets"]) == 2
  alone = [row([files["text"]]), row([files["chat"]])]
  assert "datasets" not in alone[0]
  for got, want in zip(both["datasets"].values(), alone):
    assert got["trained_tokens"] == want["trained_tokens"] > 0
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
  tokens = sum(r["trained_tokens"] for r in alone)
  assert both["trained_tokens"] == tokens
  np.testing.assert_allclose(
      both["loss"], sum(r["loss"] * r["trained_tokens"] for r in alone) / tokens, rtol=1e-6)
  assert abs(alone[0]["loss"] - alone[1]["loss"]) > 1e-3  # two different numbers to tell apart


def test_the_step_compiles_once_per_stage(tmp_path):
  compiles = []

  # One event per program compiled or loaded from the persistent compilation
  # cache (tests/conftest.py turns it on): jax times both under this name.
  # (Counting the cache's own hit events too counted a loaded program twice
  # and a compiled one once, and whether a program is in the cache depends on
  # its compile time against conftest's 0.2 s threshold: a flaky count.)
  def listener(event, duration, **kw):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    counts = []
    # The first run also compiles one-off programs that later runs find in
    # JAX's caches (unless a test before this one warmed them), so it only
    # warms up; the next two differ in their step count alone.
    for i, steps in enumerate((1, 2, 6)):
      compiles.clear()
      config = train_fixtures.tiny_config(tmp_path / "data", tmp_path / f"out{i}",
                                          cpt_steps=steps)
      del config.stages["sft"]
      trainer.train(config)
      counts.append(len(compiles))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert counts[1] == counts[2], f"more steps compiled more programs: {counts}"


# ----------------------------------------------------------------------------- resume

def _train_cli(config_path, out, extra=(), **popen):
  cmd = [sys.executable, "-m", "jaxsft.train", f"--config={config_path}",
         f"--config.output_dir={out}", *extra]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **popen)


def _config_file(tmp_path, cpt_steps, sft_steps, generate_rows=None):
  """A config file for the train CLI; ``generate_rows`` (a JSONL of chats)
  turns on the SFT stage's generate_eval at its end."""
  generate = "" if generate_rows is None else f"""
  c.stages.sft.generate_eval = dict(every={sft_steps}, path={str(generate_rows)!r},
                                    examples=4, max_new_tokens=6, batch_size=2)"""
  path = tmp_path / "run_config.py"
  path.write_text(f"""
import pathlib, sys
sys.path.insert(0, {str(REPO / 'tests')!r})
import train_fixtures

def get_config():
  c = train_fixtures.tiny_config(pathlib.Path({str(tmp_path / 'data')!r}),
                                 pathlib.Path('unused'), cpt_steps={cpt_steps},
                                 sft_steps={sft_steps}){generate}
  return c
""")
  return path


def _kill_when(proc, condition, timeout=240):
  start = time.time()
  while not condition():
    if proc.poll() is not None:
      raise AssertionError(f"the run ended before it could be killed:\n{proc.stdout.read()}")
    if time.time() - start > timeout:
      proc.kill()
      raise AssertionError("timed out waiting to kill the run")
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()


def _checkpoint_steps(out, stage):
  d = pathlib.Path(out) / "stages" / stage / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def test_kill_9_mid_stage_and_between_stages_resumes_exactly(tmp_path):
  """A real SIGKILL mid-stage (after a checkpoint), then, in the resumed run,
  another between the stages; re-running the same command finishes with the
  same parameters as an uninterrupted run."""
  train_fixtures.write_data(tmp_path / "data")
  config = _config_file(tmp_path, cpt_steps=12, sft_steps=8)
  ref_out = tmp_path / "uninterrupted"
  ref = _train_cli(config, ref_out)
  assert ref.wait() == 0, ref.stdout.read()

  out = tmp_path / "killed"
  _kill_when(_train_cli(config, out), lambda: 4 in _checkpoint_steps(out, "cpt"))
  assert not (out / "stages" / "cpt" / "final").exists()
  _kill_when(_train_cli(config, out), lambda: (out / "stages" / "cpt" / "final").is_dir())
  assert not (out / "stages" / "sft" / "final").exists()
  last = _train_cli(config, out)
  assert last.wait() == 0, last.stdout.read()
  _assert_trees_equal(_final_params(ref_out, "cpt"), _final_params(out, "cpt"))
  _assert_trees_equal(_final_params(ref_out), _final_params(out))
  assert _rows(out)[-1]["loss"] == pytest.approx(_rows(ref_out)[-1]["loss"], abs=1e-6)
  # What the killed runs logged past their last checkpoint was dropped when
  # they resumed: each step is in metrics.jsonl once (a resumed stage also
  # logs its first step, which the uninterrupted run did not log).
  steps = _train_steps(out)
  assert len(steps) == len(set(steps)) and set(_train_steps(ref_out)) <= set(steps), steps


def _train_steps(out):
  return [(r["stage"], r["step"]) for r in _rows(out) if r["split"] == "train"]


# ----------------------------------------------------------------------------- bad input

def _error(config):
  with pytest.raises(ValueError) as e:
    trainer.train(config)
  return str(e.value)


def test_config_typo_names_the_nearest_key(tmp_path):
  config = train_fixtures.tiny_config(tmp_path / "data", tmp_path / "out")
  config.stages.cpt.lrr = 1e-3
  assert "did you mean 'lr'" in _error(config)


def test_missing_model_dir(tmp_path):
  config = train_fixtures.tiny_config(tmp_path / "data", tmp_path / "out")
  config.model.init = None
  config.model.source = str(tmp_path / "nope")
  assert "does not exist" in _error(config)


def test_missing_dataset_path(tmp_path):
  config = train_fixtures.tiny_config(tmp_path / "data", tmp_path / "out")
  config.stages.sft.data.datasets = [str(tmp_path / "missing.jsonl")]
  msg = _error(config)
  assert "config.stages.sft.data.datasets[0]" in msg and "missing.jsonl" in msg
  assert not (tmp_path / "out").exists()  # refused before anything heavy started


def test_seq_len_beyond_the_context(tmp_path):
  config = train_fixtures.tiny_config(tmp_path / "data", tmp_path / "out", seq_len=512)
  msg = _error(config)
  assert "seq_len=512" in msg and "256" in msg


def test_batch_not_divisible_by_accumulation(tmp_path):
  config = train_fixtures.tiny_config(tmp_path / "data", tmp_path / "out", batch_size=6,
                                      grad_accum=4)
  assert "grad_accum=4" in _error(config)


def test_token_ids_beyond_the_models_vocabulary_are_refused_before_training(tmp_path):
  config = train_fixtures.tiny_config(tmp_path / "data", tmp_path / "out")
  config.model.init = {**config.model.init, "vocab_size": 40}
  msg = _error(config)
  assert "config.stages.cpt: the tokenizer" in msg and "but the model has 40 embedding rows" in msg
  assert not (tmp_path / "out" / "stages").exists()
  config = train_fixtures.tiny_config(tmp_path / "data", tmp_path / "out")
  config.stages.cpt.data.pad_id = 99999
  assert "the pad id 99999 is outside the model's vocabulary" in _error(config)


def test_examples_dropped_while_tokenizing_are_reported(tmp_path, caplog):
  """Examples too long for the stage's rows are dropped (data.truncation
  'drop'): the run says how many, per dataset, in its log and metrics.jsonl."""
  config = train_fixtures.tiny_config(tmp_path / "data", tmp_path / "out", sft_steps=1)
  del config.stages["cpt"]
  long = tmp_path / "long.jsonl"
  long.write_text("".join(json.dumps({"instruction": f"say {i}", "output": "word " * (
      200 if i % 4 == 0 else 1)}) + "\n" for i in range(40)))
  config.stages.sft.data.datasets = [str(long)]
  with caplog.at_level("WARNING", logger="jaxsft"):
    trainer.train(config)
  assert ("dataset 'long': 10 of 40 examples dropped, longer than max_length=64 tokens; raise "
          "seq_len"
          in caplog.text), caplog.text
  data = [r for r in _rows(tmp_path / "out") if r["split"] == "data"]
  assert data == [{"stage": "sft", "step": 0, "split": "data", "dropped": {"long": {
      "examples": 40, "dropped_no_assistant": 0, "dropped_too_long": 10, "truncated": 0}}}]


def test_an_output_or_cache_dir_that_cannot_be_written_is_one_clear_error(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("x")
  config = train_fixtures.tiny_config(tmp_path / "data", afile / "out")
  assert f"config.output_dir={afile / 'out'}: cannot write the run there" in _error(config)
  config = train_fixtures.tiny_config(tmp_path / "data", tmp_path / "out")
  config.stages.cpt.data.cache_dir = str(afile / "cache")
  msg = _error(config)
  assert f"= {afile / 'cache'}: cannot write the tokenized cache there" in msg, msg


def test_output_dir_of_another_run_is_refused(tmp_path):
  out = tmp_path / "out"
  config = train_fixtures.tiny_config(tmp_path / "data", out, cpt_steps=2)
  del config.stages["sft"]
  trainer.train(config)
  other = train_fixtures.tiny_config(tmp_path / "data", out, cpt_steps=2)
  del other.stages["sft"]
  other.model.init = {**other.model.init, "hidden_size": 64, "head_dim": 16}
  assert "another run" in _error(other)


def test_a_rerun_that_changes_how_a_stage_trains_is_refused(tmp_path):
  """A re-run may change where the run lives, its devices, logging and
  checkpoint cadence; not the data, schedule or steps of its stages: resuming
  would continue on other data or another schedule, and config.json (left as
  it was) would no longer describe the model."""
  def config(**stage):
    c = train_fixtures.tiny_config(tmp_path / "data", tmp_path / "out", cpt_steps=2, **stage)
    del c.stages["sft"]
    return c

  trainer.train(config())
  written = (tmp_path / "out" / "config.json").read_text()
  for change, key in (
      (lambda s: setattr(s, "lr", 1e-2), "stages.cpt.lr was 0.003; this config says 0.01"),
      (lambda s: setattr(s, "steps", 4), "stages.cpt.steps was 2; this config says 4"),
      (lambda s: setattr(s.data, "datasets", [str(tmp_path / "data" / "chat.jsonl")]),
       "stages.cpt.data.datasets was ")):
    c = config()
    change(c.stages.cpt)
    msg = _error(c)
    assert "another run" in msg and f"config.{key}" in msg, msg
    assert (tmp_path / "out" / "config.json").read_text() == written
  trainer.train(config(log_every=1, checkpoint_every=1))  # the finished run: nothing to do
  assert json.loads((tmp_path / "out" / "config.json").read_text())["stages"]["cpt"][
      "log_every"] == 1


def test_nan_loss_stops_with_stage_and_step_and_keeps_the_checkpoint(tmp_path):
  config = train_fixtures.tiny_config(tmp_path / "data", tmp_path / "out", cpt_steps=12)
  del config.stages["sft"]
  config.stages.cpt.lr = 1e30  # diverges after the first updates
  config.stages.cpt.grad_clip = 0.0
  with pytest.raises(trainer.TrainingDiverged) as e:
    trainer.train(config)
  assert "stage 'cpt'" in str(e.value) and "step" in str(e.value)
  assert not (tmp_path / "out" / "stages" / "cpt" / "final").exists()


def test_a_damaged_latest_checkpoint_names_itself_and_the_one_to_resume_from(tmp_path):
  """The latest step checkpoint cut short on disk: resuming fails with an error
  that names it and the step before it; moved away as the error says, the
  same command resumes from that step and ends as the first run ended."""
  def config():
    c = train_fixtures.tiny_config(tmp_path / "data", tmp_path / "out", cpt_steps=12)
    del c.stages["sft"]
    return c

  trainer.train(config())
  first = _final_params(tmp_path / "out", "cpt")
  logged = _train_steps(tmp_path / "out")
  assert _checkpoint_steps(tmp_path / "out", "cpt") == [8, 12]  # keep_checkpoints=2
  stage = tmp_path / "out" / "stages" / "cpt"
  shutil.rmtree(stage / "final")
  data = [p for p in (stage / "checkpoints" / "12" / "state").rglob("*")
          if p.is_file() and p.parent.name == "d"]
  largest = max(data, key=lambda p: p.stat().st_size)
  largest.write_bytes(largest.read_bytes()[:10])
  with pytest.raises(ValueError) as e:
    trainer.train(config())
  msg = str(e.value)
  assert f"checkpoint {stage / 'checkpoints' / '12'} cannot be read" in msg, msg
  assert "resume from step 8, the checkpoint before it" in msg, msg
  assert _checkpoint_steps(tmp_path / "out", "cpt") == [8, 12]  # nothing deleted
  (stage / "checkpoints" / "12").rename(tmp_path / "damaged_12")
  trainer.train(config())
  _assert_trees_equal(first, _final_params(tmp_path / "out", "cpt"))
  steps = _train_steps(tmp_path / "out")  # steps 9-12 logged once, 9 now too
  assert len(steps) == len(set(steps)) and set(logged) <= set(steps), steps


# ----------------------------------------------------------------------------- sharding

_SHARDED_RUN = """
import os, sys, json, pathlib
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, {tests!r})
import jax
import train_fixtures
from jaxsft import trainer
config = train_fixtures.tiny_config(pathlib.Path({data!r}), pathlib.Path({out!r}), cpt_steps=6,
                                    batch_size=8, log_every=1, neftune_noise_alpha=5.0)
del config.stages["sft"]
config.mesh.fsdp, config.mesh.tensor = 4, 2
# q/k/v and gate/up as one matmul each (a GPU's default without tensor
# parallelism), here across the split weights: the single-device run has them apart.
config.model.fused_projections = "on"
assert len(jax.devices()) == 8
config.stages.cpt.batch_size = 6  # not divisible over fsdp=4: refused before any work
try:
  trainer.train(config)
  raise SystemExit("a batch of 6 over 4 data-parallel devices was accepted")
except ValueError as e:
  assert "batch of 6 sequences cannot be split over 4 data-parallel devices" in str(e), e
config.stages.cpt.batch_size = 8
trainer.train(config)
# A LoRA stage on the mesh: its factors (placed by add_params) reach the
# state's shardings before the state is built, so every buffer is donated.
import warnings
lora = train_fixtures.tiny_config(pathlib.Path({data!r}), pathlib.Path({out!r}) / "lora",
                                  cpt_steps=1, sft_steps=1, batch_size=8)
del lora.stages["cpt"]
lora.stages.sft.method = "lora"
lora.mesh.fsdp, lora.mesh.tensor = 4, 2
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter("always")
  trainer.train(lora)
donation = [str(w.message) for w in caught if "donated buffers" in str(w.message)]
assert not donation, donation
"""


def test_fsdp_x_tensor_mesh_on_8_devices_matches_one_device(tmp_path):
  """fsdp=4 x tensor=2 over 8 simulated CPU devices, with the projections
  fused: the same losses as one device with them apart, NEFTune's noise
  included (drawn the same whatever the sharding); and a LoRA stage there
  builds its state without copying any buffer."""
  data = tmp_path / "data"
  single = train_fixtures.tiny_config(data, tmp_path / "single", cpt_steps=6, batch_size=8,
                                      log_every=1, neftune_noise_alpha=5.0)
  del single.stages["sft"]
  trainer.train(single)
  script = _SHARDED_RUN.format(tests=str(REPO / "tests"), data=str(data),
                               out=str(tmp_path / "sharded"))
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  one = [r["loss"] for r in _rows(tmp_path / "single") if r["split"] == "train"]
  eight = [r["loss"] for r in _rows(tmp_path / "sharded") if r["split"] == "train"]
  assert len(one) == len(eight) == 6
  np.testing.assert_allclose(eight, one, atol=1e-5, rtol=0)


def _free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_process_run_matches_one_process(tmp_path):
  """Two CPU processes joined by jax.distributed (one device each, fsdp=2)
  train, checkpoint, generate (generate_eval) and export like one process:
  the same losses, and the greedy answers of the sharded final model equal
  those of the same weights on one device."""
  train_fixtures.write_data(tmp_path / "data")
  chats = tmp_path / "intent.jsonl"
  chats.write_text("".join(json.dumps({"messages": [
      {"role": "user", "content": text},
      {"role": "assistant", "content": json.dumps({"intent": label})}]}) + "\n"
      for text, label in [("my card was stolen", "card_lost"), ("where is my parcel", "delivery"),
                          ("refund please", "refund"), ("reset my password", "account")]))
  config = _config_file(tmp_path, cpt_steps=6, sft_steps=4, generate_rows=chats)
  single = _train_cli(config, tmp_path / "single", ["--config.stages.cpt.log_every=1"])
  assert single.wait() == 0, single.stdout.read()
  port = _free_port()
  procs = []
  for i in range(2):
    env = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAXSFT_NUM_PROCESSES": "2",
           "JAXSFT_PROCESS_ID": str(i)}
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "jaxsft.train", f"--config={config}",
         f"--config.output_dir={tmp_path / 'two'}", "--config.stages.cpt.log_every=1",
         "--config.export.hf=True"],
        cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  for p in procs:
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
  one = [r["loss"] for r in _rows(tmp_path / "single") if r["split"] == "train"]
  two = [r["loss"] for r in _rows(tmp_path / "two") if r["split"] == "train"]
  assert len(one) == len(two) >= 8
  np.testing.assert_allclose(two, one, atol=1e-5, rtol=0)
  _assert_trees_equal(_final_params(tmp_path / "single"), _final_params(tmp_path / "two"),
                      atol=1e-5)
  assert (tmp_path / "two" / "hf" / "model.safetensors").is_file()
  generated = [r for r in _rows(tmp_path / "two") if r["split"] == "generate"]
  assert [r["step"] for r in generated] == [4]
  answers = [json.loads(line) for line in
             (tmp_path / "two" / generated[0]["predictions"]).read_text().splitlines()]
  cfg, params = checkpoint.load_model(tmp_path / "two" / "stages" / "sft" / "final")
  tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "data" / "tokenizer")
  examples = evaluate.json_examples(evaluate.read_examples(chats))
  summary, records = evaluate.json_label_eval(
      cfg, params, tokenizer, examples, max_new_tokens=6, batch_size=2,
      template=templates.get_template("chatml", tokenizer))  # train_fixtures' SFT template
  assert any(a["generation"] for a in answers)  # something was generated
  assert [a["generation"] for a in answers] == [r["generation"] for r in records]
  assert {k: generated[0][k] for k in summary} == summary


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path):
  """A real full filesystem (a 700 KiB tmpfs: one checkpoint fits, the second
  does not): a clear error, the step-4 checkpoint intact, and after making room
  the same command resumes and finishes like an uninterrupted run."""
  mount = tmp_path / "small_disk"
  mount.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(mount)],
                    capture_output=True).returncode:
    pytest.skip("cannot mount a tmpfs here (needs root)")
  try:
    def config(out):
      c = train_fixtures.tiny_config(tmp_path / "data", out, cpt_steps=12)
      del c.stages["sft"]
      return c

    with pytest.raises(trainer.CheckpointSaveFailed) as e:
      trainer.train(config(mount / "out"))
    msg = str(e.value)
    assert "step 8" in msg and "No space left" in msg and "previous checkpoint (step 4)" in msg
    assert _checkpoint_steps(mount / "out", "cpt") == [4]
    subprocess.run(["mount", "-o", "remount,size=8m", str(mount)], check=True)
    trainer.train(config(mount / "out"))
    trainer.train(config(tmp_path / "uninterrupted"))
    _assert_trees_equal(_final_params(tmp_path / "uninterrupted", "cpt"),
                        _final_params(mount / "out", "cpt"))
  finally:
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_pure_bf16_training(tmp_path):
  """param_dtype=bfloat16: weights, gradients and Adam moments all in bf16."""
  config = train_fixtures.tiny_config(tmp_path / "data", tmp_path / "out", cpt_steps=12,
                                      log_every=1)
  del config.stages["sft"]
  config.model.dtype = config.model.param_dtype = "bfloat16"
  trainer.train(config)
  params = _final_params(tmp_path / "out", "cpt")
  assert {str(x.dtype) for x in jax.tree_util.tree_leaves(params)} == {"bfloat16"}
  losses = [r["loss"] for r in _rows(tmp_path / "out") if r["split"] == "train"]
  assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.3, losses


def test_lr_groups_scale_the_update_of_matching_parameters():
  """lr_groups gives matching parameters their own optimizer (label) and lr:
  with multiplier 0 they stay put, with 1 they move as without groups."""
  cfg = ModelConfig(**{**train_fixtures.TINY_MODEL, "vocab_size": 64})
  params = llama.init_params(cfg, jax.random.key(0))
  batch = _batch(cfg)

  def one_step(lr_groups):
    stage = config_lib.stage(lr=1e-2, steps=2, warmup_ratio=0.0, lr_groups=lr_groups)
    tx, lr = optim.build(stage, 2, params)
    state = trainer.init_state(params, tx, seed=0)
    return jax.jit(trainer.make_train_step(cfg, tx, lr, 1))(state, batch)[0].params

  plain = one_step(None)
  grouped = one_step({"embed": 0.0, "attn/q_": 1.0})
  np.testing.assert_array_equal(grouped["embed"]["embedding_vd"], params["embed"]["embedding_vd"])
  np.testing.assert_allclose(grouped["layers"]["attn"]["q_dnh"], plain["layers"]["attn"]["q_dnh"],
                             atol=1e-7)
  assert not np.allclose(plain["embed"]["embedding_vd"], params["embed"]["embedding_vd"])
  labels = optim.labels(params, config_lib.stage(lr_groups={"embed": 0.0}))
  assert labels["embed"]["embedding_vd"] == "group:embed"
  assert labels["layers"]["mlp"]["up_df"] == "train"
  # A pattern that changes nothing (a typo, or a weight the method freezes) is an error.
  with pytest.raises(ValueError, match=r"lr_groups: 'atn/q_' matches no parameter that the "
                     r"stage trains \(method full\).*'embed/embedding_vd'"):
    optim.labels(params, config_lib.stage(lr_groups={"atn/q_": 2.0}))
  with pytest.raises(ValueError, match=r"'embed' matches no parameter that the stage trains "
                     r"\(method freeze\)"):
    optim.labels(params, config_lib.stage(method="freeze", lr_groups={"embed": 2.0},
                                          peft=dict(train_layers=1)))


def test_a_state_that_cannot_fit_a_device_is_refused_before_it_is_allocated(tmp_path,
                                                                             monkeypatch):
  """On a device that reports its memory (a GPU's; the CPU's reports none), a
  stage whose parameters plus AdamW moments exceed it stops with the stage,
  the figures and what to change, instead of an allocation failure in XLA; a
  device with room for them trains."""
  from jaxsft import sharding as sharding_lib
  config = train_fixtures.tiny_config(tmp_path / "data", tmp_path / "out", cpt_steps=1,
                                      sft_steps=1)
  abstract = llama.abstract_params(ModelConfig(**train_fixtures.TINY_MODEL))
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
  # Full fine-tuning in fp32: the parameters and AdamW's two moments, 3x at least.
  monkeypatch.setattr(sharding_lib, "device_bytes", lambda device: 3 * param_bytes - 1)
  with pytest.raises(ValueError) as e:
    trainer.train(config)
  message = str(e.value)
  assert message.startswith("config.stages.cpt: the training state"), message
  assert f"{(3 * param_bytes - 1) / 2**30:.3g} GiB a cpu has for JAX" in message, message
  assert "method 'lora'" in message and "config.mesh.fsdp" in message, message
  # Room for the state passes this check; the step's activations are checked next.
  monkeypatch.setattr(sharding_lib, "device_bytes", lambda device: 3 * param_bytes + 2**16)
  with pytest.raises(ValueError, match=r"^config.stages.cpt: one training step needs"):
    trainer.train(config)
  monkeypatch.setattr(sharding_lib, "device_bytes", lambda device: 2**30)
  # Where devices count their peak (GPU/TPU), train rows report it.
  monkeypatch.setattr(sharding_lib, "device_peak_bytes", lambda device: 12345)
  config.output_dir = str(tmp_path / "out2")
  trainer.train(config)
  assert (tmp_path / "out2" / "stages" / "sft" / "final").is_dir()
  train_rows = [r for r in _rows(tmp_path / "out2") if r["split"] == "train"]
  assert train_rows and all(r["peak_bytes_per_device"] == 12345 for r in train_rows)


def test_a_step_that_cannot_fit_a_device_is_refused_before_it_runs(tmp_path, monkeypatch):
  """The state fits but the step's activations do not: the compiled step's own
  figure (XLA's buffer assignment, reported per stage in metrics.jsonl) is
  checked against the device's limit before the first step, and the error
  names the stage, the figures and the knobs that shrink activations."""
  from jaxsft import sharding as sharding_lib
  config = train_fixtures.tiny_config(tmp_path / "data", tmp_path / "out", cpt_steps=2,
                                      sft_steps=1)
  trainer.train(config)
  rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
  compiled = {r["stage"]: r for r in rows if r.get("split") == "compile"}
  assert set(compiled) == {"cpt", "sft"}, rows
  assert all("peak_bytes_per_device" not in r for r in rows)  # the CPU counts no peak
  cpt = compiled["cpt"]
  abstract = llama.abstract_params(ModelConfig(**train_fixtures.TINY_MODEL))
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
  # fp32 parameters, AdamW's two moments, the step counter, the count and the key.
  assert 3 * param_bytes <= cpt["state_bytes_per_device"] < 3 * param_bytes + 64, cpt
  # XLA's figure: the state (donated: counted once) plus the step's temporaries.
  assert cpt["step_bytes_per_device"] > cpt["state_bytes_per_device"] + 4 * 64 * 4, cpt
  assert cpt["compile_s"] > 0

  limit = (cpt["state_bytes_per_device"] + cpt["step_bytes_per_device"]) // 2
  monkeypatch.setattr(sharding_lib, "device_bytes", lambda device: limit)
  config.output_dir = str(tmp_path / "out2")
  with pytest.raises(ValueError) as e:
    trainer.train(config)
  message = str(e.value)
  gib = 2 ** 30
  assert message.startswith(
      f"config.stages.cpt: one training step needs {cpt['step_bytes_per_device'] / gib:.3g} GiB "
      f"per device on the mesh {{'fsdp': 1}} (the state "
      f"{cpt['state_bytes_per_device'] / gib:.3g} GiB"), message
  assert f"more than the {limit / gib:.3g} GiB a cpu has for JAX" in message, message
  assert "config.model.remat='projections_attention'" in message, message
  assert "config.model.remat='full'" in message and "grad_accum=2" in message, message
  # remat 'none' unrolls the 2 layers (auto); rolling them is the first remedy named.
  assert message.index("config.model.scan_unroll=1; it runs 2 layers per loop step (auto") \
      < message.index("config.model.remat="), message
  assert "4 -> 2 rows per device" in message and "method 'lora'" in message, message
  # Refused before the first step: no training row, no checkpoint.
  assert not (tmp_path / "out2" / "stages" / "cpt" / "checkpoints").exists() or not any(
      (tmp_path / "out2" / "stages" / "cpt" / "checkpoints").iterdir())
  out2_rows = (tmp_path / "out2" / "metrics.jsonl")
  assert not out2_rows.exists() or '"split": "train"' not in out2_rows.read_text()
