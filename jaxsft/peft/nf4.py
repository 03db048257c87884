"""QLoRA's 4-bit frozen base: NF4 storage of projection weights, as
bitsandbytes stores them, and the matmul that reads it.

A frozen projection ``W`` (``q_dnh`` …, laid out ``[in…, out…]``) is held as
bitsandbytes' ``Linear4bit`` holds transformers' ``[out, in]`` weight: the
weight flattened to ``[out, in]``, cut into blocks of 64 consecutive input
elements, each block scaled by its largest magnitude (``absmax``) and every
element stored as the index (4 bits, two per byte) of the nearest of the 16
NF4 values. With double quantization (QLoRA's default) the per-block absmax
values are themselves stored in 8 bits: minus their mean, in blocks of 256,
through bitsandbytes' dynamic 8-bit map. The codes and scales equal what
``bitsandbytes.functional.quantize_4bit`` computes from the same weight
(tests/test_nf4.py), so a jaxsft QLoRA stage trains against the same 4-bit
model that ``transformers`` loads with ``BitsAndBytesConfig(load_in_4bit=True)``.

Stored form: the weight's leaf becomes a dict of arrays (leading stacked-layer
axis L kept), named so that the sharding rules apply (the flattened out / in
axes take the letter of their first axis):

  ``nf4_codes_OI``   uint8 [out, in/2]   two codes a byte, the first in the high nibble
  ``nf4_absmax_OI``  float32 [out, in/64] (or uint8 with double quantization)
  ``nf4_scale_b``    float32 [ceil(out·in/64/256)]  double quantization only
  ``nf4_offset_b``   float32 [1]                      double quantization only

Memory: 0.5 byte per weight plus 4/64 (1/64 + 4/16384 with double
quantization) for the scales: 0.516 byte per weight against bf16's 2.

``project`` computes ``x·W`` from the stored form and recomputes ``W`` in its
backward pass instead of keeping it: a frozen weight needs no gradient, and
keeping the dequantized weights for the backward pass would hold every
layer's weights in the compute dtype again.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft import sharding as sharding_lib

BLOCK = 64  # input elements per absmax (bitsandbytes' default, QLoRA's)
BLOCK2 = 256  # absmax values per scale under double quantization
PREFIX = "nf4_"

# The 16 NF4 values (bitsandbytes' ``get_4bit_type("nf4")``: quantiles of
# N(0, 1) normalized to [-1, 1], with an exact zero; QLoRA, Dettmers et al. 2023).
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)


def dynamic_map() -> np.ndarray:
  """bitsandbytes' signed dynamic 8-bit map (``create_dynamic_map()``): 256
  sorted values in [-1, 1], a dynamic exponent and a shrinking fraction, that
  double quantization stores the absmax values with."""
  data: list[float] = []
  for i in range(7):  # exponents 10^-6 … 10^0; 2^i fraction steps each
    bounds = _torch_linspace(0.1, 1.0, 2 ** i + 1)
    means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
    scale = np.float32(10.0 ** (-6 + i))  # torch scales the fp32 means in fp32
    data += (scale * means).tolist()
    data += (-scale * means).tolist()
  data += [0.0, 1.0]
  data += [0.0] * (256 - len(data))
  return np.sort(np.array(data, np.float32))


def _torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
  """``torch.linspace(start, end, steps, dtype=float32)`` bit for bit: an fp32
  step, then start + step·i (the first half) or end − step·(steps−1−i) (the
  rest) rounded once, as torch's fused multiply-add does."""
  start32, end32 = np.float32(start), np.float32(end)
  if steps == 1:
    return np.array([start32], np.float32)
  step = np.float64((end32 - start32) / np.float32(steps - 1))
  i = np.arange(steps, dtype=np.float64)
  return np.where(i < steps // 2, np.float64(start32) + step * i,
                  np.float64(end32) - step * (steps - 1 - i)).astype(np.float32)


def _midpoints(code: np.ndarray) -> np.ndarray:
  return ((code[:-1] + code[1:]) / np.float32(2.0)).astype(np.float32)


def _nearest(scaled: jax.Array, code: np.ndarray) -> jax.Array:
  """Index of the nearest ``code`` value (sorted) for each of ``scaled``:
  the number of midpoints below it (``torch.bucketize``, as bitsandbytes)."""
  mids = jnp.asarray(_midpoints(code))
  return jnp.sum(scaled[..., None] > mids, axis=-1).astype(jnp.uint8)


