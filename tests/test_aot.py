"""jaxsft.aot: compiling and planning for a GPU that is not here.

The compiles themselves need jax's CUDA plugin and cuDNN (no GPU): those
tests run where both are installed (see ``aot.requirements_message``) and are
skipped elsewhere; the rest run everywhere.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from jaxsft import aot, bench

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_PLUGIN = importlib.util.find_spec("jax_plugins") is not None and any(
    (pathlib.Path(p) / "xla_cuda13").is_dir() or (pathlib.Path(p) / "xla_cuda12").is_dir()
    for p in importlib.util.find_spec("jax_plugins").submodule_search_locations)
_CUDNN = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec(
    "nvidia.cudnn") is not None
needs_plugin = pytest.mark.skipif(not (_PLUGIN and _CUDNN),
                                  reason="jax's CUDA plugin and cuDNN are not installed here")


def test_targets_counts_and_limits(tmp_path, monkeypatch):
  assert aot.parse("h100") == ("h100", 1)
  assert aot.parse("h200:8") == ("h200", 8)
  assert aot.parse("/configs/gpu:a.pbtxt") == ("/configs/gpu:a.pbtxt", 1)
  with pytest.raises(ValueError, match="must be positive"):
    aot.parse("h100:0")
  text, label = aot.target_config("H100")
  assert label == "NVIDIA H100 80GB HBM3" and "major: 9" in text
  with pytest.raises(ValueError, match=r"neither one of \['a100', 'h100', 'h200'\]"):
    aot.target_config("v100")
  junk = tmp_path / "junk.txt"
  junk.write_text("hello")
  with pytest.raises(ValueError, match=f"{junk}: not an XLA GPU target config"):
    aot.target_config(str(junk))
  # A config file written on a GPU (here: the H200's text) names itself by path.
  own = tmp_path / "mine.pbtxt"
  own.write_text(aot.TARGETS["h200"].config())
  assert aot.target_config(str(own)) == (own.read_text(), str(own))
  # JAX's allocator takes 75% of the memory unless told otherwise.
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  h200 = 143771 * 2**20
  assert aot.device_limit("h200:4") == int(h200 * 0.75)  # 105.3 GiB: what the H200 reported
  assert abs(aot.device_limit("h200") / 2**30 - 105.3) < 0.05
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
  assert aot.device_limit(str(own)) == int(h200 * 0.9)


@pytest.mark.skipif(_PLUGIN, reason="the CUDA plugin is installed here")
def test_without_the_cuda_plugin_the_error_says_what_to_install():
  with pytest.raises(ValueError) as e:
    aot.devices("h100")
  message = str(e.value)
  assert message.startswith("cannot make compile-only NVIDIA H100 80GB HBM3 devices")
  import jaxlib  # noqa: PLC0415
  assert f"jax-cuda13-plugin=={jaxlib.__version__}" in message and "nvidia-cudnn-cu13" in message


def test_a_target_only_compiles(capsys):
  with pytest.raises(SystemExit) as e:
    bench.parse_args(["--target", "h100"])
  assert e.value.code == 2
  assert "--target compiles for a GPU that is not here" in capsys.readouterr().err
  run = subprocess.run([sys.executable, "-m", "jaxsft.train", "--config",
                        str(_ROOT / "configs" / "demo.py"), "--target", "h100"],
                       capture_output=True, text=True, cwd=_ROOT,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert run.returncode == 2
  assert "error: --target plans for GPUs that are not here; it needs --plan" in run.stderr


@needs_plugin
def test_compiles_the_bench_step_for_a_gpu_that_is_not_here(capsys):
  """The tiny bench step compiled for an H200 on this host: the GPU's step
  (cuDNN's fused attention, no hand-written CPU backward), with XLA's memory
  figure against the H200's limit."""
  result = bench.main(["--shape", "tiny", "--compile-scaling", "2", "--seq-len", "256",
                       "--batch", "2", "--target", "h200:2"])
  assert result["backend"] == "gpu (compile-only)" and result["device"] == "NVIDIA H200"
  assert result["n_devices"] == 2 and result["mesh"] == {"fsdp": 2}
  row = result["compile_scaling"][0]
  assert row["device_bytes_limit"] == aot.device_limit("h200")
  assert 0 < row["memory_bytes_per_device"] < row["device_bytes_limit"] and row["fits"] is True

  args = bench.parse_args(["--target", "h200", "--compile-scaling", "2", "--seq-len", "256",
                           "--batch", "2"])
  mesh = bench.bench_mesh(args)
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    compiled, _, _ = bench.compile_step(bench.model_config(args).replace(num_layers=2), 2, 256,
                                        bench.make_stage(args), mesh)
  hlo = compiled.as_text()
  assert "__cudnn$fmha" in hlo and "custom_call_target" in hlo


@needs_plugin
def test_plans_a_run_for_gpus_that_are_not_here(tmp_path):
  """``train --plan --target h100:2``: every stage compiled for two H100s on
  this host, its rows against the H100's limit; nothing is written."""
  import peft_fixtures  # noqa: PLC0415
  from jaxsft import config as config_lib, trainer  # noqa: PLC0415

  c = peft_fixtures.one_stage_config(tmp_path, peft_fixtures.hf_dir(tmp_path), "full", 2, {})
  c.model.dtype = "bfloat16"
  c.stages.lora = config_lib.stage(**{**c.stages.sft.to_dict(), "method": "lora"})
  rows = trainer.plan(c, target="h100:2")
  assert not pathlib.Path(c.output_dir).exists()
  assert [(r["stage"], r["method"]) for r in rows] == [("sft", "full"), ("lora", "lora")]
  for r in rows:
    assert r["device"] == "NVIDIA H100 80GB HBM3" and r["mesh"] == {"fsdp": 2}
    assert r["device_bytes_limit"] == aot.device_limit("h100")
    assert r["fits"] is True and r["problem"] is None
  assert rows[1]["state_bytes_per_device"] < rows[0]["state_bytes_per_device"]


@needs_plugin
def test_unrolled_layers_keep_their_remat_on_a_gpu():
  """Compiled for an H100, remat full still saves memory when the layers are
  unrolled (without the CSE fence, XLA's GPU pipeline merged the recomputation
  back into the forward pass: as much memory as no remat)."""
  need = {}
  for remat in ("none", "full"):
    args = bench.parse_args(["--shape", "tiny", "--compile-scaling", "4", "--seq-len", "1024",
                             "--batch", "4", "--target", "h100", "--scan-unroll", "4",
                             "--remat", remat])
    mesh = bench.bench_mesh(args)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      compiled, _, _ = bench.compile_step(bench.model_config(args).replace(num_layers=4), 4, 1024,
                                          bench.make_stage(args), mesh)
    need[remat] = compiled.memory_analysis().temp_size_in_bytes
  assert need["full"] < 0.7 * need["none"], need
