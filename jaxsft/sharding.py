"""Meshes and partition specs, expressed as data.

Parameter names end in their axis letters (``q_dnh``: D, N, H); parameters
under ``layers`` carry a leading stacked-layer axis L. A rule table maps each
letter to a mesh axis (or to nothing), so the sharding of every weight follows
from its name — no per-module annotations.
"""
from __future__ import annotations

import argparse
import functools
from typing import Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Axis letter -> mesh axis (or tuple of mesh axes). Letters not listed are replicated.
#   V vocab, D model width, N query heads, K kv heads, H head dim,
#   F ffn width, E experts, L stacked layers, C labels of a task head.
# Letters are assigned in name order and a mesh axis serves one dim, so expert
# weights (``gate_edf``) put E on ``expert`` and D on ``fsdp`` alone, while every
# other weight is also sharded over ``expert`` (data-parallel outside the MoE).
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "v": "tensor",
    "d": ("fsdp", "expert"),
    "n": "tensor",
    "k": "tensor",
    "h": None,
    "f": "tensor",
    "e": "expert",
    "c": None,  # a task head's labels: few, replicated
    "L": None,
}

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# The mesh axes a batch's rows are split over. The expert axis is data-parallel
# outside the MoE layers (as in GShard): its devices hold different rows, and
# the dropless dispatch (models/mixtral.py) gathers the rows of an expert group
# for the experts each device holds.
BATCH_AXES = ("data", "fsdp", "expert")


def data_parallel_size(mesh: Mesh) -> int:
  """How many ways a batch's rows are split (the product of BATCH_AXES)."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def split_axes(mesh: Mesh) -> dict[str, int]:
  """The mesh's axes over more than one device, by name (empty for one device):
  the mesh as messages and reports show it."""
  return {a: int(k) for a, k in mesh.shape.items() if k > 1}


def with_mesh(mesh: Mesh, fn: Callable) -> Callable:
  """``fn`` (a jitted step) called under ``jax.set_mesh(mesh)``: model code that
  needs the mesh while being traced (the MoE dispatch's ``shard_map``) finds it
  with ``jax.sharding.get_abstract_mesh()``; without a mesh it runs unsharded."""
  @functools.wraps(fn)
  def call(*args, **kwargs):
    with jax.set_mesh(mesh):
      return fn(*args, **kwargs)
  return call


def compute_platform() -> str:
  """The platform ("cpu", "gpu", "tpu") of the program being built: that of
  the mesh set with ``jax.set_mesh`` when there is one, else JAX's default
  backend. Model code picks its GPU/CPU paths by it, so a step traced under a
  mesh of compile-only GPU devices (``jaxsft.aot``: planning an H100 run on a
  laptop) or of host CPU devices on a GPU machine gets the paths of the
  devices it will run on, not of the machine tracing it."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  platform = getattr(device, "platform", None)
  return platform or jax.default_backend()


def host_device():
  """The host's first CPU device, for work that must not take accelerator
  memory (exporting, weights parked between stages); None where JAX runs
  without the cpu platform (``JAX_PLATFORMS`` leaving it out)."""
  try:
    return jax.devices("cpu")[0]
  except RuntimeError:
    return None


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
  """A mesh over ``devices`` with axes MESH_AXES; unnamed axes get size 1, and
  a single ``-1`` takes the remaining devices (default: all on ``fsdp``)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = dict(shape or {"fsdp": -1})
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; valid axes: {MESH_AXES}")
  sizes = [shape.get(a, 1) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {shape}: at most one axis may be -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {shape}: {len(devices)} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"but {len(devices)} are available")
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def parse_mesh(spec: str) -> dict[str, int]:
  """``fsdp=4,tensor=2`` → {"fsdp": 4, "tensor": 2}: the command lines' ``--mesh``,
  with the axes of the trainer's ``config.mesh`` (-1 takes the remaining devices)."""
  shape = {}
  for part in spec.split(","):
    axis, eq, size = part.strip().partition("=")
    try:
      n = int(size)
    except ValueError:
      n = 0
    if not eq or axis not in MESH_AXES or not (n > 0 or n == -1) or axis in shape:
      raise ValueError(
          f"--mesh wants axis=size pairs over {', '.join(MESH_AXES)} (size a positive count "
          f"or -1, each axis once), e.g. fsdp=8 or data=2,fsdp=4; got {spec!r}")
    shape[axis] = n
  return shape


def mesh_arg(spec: str) -> dict[str, int]:
  """``parse_mesh`` as an argparse ``type=``: its message reaches the user."""
  try:
    return parse_mesh(spec)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def axis_letters(path: tuple[str, ...], ndim: int) -> str:
  """The axis letters of the parameter at ``path`` (e.g. ('layers','attn','q_dnh') -> 'Ldnh')."""
  name = path[-1]
  letters = name.rsplit("_", 1)[-1] if "_" in name else ""
  if "layers" in path or "layers_frozen" in path:  # stacked (freeze tuning splits the stack)
    letters = "L" + letters
  assert len(letters) == ndim, f"parameter {'/'.join(path)}: name says {letters!r} but ndim={ndim}"
  return letters


def path_names(path) -> tuple[str, ...]:
  """The string keys of a jax tree path."""
  return tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)


