"""Compile for a GPU that is not here: NVIDIA devices for XLA's compile-only client.

Why. Whether a run fits an H100 is a question of XLA's buffer assignment for
that GPU (cuDNN's fused attention keeps no T×T scores, bf16 matmuls need no
fp32 copies), which a CPU compile of the same step does not answer. JAX can
compile for a GPU without one: PJRT's CUDA plugin builds a compile-only
topology from a *target config* (the device description XLA's GPU compiler
reads: compute capability, SM count, memory), and a step jitted over a mesh of
its devices compiles exactly as on the GPU, minus autotuning. The step's
``memory_analysis`` then gives what the GPU will hold: on an H200 this read
56.0 GiB for the Llama-3.2-1B full-SFT bench row that measured 56.5 GiB
there, and 40.6 GiB for the LoRA row that measured 41.0 (the code of that
run; docs/BENCHMARKS.md).

What. ``devices("h100:8")`` gives 8 compile-only GPU devices of a named
target (``TARGETS``: H100 SXM, H200, A100) or of a target config file written
on a real GPU (``python -m jaxsft.aot --write-config FILE`` there); model
code traced under a mesh of them takes its GPU paths
(``sharding.compute_platform``). ``device_limit`` is the memory JAX's
allocator lets a process use on one of them.

Needs jax's CUDA plugin and cuDNN installed on this host, no GPU and no
driver (module ``requirements_message``).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib

import jax


@dataclasses.dataclass(frozen=True)
class Target:
  """One GPU model as XLA's GPU compiler sees it (fields of its
  ``GpuTargetConfigProto``'s device info)."""
  name: str
  sm_major: int
  sm_minor: int
  core_count: int
  memory_bytes: int  # what the driver reports (nvidia-smi's total)
  bandwidth: float  # bytes/s
  l2_bytes: int
  clock_ghz: float
  shared_per_core: int
  shared_per_block_optin: int

  def config(self) -> str:
    """The target config text (protobuf text format) for this GPU."""
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {self.shared_per_core}
  threads_per_core_limit: 2048
  core_count: {self.core_count}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(self.bandwidth)}
  l2_cache_size: {self.l2_bytes}
  clock_rate_ghz: {self.clock_ghz}
  device_memory_size: {self.memory_bytes}
  shared_memory_per_block_optin: {self.shared_per_block_optin}
  cuda_compute_capability {{
    major: {self.sm_major}
    minor: {self.sm_minor}
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{
  major: 9
  minor: 19
}}
runtime_version {{
  major: 13
  minor: 0
}}
device_description_str: "{self.name}"
"""


# Published specifications; memory as nvidia-smi reports it (MiB × 2**20); the
# CUDA 13 / cuDNN 9.19 stack of the H200 measured in docs/BENCHMARKS.md.
TARGETS: dict[str, Target] = {
    "h100": Target("NVIDIA H100 80GB HBM3", 9, 0, 132, 81559 * 2**20, 3.35e12, 50 * 2**20,
                   1.98, 233472, 232448),
    "h200": Target("NVIDIA H200", 9, 0, 132, 143771 * 2**20, 4.8e12, 50 * 2**20,
                   1.98, 233472, 232448),
    "a100": Target("NVIDIA A100-SXM4-80GB", 8, 0, 108, 81920 * 2**20, 2.039e12, 40 * 2**20,
                   1.41, 167936, 166912),
}

# JAX's GPU allocator takes this fraction of a device's memory unless
# XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise.
DEFAULT_MEM_FRACTION = 0.75


def requirements_message() -> str:
  """What to install for ``devices``: the CUDA plugin matching this jaxlib, and cuDNN."""
  import jaxlib  # noqa: PLC0415
  v = jaxlib.__version__
  return (f"compiling for a GPU that is not here needs jax's CUDA plugin for this jaxlib and "
          f"cuDNN (no GPU, no driver): pip install jax-cuda13-plugin=={v} "
          f"jax-cuda13-pjrt=={v} nvidia-cudnn-cu13")


def target_config(target: str) -> tuple[str, str]:
  """(config text, label) for a name in TARGETS or a target config file."""
  if target.lower() in TARGETS:
    t = TARGETS[target.lower()]
    return t.config(), t.name
  path = pathlib.Path(target)
  if not path.is_file():
    raise ValueError(f"GPU target {target!r} is neither one of {sorted(TARGETS)} nor a target "
                     f"config file (write one on the GPU with `python -m jaxsft.aot "
                     f"--write-config FILE`)")
  text = path.read_text()
  if "gpu_device_info" not in text:
    raise ValueError(f"{path}: not an XLA GPU target config (no gpu_device_info); write one on "
                     f"the GPU with `python -m jaxsft.aot --write-config FILE`")
  return text, str(path)


def label(spec: str) -> str:
  """The GPU's name for ``spec`` (``NAME[:COUNT]``): its TARGETS name or the config file."""
  return target_config(parse(spec)[0])[1]


def _memory_bytes(config: str) -> int | None:
  for line in config.splitlines():
    key, _, value = line.strip().partition(":")
    if key == "device_memory_size":
      return int(value)
  return None


def parse(spec: str) -> tuple[str, int]:
  """``"h100:8"`` → ("h100", 8): a target and how many of its devices (default 1)."""
  target, sep, count = spec.rpartition(":")
  if not sep or not count.isdigit():
    return spec, 1
  if int(count) < 1:
    raise ValueError(f"GPU target {spec!r}: the device count after ':' must be positive")
  return target, int(count)


def devices(spec: str) -> list:
  """The compile-only devices ``spec`` names (``NAME[:COUNT]``, NAME one of
  TARGETS or a target config file): a mesh over them compiles programs for
  that GPU on this host."""
  from jax.experimental import topologies  # noqa: PLC0415

  target, count = parse(spec)
  config, name = target_config(target)
  try:
    topo = topologies.get_topology_desc(platform="cuda", target_config=config,
                                        topology=f"1x1x{count}")
  except Exception as e:  # noqa: BLE001  (plugin missing: several error types)
    raise ValueError(f"cannot make compile-only {name} devices ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''}); "
                     f"{requirements_message()}") from None
  try:  # cuDNN's fused attention asks for its version while being traced
    from jax._src.cudnn import fused_attention_stablehlo  # noqa: PLC0415
    fused_attention_stablehlo.check_cudnn_version()
  except (ImportError, AttributeError):  # a jax without this private check
    pass
  except RuntimeError as e:
    raise ValueError(f"cuDNN is not loadable here ({e}); {requirements_message()}") from None
  return list(topo.devices)


def device_limit(spec: str) -> int:
  """The bytes JAX's allocator lets one process use on one GPU of ``spec``:
  XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.75) of its memory."""
  config, label = target_config(parse(spec)[0])
  total = _memory_bytes(config)
  if total is None:
    raise ValueError(f"{label}: the target config gives no device_memory_size")
  fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", DEFAULT_MEM_FRACTION))
  return int(total * fraction)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m jaxsft.aot", description=(
      "On a GPU machine, write its XLA target config, for compiling for that GPU elsewhere "
      "(bench --target FILE, train --plan --target FILE[:COUNT])."))
  p.add_argument("--write-config", required=True, metavar="FILE")
  args = p.parse_args(argv)
  from jax._src.lib import xla_client  # noqa: PLC0415  (no public accessor)
  gpus = [d for d in jax.devices() if d.platform == "gpu"]
  if not gpus:
    raise SystemExit("error: no GPU here; run this on the GPU whose config you want")
  text = xla_client.get_topology_for_devices(gpus[:1]).target_config
  pathlib.Path(args.write_config).write_text(text)
  print(f"wrote {args.write_config} ({gpus[0].device_kind})")


if __name__ == "__main__":
  main()
