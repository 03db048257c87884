"""jaxsft.trace_report: op self-times from a profiler trace, named through the step's HLO."""
import gzip
import json
import pathlib

import jax
import jax.numpy as jnp
import pytest

from jaxsft import trace_report

# An HLO module text in the form compiled.as_text() prints: the stack-frame
# tables, a fused computation holding a dot, and the entry computation.
HLO = """HloModule jit_step, is_scheduled=true

FileNames
1 "/src/jaxsft/models/llama.py"
2 "/site/optax/_src/update.py"

FunctionNames
1 "mlp"
2 "apply_updates"

FileLocations
1 {file_name_id=1 function_name_id=1 line=42 end_line=42 column=4 end_column=9}
2 {file_name_id=2 function_name_id=2 line=7 end_line=7 column=1 end_column=2}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=1}


%fused_computation (param_0: f32[4,8], param_1: f32[8,16]) -> f32[4,16] {
  %param_0 = f32[4,8]{1,0} parameter(0)
  %param_1 = f32[8,16]{1,0} parameter(1)
  ROOT %dot.0 = f32[4,16]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (p0: f32[4,8], p1: f32[8,16]) -> (f32[4,16], f32[8,16]) {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,16]{1,0} parameter(1)
  %gemm_fusion.3 = f32[4,16]{1,0} fusion(%p0, %p1), kind=kCustom, calls=%fused_computation, metadata={op_name="jit(step)/transpose(jvp(mlp))/dot_general" stack_frame_id=1}
  %while.1 = (s32[], f32[4,16]{1,0}) while(%t), condition=%cond, body=%body, metadata={op_name="jit(step)/while" stack_frame_id=1}
  %copy.4 = f32[8,16]{1,0} copy(%p1), metadata={op_name="jit(step)/copy" stack_frame_id=2}
  %custom-call.5 = (bf16[2,8,4,64]{3,2,1,0}, u8[0]{0}) custom-call(%p0), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(step)/attention" stack_frame_id=1}
  ROOT %add.6 = f32[4,16]{1,0} add(%gemm_fusion.3, %gemm_fusion.3), metadata={op_name="jit(step)/add" source_file="/src/jaxsft/losses.py" source_line=99}
}
"""


def _meta(pid, name, tid=None, kind="process_name"):
  e = {"ph": "M", "pid": pid, "name": kind, "args": {"name": name}}
  if tid is not None:
    e["tid"] = tid
  return e


def _x(pid, tid, name, ts, dur, **args):
  e = {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur}
  if args:
    e["args"] = args
  return e


