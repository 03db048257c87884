"""tools/hlo_roofline.py reads a compiled program's HLO: kernels, loop trip counts, FLOPs."""
from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
import hlo_roofline  # noqa: E402


def test_a_layer_loop_is_priced_once_per_trip():
  """A scan of 6 layers, each a [64,256]x[256,512] matmul and a tanh, compiled
  here: the roofline finds the matmul's FLOPs 6 times (the while loop's trip
  count) and a memory-bound kernel for the rest, and its time is each
  kernel's roofline time summed."""
  layers, m, k, n = 6, 64, 256, 512

  def f(x, ws):
    def body(h, w):
      return jnp.tanh(h @ w)[:, :k], None
    return jax.lax.scan(body, x, ws)[0].sum()

  x = jax.ShapeDtypeStruct((m, k), jnp.float32)
  ws = jax.ShapeDtypeStruct((layers, k, n), jnp.float32)
  text = jax.jit(f).lower(x, ws).compile().as_text()
  r = hlo_roofline.Roofline(text, peak_tflops=100.0, matmul_efficiency=0.5,
                            attention_tflops=300.0, bandwidth=1e12, bandwidth_efficiency=0.5)
  matmuls = [kernel for kernel in r.kernels if kernel.kind == "matmul"]
  assert sum(kernel.flops for kernel in matmuls) == layers * 2 * m * k * n
  assert {kernel.times for kernel in matmuls} == {layers}
  assert any(kernel.kind != "matmul" for kernel in r.kernels)
  for kernel in r.kernels:
    floor = kernel.moved / 0.5e12
    expected = max(floor, kernel.flops / 50e12) if kernel.kind == "matmul" else floor
    assert kernel.seconds == pytest.approx(expected)
  report = r.report(top=3)
  assert report.splitlines()[0].split()[:2] == ["kind", "kernels"]
  assert "the 3 costliest kernels" in report



def test_a_loop_of_unknown_length_is_priced_at_unknown_trips():
  """The loss's chunk loop stops at a count read from the data, so XLA knows
  no trip count for it: the roofline prices its body ``unknown_trips`` times
  and names the loop in the report."""
  m, k, n = 64, 256, 512

  def f(x, w, stop):
    def body(state):
      i, h = state
      return i + 1, jnp.tanh(h @ w)[:, :k]
    return jax.lax.while_loop(lambda state: state[0] < stop, body, (0, x))[1].sum()

  text = jax.jit(f).lower(jax.ShapeDtypeStruct((m, k), jnp.float32),
                          jax.ShapeDtypeStruct((k, n), jnp.float32),
                          jax.ShapeDtypeStruct((), jnp.int32)).compile().as_text()
  for trips in (1, 5):
    r = hlo_roofline.Roofline(text, peak_tflops=100.0, matmul_efficiency=0.5,
                              attention_tflops=300.0, bandwidth=1e12, bandwidth_efficiency=0.5,
                              unknown_trips=trips)
    matmuls = [kernel for kernel in r.kernels if kernel.kind == "matmul"]
    assert sum(kernel.flops for kernel in matmuls) == trips * 2 * m * k * n
    assert len(r.unknown_loops) == 1
    assert f"priced at {trips} trips (--unknown-trips): {r.unknown_loops[0]}" in r.report(top=0)