def _blockwise(x: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
  """``x`` [n·block] as [n, block] scaled into [-1, 1], and each block's absmax."""
  blocks = x.reshape(-1, block)
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  scaled = jnp.clip(blocks * (1.0 / jnp.maximum(absmax, 1e-38))[:, None], -1.0, 1.0)
  return scaled, absmax


def _quantize_2d(w: jax.Array, double_quant: bool) -> dict[str, jax.Array]:
  """One ``[out, in]`` weight's stored parts (unnamed: codes, absmax[, scale, offset])."""
  out_dim, in_dim = w.shape
  scaled, absmax = _blockwise(w.astype(jnp.float32).reshape(-1), BLOCK)
  q = _nearest(scaled, NF4).reshape(-1, 2)
  codes = ((q[:, 0] << 4) | q[:, 1]).reshape(out_dim, in_dim // 2)
  if not double_quant:
    return {"codes": codes, "absmax": absmax.reshape(out_dim, in_dim // BLOCK)}
  # bitsandbytes: the mean is taken, then subtracted, in fp32.
  offset = jnp.mean(absmax)
  centered = absmax - offset
  n = centered.shape[0]
  pad = -n % BLOCK2
  # A short last block: its own absmax over the real values (zeros do not raise it).
  scaled2, scale = _blockwise(jnp.pad(centered, (0, pad)), BLOCK2)
  qabs = _nearest(scaled2.reshape(-1)[:n], dynamic_map())
  return {"codes": codes, "absmax": qabs.reshape(out_dim, in_dim // BLOCK),
          "scale": scale, "offset": offset.reshape(1)}


def _dequantize_2d(parts: dict[str, jax.Array], dtype) -> jax.Array:
  """The ``[out, in]`` weight of ``_quantize_2d``'s parts, in ``dtype``:
  code value × absmax in fp32, then cast (as bitsandbytes)."""
  codes = parts["codes"]
  out_dim, half = codes.shape
  absmax = parts["absmax"]
  if "scale" in parts:
    n = absmax.size
    table8 = jnp.asarray(dynamic_map())
    values = table8[absmax.reshape(-1).astype(jnp.int32)]
    pad = -n % BLOCK2
    values = jnp.pad(values, (0, pad)).reshape(-1, BLOCK2) * parts["scale"][:, None]
    absmax = (values.reshape(-1)[:n] + parts["offset"][0]).reshape(absmax.shape)
  table = jnp.asarray(NF4)
  q = jnp.stack([codes >> 4, codes & 0xF], axis=-1).reshape(out_dim, half * 2)
  values = table[q.astype(jnp.int32)].reshape(out_dim, -1, BLOCK) * absmax[..., None]
  return values.reshape(out_dim, half * 2).astype(dtype)


# ----------------------------------------------------------------------------- stored form

def part_names(weight: str, n_in: int, double_quant: bool) -> dict[str, str]:
  """Stored names of ``weight``'s parts (see the module doc): ``q_dnh`` →
  {"codes": "nf4_codes_nd", "absmax": "nf4_absmax_nd", …}."""
  letters = weight.rsplit("_", 1)[1]
  oi = letters[n_in] + letters[0]
  names = {"codes": f"{PREFIX}codes_{oi}", "absmax": f"{PREFIX}absmax_{oi}"}
  if double_quant:
    names.update(scale=f"{PREFIX}scale_b", offset=f"{PREFIX}offset_b")
  return names


def is_stored(value) -> bool:
  """Whether ``value`` (a parameter's value) is the stored 4-bit form."""
  return isinstance(value, dict) and any(k.startswith(PREFIX + "codes_") for k in value)


def _unnamed(stored: dict) -> dict[str, jax.Array]:
  return {k[len(PREFIX):].split("_", 1)[0]: v for k, v in stored.items()}


def check_quantizable(path: str, shape, n_in: int, stacked: bool) -> None:
  """ValueError naming the weight if its input width is not whole blocks."""
  in_dim = math.prod(shape[int(stacked):int(stacked) + n_in])
  if in_dim % BLOCK:
    raise ValueError(f"{path}: input width {in_dim} (shape {tuple(shape)}) is not a multiple of "
                     f"{BLOCK}, the NF4 block size; this model cannot be stored in 4 bits "
                     f"(peft.quantization)")


def quantize(w: jax.Array, n_in: int, names: dict[str, str], stacked: bool,
             double_quant: bool) -> dict[str, jax.Array]:
  """``w`` ([L,] in…, out…) in the stored form (parts named by ``names``,
  ``part_names``). A stacked weight is quantized layer by layer, so the
  temporaries are one layer's."""
  def one(layer):
    w2 = layer.reshape(math.prod(layer.shape[:n_in]), -1).T
    return _quantize_2d(w2, double_quant)

  parts = jax.lax.map(one, w) if stacked else one(w)
  return {names[k]: v for k, v in parts.items()}


def dequantize(stored: dict, shape, dtype) -> jax.Array:
  """The weight of one layer's stored form, laid out ``shape`` ([in…, out…])."""
  w2 = _dequantize_2d(_unnamed(stored), dtype)
  return w2.T.reshape(shape)


def project(x: jax.Array, stored: dict, shape, n_in: int, dtype) -> jax.Array:
  """``x`` [B, T, in…] (in ``dtype``) times the stored weight of ``shape``
  [in…, out…] → [B, T, out…] in ``dtype``; the weight is dequantized again in
  the backward pass (module doc)."""
  parts = _unnamed(stored)
  lead = x.shape[:x.ndim - n_in]
  x2 = x.reshape(-1, math.prod(shape[:n_in]))
  y = _matmul(x2, parts, jnp.dtype(dtype))
  return y.reshape(lead + tuple(shape[n_in:]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x2, parts, dtype):
  w2 = _dequantize_2d(parts, dtype)  # [out, in]
  return jax.lax.dot_general(x2, w2, (((1,), (1,)), ((), ())))


def _matmul_fwd(x2, parts, dtype):
  return _matmul(x2, parts, dtype), parts


def _matmul_bwd(dtype, parts, dy):
  w2 = _dequantize_2d(parts, dtype)
  return jnp.matmul(dy, w2), None


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


class StoredWeight:
  """One layer's 4-bit weight as a projection reads it (``lora.project``):
  its stored parts and the ``[in…, out…]`` shape it stands for."""

  def __init__(self, stored: dict, shape):
    self.stored, self.shape = stored, tuple(shape)

  def project(self, x: jax.Array, n_in: int, dtype) -> jax.Array:
    return project(x, self.stored, self.shape, n_in, dtype)


# ----------------------------------------------------------------------------- in a stage

def quantizable(path: tuple[str, ...]) -> str | None:
  """The weight name if the parameter at ``path`` is a decoder projection that
  QLoRA stores in 4 bits (attention and dense MLP, as transformers'
  ``load_in_4bit`` makes every ``nn.Linear`` but the output layer a
  ``Linear4bit``; Mixtral's fused expert weights are no ``nn.Linear`` there
  and stay as they are here too), else None."""
  from jaxsft.peft import lora  # noqa: PLC0415  (lora imports this module)
  name = path[-1]
  if path[0] != "layers" or name not in lora.WEIGHTS or name == "kernel_dv" or "moe" in path:
    return None
  return name


def _shardings(path: tuple[str, ...], parts: dict, mesh) -> dict:
  """The stored parts' shardings over ``mesh`` by their names (None: unspecified)."""
  if mesh is None:
    return {k: None for k in parts}
  return {k: jax.sharding.NamedSharding(mesh, sharding_lib.spec_for(path + (k,), v.shape, mesh))
          for k, v in parts.items()}


def store(params, mask, double_quant: bool, mesh=None, keep=None):
  """``params`` with every frozen (``mask`` False) quantizable projection in
  the stored 4-bit form, each leaf quantized on its devices and then deleted
  (the peak is one leaf more), each part on the sharding its name gives over
  ``mesh``. ``keep(path, x)`` sees each original first (the trainer keeps them
  for the stage's final model). Works on abstract leaves too."""
  from jaxsft.peft import lora  # noqa: PLC0415

  def one(path, x, trained):
    names = sharding_lib.path_names(path)
    weight = quantizable(names)
    if trained or weight is None:
      return x
    n_in = lora.WEIGHTS[weight][1]
    check_quantizable("/".join(names), x.shape, n_in, stacked=True)
    parts = part_names(weight, n_in, double_quant)
    fn = functools.partial(quantize, n_in=n_in, names=parts, stacked=True,
                           double_quant=double_quant)
    abstract = jax.eval_shape(fn, x)
    shardings = _shardings(names, abstract, mesh)
    if isinstance(x, jax.ShapeDtypeStruct):
      return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
              for k, v in abstract.items()}
    if keep is not None:
      keep(names, x)
    if isinstance(x, np.ndarray):  # on the host (a QLoRA load): one layer at a time
      return _store_layers(x, n_in, parts, double_quant, abstract, shardings)
    out = jax.jit(fn, out_shardings=shardings)(x)
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
      x.delete()  # what donating would do (no output can reuse it: a warning)
    return out

  return jax.tree_util.tree_map_with_path(one, params, mask)


def _store_layers(x: np.ndarray, n_in: int, names: dict[str, str], double_quant: bool,
                  abstract: dict, shardings: dict):
  """``quantize`` of a stacked host weight, sent to the device a layer at a
  time and written into the stacked parts there: the device never holds more
  of the weight than one layer in its own dtype."""
  out = {k: jnp.zeros(a.shape, a.dtype, device=shardings[k]) for k, a in abstract.items()}
  one = jax.jit(functools.partial(quantize, n_in=n_in, names=names, stacked=False,
                                  double_quant=double_quant))
  for i in range(x.shape[0]):
    out = _write_layer(out, one(x[i]), i)
  return out


@functools.partial(jax.jit, donate_argnums=0)
def _write_layer(stacked: dict, layer: dict, i: int) -> dict:
  return {k: jax.lax.dynamic_update_index_in_dim(v, layer[k].astype(v.dtype), i, 0)
          for k, v in stacked.items()}


def is_part(path: tuple[str, ...]) -> bool:
  """Whether ``path`` names a part of a stored 4-bit weight."""
  return path[-1].startswith(PREFIX)


def restore(stored, originals: dict):
  """``stored`` with each 4-bit form replaced by ``originals[path]``."""
  def walk(tree, path):
    if is_stored(tree):
      return originals[path]
    if isinstance(tree, dict):
      return {k: walk(v, path + (k,)) for k, v in tree.items()}
    return tree
  return walk(stored, ())


def has_stored(params) -> bool:
  """Whether any parameter of ``params`` is in the 4-bit form."""
  if is_stored(params):
    return True
  return isinstance(params, dict) and any(has_stored(v) for v in params.values())