def _write(tmp_path, events, hlo=HLO) -> pathlib.Path:
  run = tmp_path / "plugins" / "profile" / "2026_11_28_00_00_00"
  run.mkdir(parents=True)
  with gzip.open(run / "host.trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  if hlo is not None:
    (tmp_path / trace_report.HLO_FILE).write_text(hlo)
  return tmp_path


def test_cpu_trace_counts_self_time_and_names_ops_through_the_hlo(tmp_path):
  # Two steps. On executor thread 1 the runtime's Execute span holds a while
  # loop, which holds the gemm fusion; thread 2 runs a copy. Bookkeeping
  # events are not ops (their time inside the loop is the loop's). Self
  # times per step: while 50 - 20 = 30, gemm 20, add 7, copy 5.
  events = [_meta(1, "/host:CPU"), _meta(1, "python", 0, "thread_name"),
            _meta(1, "tf_XLAEigen/1", 1, "thread_name"), _meta(1, "tf_XLAEigen/2", 2, "thread_name")]
  for step, t0 in enumerate((0.0, 1000.0)):
    events += [
        _x(1, 0, "train", t0, 120.0, step_num=str(step)),
        _x(1, 1, "ThunkExecutor::Execute", t0, 100.0),
        _x(1, 1, "while.1", t0 + 10, 50.0),
        _x(1, 1, "gemm_fusion.3", t0 + 20, 20.0),
        _x(1, 1, "ThreadpoolListener::Record", t0 + 45, 0.0),
        _x(1, 1, "end: gemm_fusion.3", t0 + 46, 1.0),
        _x(1, 1, "add.6", t0 + 70, 7.0),
        _x(1, 2, "copy.4", t0 + 5, 5.0),
    ]
  s = trace_report.summarize(_write(tmp_path, events))
  assert s["steps"] == 2 and s["step_ms"] == pytest.approx(0.120)
  assert s["ops_from"] == "CPU executor threads" and s["hlo"]
  per_op = {r["op"]: r for r in s["ops"]}
  assert set(per_op) == {"while.1", "gemm_fusion.3", "add.6", "copy.4"}
  expected_us = {"while.1": 30.0, "gemm_fusion.3": 20.0, "add.6": 7.0, "copy.4": 5.0}
  for name, us in expected_us.items():
    assert per_op[name]["ms_per_step"] == pytest.approx(us / 1e3), name
    assert per_op[name]["count_per_step"] == 1
  assert s["busy_ms_per_step"] == pytest.approx(sum(expected_us.values()) / 1e3)
  assert [r["op"] for r in s["ops"]] == sorted(expected_us, key=lambda k: -expected_us[k])
  gemm = per_op["gemm_fusion.3"]
  assert gemm["category"] == "matmul" and gemm["backward"]
  assert gemm["source"] == "llama.py:42 mlp" and gemm["shape"] == "f32[4,16]{1,0}"
  assert per_op["copy.4"]["category"] == "copy/transpose"
  # Frame 2 (optax) has frame 1 (jaxsft) as its parent: the jaxsft frame names it.
  assert per_op["copy.4"]["source"] == "llama.py:42 mlp"
  assert per_op["while.1"]["category"] == "loop control"
  assert per_op["add.6"]["source"] == "losses.py:99"  # older metadata: source_file/line
  assert s["categories"] == pytest.approx(
      {"loop control": 0.030, "matmul": 0.020, "elementwise/reduce": 0.007,
       "copy/transpose": 0.005})
  report = trace_report.format_report(s)
  assert "gemm_fusion.3" in report and "llama.py:42 mlp" in report


def test_gpu_trace_sums_kernels_per_hlo_op_and_ignores_the_xla_ops_line(tmp_path):
  events = [_meta(1, "/device:GPU:0"), _meta(1, "Stream #7", 7, "thread_name"),
            _meta(1, "XLA Ops", 200, "thread_name"), _meta(2, "/host:CPU"),
            _meta(2, "python", 0, "thread_name"),
            _x(2, 0, "train", 0.0, 500.0, step_num="0"),
            # two kernels launched by one fusion, one by the cuDNN call
            _x(1, 7, "sm90_xmma_gemm_bf16", 10.0, 40.0, hlo_op="gemm_fusion.3", hlo_module="jit_step"),
            _x(1, 7, "sm90_xmma_gemm_bf16", 60.0, 30.0, hlo_op="gemm_fusion.3", hlo_module="jit_step"),
            _x(1, 7, "cudnn_generated_fort_native_sdpa", 100.0, 25.0, hlo_op="custom-call.5"),
            # the derived per-op line would double count
            _x(1, 200, "gemm_fusion.3", 10.0, 80.0)]
  s = trace_report.summarize(_write(tmp_path, events))
  assert s["ops_from"] == "device kernels, by hlo_op"
  per_op = {r["op"]: r for r in s["ops"]}
  assert per_op["gemm_fusion.3"]["ms_per_step"] == pytest.approx(0.070)
  assert per_op["gemm_fusion.3"]["count_per_step"] == 2
  assert per_op["custom-call.5"]["category"] == "attention"
  assert s["categories"] == pytest.approx({"matmul": 0.070, "attention": 0.025})


def test_without_hlo_kernel_names_still_get_a_category(tmp_path):
  events = [_meta(1, "/device:GPU:0"), _meta(1, "XLA Ops", 3, "thread_name"),
            _x(1, 3, "nvjet_tst_128x256", 0.0, 10.0), _x(1, 3, "ncclDevKernel_AllReduce", 20.0, 4.0),
            _x(1, 3, "loop_multiply_fusion", 30.0, 2.0)]
  s = trace_report.summarize(_write(tmp_path, events, hlo=None))
  assert not s["hlo"] and s["steps"] == 0
  assert s["ops_from"] == "device 'XLA Ops' line"
  assert s["categories"] == pytest.approx({"matmul": 0.010, "collective": 0.004, "other": 0.002})


def test_parse_hlo_reads_a_real_compiled_step():
  def loss(w, x):
    return jnp.sum(jnp.tanh(x @ w) ** 2)

  compiled = jax.jit(jax.grad(loss)).lower(jnp.ones((16, 32)), jnp.ones((8, 16))).compile()
  text = compiled.as_text()
  ops = trace_report.parse_hlo(text)
  # Every instruction line of the module is parsed, and the matmuls (forward
  # and the weight gradient) are found, as plain dots or inside fusions.
  n_instructions = sum(1 for line in text.splitlines()
                       if trace_report._INSTR.match(line) and not line.startswith(("HloModule", "ENTRY")))
  assert len(ops) == n_instructions
  matmuls = [op for op in ops.values() if trace_report.category(op.name, op) == "matmul"]
  assert len(matmuls) >= 2
  # The source is this test's line (no jaxsft frame on the stack here).
  assert any(op.source.startswith("test_trace_report.py:") for op in matmuls)


def test_cli_errors_name_the_directory(tmp_path, capsys):
  assert trace_report.main([str(tmp_path / "nothing")]) == 2
  assert "nothing" in capsys.readouterr().err
