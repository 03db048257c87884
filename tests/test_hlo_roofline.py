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


def test_not_hlo_is_refused(tmp_path, capsys):
  junk = tmp_path / "junk.txt"
  junk.write_text("hello")
  assert hlo_roofline.main([str(junk)]) == 2
  assert f"error: {junk}: no ENTRY computation" in capsys.readouterr().err