def spec_for(path: tuple[str, ...], shape: Sequence[int], mesh: Mesh,
             rules: Mapping[str, object] = DEFAULT_RULES) -> P:
  """PartitionSpec of one parameter: its letters through ``rules``, dropping mesh
  axes that do not divide the dimension or are already used by another dim."""
  used: set[str] = set()
  spec = []
  for letter, dim in zip(axis_letters(path, len(shape)), shape):
    axes = rules.get(letter)
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
    size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if not axes or dim % size:
      spec.append(None)
      continue
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def param_shardings(params, mesh: Mesh, rules: Mapping[str, object] = DEFAULT_RULES):
  """A NamedSharding tree matching ``params`` (arrays or ShapeDtypeStructs)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, spec_for(path_names(path), x.shape, mesh, rules)),
      params)


def constrain_rows(x):
  """``x`` (activations, rows first) pinned to the batch's row sharding under
  the mesh set by ``jax.set_mesh`` (the trainer's steps run under one,
  ``with_mesh``): rows over BATCH_AXES, the rest replicated. Without it XLA's
  sharding propagation may follow the weights instead (D over ``fsdp``) and
  compute every layer on the global batch, all-reducing activations, rather
  than gathering each layer's weights as FSDP does. No mesh, one device, or
  rows the axes do not divide (e.g. decoding one prompt): ``x`` unchanged."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return x
  axes = _row_axes(mesh, x.shape[0])
  if axes is None:
    return x
  return jax.lax.with_sharding_constraint(x, P(axes, *(None,) * (x.ndim - 1)))


def _row_axes(mesh, rows: int) -> tuple[str, ...] | None:
  """The BATCH_AXES of ``mesh`` that a dim of ``rows`` splits over; None when
  there are none or they do not divide it."""
  axes = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)
  if not axes or rows % int(np.prod([mesh.shape[a] for a in axes])):
    return None
  return axes


def constrain_cache(x):
  """A KV cache ``x`` [L, B, S, K, H] pinned under the mesh set by
  ``jax.set_mesh``: rows as ``constrain_rows`` splits the activations, kv heads
  as the rule table splits the k/v projections' K (``tensor``), the rest
  replicated, so a sharded model's cache is split like its weights rather than
  held whole on every device. Axes that do not divide a dim leave it whole."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return x
  # Letters "lbskh": only k is in the rule table (l, b, s, h stay whole), so
  # spec_for splits the kv heads exactly as it splits k_dkh's K.
  spec = list(spec_for(("cache_lbskh",), x.shape, mesh))
  spec[1] = _row_axes(mesh, x.shape[1])
  return jax.lax.with_sharding_constraint(x, P(*spec))


def device_bytes(device) -> int | None:
  """The memory JAX may use on ``device``; None where it does not say (CPU)."""
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  return (stats or {}).get("bytes_limit")


def device_peak_bytes(device) -> int | None:
  """The most memory ``device`` has held so far; None where it does not say (CPU)."""
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  peak = (stats or {}).get("peak_bytes_in_use")
  return None if peak is None else int(peak)


def bytes_per_device(tree, shardings) -> int:
  """The bytes ``tree`` (arrays or ShapeDtypeStructs) takes on each device
  when each leaf is placed on its sharding in ``shardings`` (a matching tree of
  NamedShardings): one shard of every leaf."""
  return sum(int(np.prod(s.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
             for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def compiled_memory(compiled) -> int | None:
  """Bytes a compiled program holds on one device at its peak, from XLA's own
  buffer assignment (``compiled.memory_analysis()``): arguments + outputs +
  temporaries − outputs that alias (donated) arguments. None where the backend
  gives no analysis. Excludes what lives outside the program (e.g. batches
  queued on the device, the runtime's own reservations)."""
  try:
    stats = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError):
    return None
  if stats is None:
    return None
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
             + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