_GATHER_HLO = """HloModule m

%fused_pick (param_0: f32[1024,4096], param_1: s32[1024,1]) -> f32[1024,1] {
  %param_0 = f32[1024,4096]{1,0} parameter(0)
  %bitcast.1 = f32[1024,4096,1]{2,1,0} bitcast(%param_0)
  %param_1 = s32[1024,1]{1,0} parameter(1)
  %gather.1 = f32[1024,1]{1,0} gather(%bitcast.1, %param_1), offset_dims={1}, slice_sizes={1,1,1}
  ROOT %negate.1 = f32[1024,1]{1,0} negate(%gather.1)
}

%fused_whole (param_0: f32[1024,4096], param_1: s32[1024,1]) -> f32[1024,1] {
  %param_0 = f32[1024,4096]{1,0} parameter(0)
  %param_1 = s32[1024,1]{1,0} parameter(1)
  %gather.2 = f32[1024,1]{1,0} gather(%param_0, %param_1), offset_dims={1}, slice_sizes={1,1}
  %exp.2 = f32[1024,4096]{1,0} exponential(%param_0)
  ROOT %add.2 = f32[1024,1]{1,0} add(%gather.2, %gather.2)
}

ENTRY %main (p0: f32[1024,4096], p1: s32[1024,1]) -> (f32[1024,1], f32[1024,1]) {
  %p0 = f32[1024,4096]{1,0} parameter(0)
  %p1 = s32[1024,1]{1,0} parameter(1)
  %loop_pick_fusion = f32[1024,1]{1,0} fusion(%p0, %p1), kind=kLoop, calls=%fused_pick
  %loop_whole_fusion = f32[1024,1]{1,0} fusion(%p0, %p1), kind=kLoop, calls=%fused_whole
  ROOT %t = (f32[1024,1]{1,0}, f32[1024,1]{1,0}) tuple(%loop_pick_fusion, %loop_whole_fusion)
}
"""


def test_a_gathered_operand_counts_what_is_picked():
  """A kernel that only gathers from an operand (through a bitcast: how a
  loss picks each row's target logit out of [tokens, vocab] logits) reads
  what it picks, not the whole operand; one that also uses it whole reads
  it whole."""
  r = hlo_roofline.Roofline(_GATHER_HLO, peak_tflops=100.0, matmul_efficiency=0.5,
                            attention_tflops=300.0, bandwidth=1e12, bandwidth_efficiency=0.5)
  moved = {kernel.name: kernel.moved for kernel in r.kernels}
  column = 1024 * 4  # one f32 per row: the picked logits, the indices, the output
  assert moved["loop_pick_fusion"] == 3 * column
  assert moved["loop_whole_fusion"] == 1024 * 4096 * 4 + 2 * column


# One unrolled layer's two weights, taken from their stacked fp32 parameters,
# cast to bf16 and concatenated for one matmul (llama._projections, as the
# GPU compiler fuses it: the cast sits between the parameter and its slice).
_SLICED_HLO = """HloModule jit_train_step, is_scheduled=true

%fused_concatenate (param_0: f32[16,256,512], param_1: f32[16,256,512]) -> bf16[256,1024] {
  %param_0 = f32[16,256,512]{2,1,0} parameter(0)
  %convert.1 = bf16[16,256,512]{2,1,0} convert(%param_0)
  %slice.1 = bf16[1,256,512]{2,1,0} slice(%convert.1), slice={[6:7], [0:256], [0:512]}
  %bitcast.1 = bf16[256,512]{1,0} bitcast(%slice.1)
  %param_1 = f32[16,256,512]{2,1,0} parameter(1)
  %convert.2 = bf16[16,256,512]{2,1,0} convert(%param_1)
  %slice.2 = bf16[1,256,512]{2,1,0} slice(%convert.2), slice={[6:7], [0:256], [0:512]}
  %bitcast.2 = bf16[256,512]{1,0} bitcast(%slice.2)
  ROOT %concatenate.1 = bf16[256,1024]{1,0} concatenate(%bitcast.1, %bitcast.2), dimensions={1}
}

%fused_whole (param_0.1: f32[16,256,512]) -> bf16[16,256,512] {
  %param_0.1 = f32[16,256,512]{2,1,0} parameter(0)
  ROOT %convert.3 = bf16[16,256,512]{2,1,0} convert(%param_0.1)
}

ENTRY %main (gate: f32[16,256,512], up: f32[16,256,512]) -> (bf16[256,1024], bf16[16,256,512]) {
  %gate = f32[16,256,512]{2,1,0} parameter(0)
  %up = f32[16,256,512]{2,1,0} parameter(1)
  %input_concatenate_fusion = bf16[256,1024]{1,0} fusion(%gate, %up), kind=kInput, calls=%fused_concatenate
  %loop_convert_fusion = bf16[16,256,512]{2,1,0} fusion(%gate), kind=kLoop, calls=%fused_whole
  ROOT %tuple.1 = (bf16[256,1024]{1,0}, bf16[16,256,512]{2,1,0}) tuple(%input_concatenate_fusion, %loop_convert_fusion)
}
"""


