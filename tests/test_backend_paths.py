"""The backend-specific branches of the training step agree: traced as for a
GPU on this CPU, the step computes what the CPU branches compute."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import train_fixtures
from jaxsft import trainer
from jaxsft.models import ModelConfig, llama
from jaxsft.models.model_config import Adapters

QKV = ("q_dnh", "k_dkh", "v_dkh")
GATE_UP = ("gate_df", "up_df")


def test_the_gpu_code_paths_compute_the_cpu_step(monkeypatch):
  """Some pieces of the step branch on the backend (jaxsft.models.dense's
  hand-written backward, the loss's skipped chunks, CPU-tuned attention):
  traced as for a GPU (``jax.default_backend`` patched; fp32, so attention
  stays on XLA), the step gives what the CPU branches give. A GPU-only break
  then shows here, not first on a borrowed GPU."""
  cfg = ModelConfig(**{**train_fixtures.TINY_MODEL, "vocab_size": 64})
  params = llama.init_params(cfg, jax.random.key(0))
  tx, lr = optax.adamw(1e-2), optax.constant_schedule(1e-2)
  rng = np.random.RandomState(0)
  tokens = rng.randint(3, cfg.vocab_size, (2, 256)).astype(np.int32)  # > 128: several loss chunks
  segments = np.ones_like(tokens)
  segments[1, 200:] = 0  # some padding
  batch = {"tokens": tokens, "loss_mask": (rng.rand(2, 256) > 0.3).astype(np.int32),
           "segment_ids": segments,
           "positions": np.broadcast_to(np.arange(256, dtype=np.int32), tokens.shape).copy()}
  results = {}
  for backend in ("cpu", "gpu"):
    jax.clear_caches()  # the branches are taken at trace time
    with monkeypatch.context() as m:
      m.setattr(jax, "default_backend", lambda b=backend: b)
      step = jax.jit(trainer.make_train_step(cfg, tx, lr, 1))
      state, metrics = step(trainer.init_state(params, tx, seed=0), batch)
      state, metrics = step(state, batch)
      results[backend] = (jax.device_get(state.params), float(metrics["loss"]))
  jax.clear_caches()
  assert results["gpu"][1] == pytest.approx(results["cpu"][1], abs=1e-5)
  # Adam normalizes each update, so where a gradient is near 0 a last-bit
  # difference between the branches (another summation order) moves a weight
  # by up to ~1e-3 of its value after two steps at lr 1e-2 (seen: 1 entry of
  # 4096); a wrong branch moves thousands by ~lr.
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-3),
                         results["cpu"][0], results["gpu"][0])


def _gpu_mesh(shape=(1,), axes=("fsdp",), platform="gpu"):
  """An abstract mesh whose devices are GPUs (what a mesh of compile-only GPU
  devices looks like while a step is traced, jaxsft.aot), or TPUs."""
  from jax._src import mesh as mesh_lib  # noqa: PLC0415  (no public constructor)
  kind = "NVIDIA H100 80GB HBM3" if platform == "gpu" else "TPU v5 lite"
  device = mesh_lib.AbstractDevice(device_kind=kind, num_cores=132, platform=platform)
  return jax.sharding.AbstractMesh(shape, axes, abstract_device=device)


def test_the_mesh_decides_which_paths_a_step_takes():
  """Model code picks its GPU or CPU paths by the platform of the mesh it is
  traced under (``sharding.compute_platform``), not by the host tracing it: a
  step built under a GPU mesh on this CPU (planning a GPU run, jaxsft.aot) is
  the GPU's step. Each branch point is asked under both."""
  from jaxsft import config as config_lib, optim, sharding  # noqa: PLC0415
  from jaxsft.models import attention, dense, mixtral  # noqa: PLC0415

  stage = config_lib.stage(method="lora", lr=1e-4)
  moe = ModelConfig(**{**train_fixtures.TINY_MODEL, "num_experts": 4, "num_experts_per_tok": 2})
  x, w = jnp.ones((1, 4, 8), jnp.bfloat16), jnp.ones((8, 16), jnp.bfloat16)
  plain = ModelConfig(**train_fixtures.TINY_MODEL)
  lora_q = plain.replace(adapters=Adapters(lora_targets=("q_proj",), lora_rank=4, lora_alpha=8.0))

  def paths():
    grad = jax.make_jaxpr(jax.grad(lambda w: dense.project(x, w, 1).astype(jnp.float32).sum()))(w)
    return {"platform": sharding.compute_platform(),
            "attention": attention.resolve_impl("auto", jnp.bfloat16),
            "frozen": optim.frozen_dtype(stage, "bfloat16", "float32"),
            "moe": mixtral.resolve_dispatch(moe),
            "hand-written backward": "custom_vjp" in str(grad),
            "fused q/k/v": llama.fuses_projections(plain, QKV),
            "fused q/k/v, q with LoRA": llama.fuses_projections(lora_q, QKV),
            "fused gate/up, q with LoRA": llama.fuses_projections(lora_q, GATE_UP)}

  assert paths() == {"platform": "cpu", "attention": "xla", "frozen": None, "moe": "grouped",
                     "hand-written backward": True, "fused q/k/v": False,
                     "fused q/k/v, q with LoRA": False, "fused gate/up, q with LoRA": False}
  with jax.sharding.use_abstract_mesh(_gpu_mesh()):
    assert paths() == {"platform": "gpu", "attention": "cudnn", "frozen": jnp.bfloat16,
                       "moe": "bucketed", "hand-written backward": False, "fused q/k/v": True,
                       "fused q/k/v, q with LoRA": False, "fused gate/up, q with LoRA": True}
  # Tensor parallelism splits each weight's output axis: no concatenation across it.
  with jax.sharding.use_abstract_mesh(_gpu_mesh((2, 2), ("fsdp", "tensor"))):
    assert not llama.fuses_projections(plain, QKV)
  with jax.sharding.use_abstract_mesh(_gpu_mesh((2, 2), ("data", "fsdp"))):
    assert llama.fuses_projections(plain, QKV)
  with jax.sharding.use_abstract_mesh(_gpu_mesh(platform="tpu")):  # not measured there
    assert not llama.fuses_projections(plain, QKV)
  for mode, want in (("on", True), ("off", False)):
    assert llama.fuses_projections(plain.replace(fused_projections=mode), QKV) is want
  cpu_mesh = jax.sharding.Mesh(np.array(jax.devices("cpu")[:1]), ("fsdp",))
  with jax.sharding.use_abstract_mesh(cpu_mesh.abstract_mesh):
    assert paths()["platform"] == "cpu"