def test_a_sliced_layer_of_a_stacked_weight_counts_that_layer():
  """A kernel that casts a stacked [L, ...] weight and slices one layer out
  of it reads that layer (in the parameter's dtype), not all L of them; a
  kernel that casts the whole stack reads it whole."""
  r = hlo_roofline.Roofline(_SLICED_HLO, peak_tflops=100.0, matmul_efficiency=0.5,
                            attention_tflops=300.0, bandwidth=1e12, bandwidth_efficiency=0.5)
  moved = {kernel.name: kernel.moved for kernel in r.kernels}
  layer = 256 * 512
  assert moved["input_concatenate_fusion"] == 2 * layer * 4 + 2 * layer * 2
  assert moved["loop_convert_fusion"] == 16 * layer * (4 + 2)


# How XLA 0.11 (jax 0.11, the GPU machine's stack) prints a while loop body:
# a tuple element is an operand "%name#i", with no get-tuple-element.
_TUPLE_ELEMENT_HLO = """HloModule jit_train_step, is_scheduled=true

%wrapped_add_computation (param_0: f32[], param_1: f32[]) -> f32[] {
  %param_0 = f32[] parameter(0)
  %param_1 = f32[] parameter(1)
  ROOT %add.1 = f32[] add(%param_0, %param_1)
}

%fused_convert (param_0.1: f32[8,128]) -> bf16[8,128] {
  %param_0.1 = f32[8,128]{1,0} parameter(0)
  ROOT %convert.1 = bf16[8,128]{1,0} convert(%param_0.1)
}

ENTRY %main (arg_tuple.1: (s32[], f32[], f32[2048,128256], bf16[16,8], (f32[8,128], s32[]))) -> (f32[], bf16[8,128]) {
  %arg_tuple.1 = (s32[], f32[], f32[2048,128256]{1,0}, /*index=3*/bf16[16,8]{1,0}, (f32[8,128]{1,0}, s32[])) parameter(0), metadata={scheduling_name="arg_tuple.1"}
  %wrapped_add = f32[] fusion(%arg_tuple.1#1, %arg_tuple.1#1), kind=kLoop, calls=%wrapped_add_computation
  %loop_convert_fusion = bf16[8,128]{1,0} fusion(%arg_tuple.1#4#0), kind=kLoop, calls=%fused_convert
  ROOT %tuple.2 = (f32[], bf16[8,128]{1,0}) tuple(%wrapped_add, %loop_convert_fusion)
}
"""


def test_a_tuple_element_operand_is_priced_as_that_element():
  """A kernel reading one element of a tuple (the loss loop's scalar total,
  beside the 1 GB fp32 output-layer gradient in the loop's carry) moves that
  element's bytes, not the whole tuple's."""
  r = hlo_roofline.Roofline(_TUPLE_ELEMENT_HLO, peak_tflops=100.0, matmul_efficiency=0.5,
                            attention_tflops=300.0, bandwidth=1e12, bandwidth_efficiency=0.5)
  moved = {kernel.name: kernel.moved for kernel in r.kernels}
  assert moved == {"wrapped_add": 3 * 4, "loop_convert_fusion": 8 * 128 * (4 + 2)}
  types = {"t": "(s32[], (f32[8,128]{1,0}, /*index=1*/bf16[2,3]{1,0}), f32[4])"}
  assert hlo_roofline.operand_type(types, "t#2") == "f32[4]"
  assert hlo_roofline.operand_type(types, "t#1#1") == "/*index=1*/bf16[2,3]{1,0}"
  assert hlo_roofline.nbytes(hlo_roofline.operand_type(types, "t#1")) == 8 * 128 * 4 + 12


# XLA 0.11's async fusion in a layer loop: a stacked residual's in-place
# write started by async-start, awaited by async-done.
_ASYNC_FUSION_HLO = """HloModule jit_train_step, is_scheduled=true

%fused_dynamic_update_slice.clone (param_0: bf16[32,4,2048,512], param_1: s32[], param_2: bf16[4,2048,512]) -> bf16[32,4,2048,512] {
  %param_0 = bf16[32,4,2048,512]{3,2,1,0} parameter(0)
  %param_2 = bf16[4,2048,512]{2,1,0} parameter(2)
  %bitcast.1 = bf16[1,4,2048,512]{3,2,1,0} bitcast(%param_2)
  %param_1 = s32[] parameter(1)
  %constant.1 = s32[] constant(0)
  ROOT %dynamic-update-slice.1 = bf16[32,4,2048,512]{3,2,1,0} dynamic-update-slice(%param_0, %bitcast.1, %param_1, %constant.1, %constant.1, /*index=5*/%constant.1)
}

%async_computation.6 (param_0.1: bf16[32,4,2048,512], param_1.1: s32[], param_2.1: bf16[4,2048,512]) -> bf16[32,4,2048,512] {
  %param_0.1 = bf16[32,4,2048,512]{3,2,1,0} parameter(0)
  %param_1.1 = s32[] parameter(1)
  %param_2.1 = bf16[4,2048,512]{2,1,0} parameter(2)
  ROOT %loop_dynamic_update_slice_fusion.16 = bf16[32,4,2048,512]{3,2,1,0} fusion(%param_0.1, %param_1.1, %param_2.1), kind=kLoop, calls=%fused_dynamic_update_slice.clone
}

ENTRY %main (arg_tuple.2: (s32[], bf16[4,2048,512], bf16[32,4,2048,512])) -> bf16[32,4,2048,512] {
  %arg_tuple.2 = (s32[], bf16[4,2048,512]{2,1,0}, bf16[32,4,2048,512]{3,2,1,0}) parameter(0)
  %fusion-start.6 = ((bf16[32,4,2048,512]{3,2,1,0}, s32[], bf16[4,2048,512]{2,1,0}), bf16[32,4,2048,512]{3,2,1,0}, u32[]) async-start(%arg_tuple.2#2, %arg_tuple.2#0, %arg_tuple.2#1), calls=%async_computation.6
  ROOT %fusion-done.6 = bf16[32,4,2048,512]{3,2,1,0} async-done(%fusion-start.6)
}
"""


def test_an_async_fusion_is_priced_once_as_the_fusion_it_starts():
  """XLA 0.11 runs a layer loop's stacked-residual write as async-start /
  async-done: the write is priced as the in-place update it is, once, and
  the wait for it costs nothing."""
  r = hlo_roofline.Roofline(_ASYNC_FUSION_HLO, peak_tflops=100.0, matmul_efficiency=0.5,
                            attention_tflops=300.0, bandwidth=1e12, bandwidth_efficiency=0.5)
  assert [(k.name, k.kind, k.moved) for k in r.kernels] == [
      ("loop_dynamic_update_slice_fusion.16", "stacked residual write (dynamic-update-slice)",
       2 * 4 * 2048 * 512 * 2 + 4)]


def test_not_hlo_is_refused(tmp_path, capsys):
  junk = tmp_path / "junk.txt"
  junk.write_text("hello")
  assert hlo_roofline.main([str(junk)]) == 2
  assert f"error: {junk}: no ENTRY computation" in capsys.readouterr().err
