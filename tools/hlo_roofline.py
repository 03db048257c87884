"""A static roofline of a compiled GPU step: where its time would go, read from HLO.

    XLA_FLAGS="--xla_dump_to=/tmp/d --xla_dump_hlo_module_re=.*train_step.*" \\
      python -m jaxsft.bench --shape llama3.2-1b --seq-len 2048 --batch 8 \\
        --compile-scaling 16 --target h200           # no GPU needed (jaxsft.aot)
    python tools/hlo_roofline.py /tmp/d/*train_step*gpu_after_optimizations.txt

Reads XLA's optimized HLO of one GPU program (the dump's
``*_after_optimizations.txt``, or ``compiled.as_text()``), walks it with
loop trip counts (the layer scan's ``while`` runs its body once per layer)
and gives every kernel a time on a roofline: matmuls (cuBLAS calls and
Triton GEMM fusions) at ``--matmul-efficiency`` of the dense peak or, if
slower, at the memory rate for their operands; cuDNN attention at its
measured rate (``--attention-tflops``, 300 on an H200); every other kernel at
``--bandwidth-efficiency`` of the memory bandwidth for the bytes it reads
and writes (a parameter read only through dynamic slices or gathers counts
what they pick;
an in-place dynamic-update-slice counts only its update; a conditional costs
its first branch: the MoE bucketed dispatch's first buckets, the common case;
a loop whose trip count XLA does not know, such as the loss's loop over
its trained chunks, runs ``--unknown-trips`` times). Both HLO printers are
read: up to XLA 0.10 a tuple's element is a get-tuple-element instruction;
from 0.11 (jax 0.11, the GPU machine's) it is the operand ``%name#i``, and
some fusions run as ``async-start`` (priced as the fusion it calls) and
``async-done`` (free).
Prints the totals by kind of kernel and the costliest kernels with their loop.

It is a model, not a measurement: no launch gaps, no overlap, one efficiency
for every GEMM shape. Calibrated on the H200 run of docs/BENCHMARKS.md with
the defaults (the code of that run): Llama-3.2-1B full SFT (batch 8, seq
2048) estimated 286.0 ms vs 276.7 measured, LoRA 239.9 vs 228.0; Llama-3-8B
LoRA with remat full (batch 4) 680.4 vs 664.5.
Use it to compare variants of one step (a remat policy, a loss chunk), not
as a throughput figure, which only a GPU gives (``python -m jaxsft.bench``).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import re
import sys
from typing import NamedTuple

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
          "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_SHAPE = re.compile(r"\b(\w+)\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%([\w.\-]+) \(")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$")
# An operand: an instruction's name, or (XLA 0.11's printer) one element of
# its tuple result, "%name#i", without a get-tuple-element instruction.
_NAME = re.compile(r"%([\w.\-]+(?:#\d+)*)")
# async-done (and -update) only wait for an async-start's computation, priced
# where it starts (XLA 0.11 runs some fusions, e.g. a layer loop's dynamic
# slices, as async-start/async-done pairs).
_SKIP = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "after-all",
         "partition-id", "replica-id", "opt-barrier", "async-done", "async-update"}


def shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
  """The array shapes in an HLO type (one array or a tuple of them)."""
  return [(dt, tuple(int(d) for d in dims.split(",") if d))
          for dt, dims in _SHAPE.findall(text) if dt in _BYTES]


def nbytes(text: str) -> int:
  return sum(math.prod(dims) * _BYTES[dt] for dt, dims in shapes(text))


def tuple_elements(text: str) -> list[str]:
  """The element types of a tuple type "(t0, t1, ...)" (nesting kept)."""
  inner = text.strip()
  if not inner.startswith("("):
    return [inner]
  inner = inner[1:inner.rindex(")")]
  out, depth, start = [], 0, 0
  for i, ch in enumerate(inner):
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      out.append(inner[start:i].strip())
      start = i + 1
  if inner[start:].strip():
    out.append(inner[start:].strip())
  return out


def operand_type(types: dict[str, str], name: str) -> str:
  """The type of operand ``name`` (an instruction, or "name#i" for element i
  of its tuple result) in a computation whose instructions have ``types``."""
  base, *indices = name.split("#")
  typ = types.get(base, "")
  for i in indices:
    elements = tuple_elements(typ) if typ else []
    typ = elements[int(i)] if int(i) < len(elements) else ""
  return typ


@dataclasses.dataclass
class Instruction:
  name: str
  type: str
  op: str
  operands: list[str]
  line: str


def parse_module(text: str) -> tuple[dict[str, list[Instruction]], str]:
  """({computation name: its instructions}, the entry computation's name)."""
  computations: dict[str, list[Instruction]] = {}
  current, entry = None, None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header and line.rstrip().endswith("{"):
      current = header.group(2)
      computations[current] = []
      entry = current if header.group(1) else entry
      continue
    if line.startswith("}"):
      current = None
      continue
    m = _INSTRUCTION.match(line) if current else None
    if m:
      name, typ, op, rest = m.groups()
      # Operands are the names inside the call's own parentheses.
      computations[current].append(Instruction(name, typ, op, _NAME.findall(rest.split("), ")[0]),
                                               line))
  if entry is None:
    raise ValueError("no ENTRY computation: not an HLO module's text")
  return computations, entry


def _contraction(line: str, lhs_type: str) -> int:
  m = (re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
       or re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', line))
  lhs = shapes(lhs_type)
  if not m or not lhs:
    return 0
  return math.prod(lhs[0][1][int(d.strip('" '))] for d in m.group(1).split(",") if d.strip('" '))


def _matmul_flops(inst: Instruction, types: dict[str, str]) -> float:
  out = shapes(inst.type)
  if not out or not inst.operands:
    return 0.0
  return 2.0 * math.prod(out[0][1]) * _contraction(inst.line,
                                                   operand_type(types, inst.operands[0]))


def _attention_flops(inst: Instruction, types: dict[str, str], target: str) -> float:
  q = shapes(operand_type(types, inst.operands[0])) if inst.operands else []
  if not q or len(q[0][1]) != 4:
    return 0.0
  b, n, t, h = q[0][1]  # cuDNN's layout: [B, N, T, H]
  if t < n:  # [B, T, N, H]
    b, t, n, h = q[0][1]
  forward = 2.0 * b * n * t * t * h  # QK^T and PV over the causal half
  return forward * (2.5 if "Backward" in target else 1.0)


class Kernel(NamedTuple):
  """One kernel's estimate, over all trips of the loops around it."""
  seconds: float
  kind: str
  name: str
  type: str
  times: int  # loop trips
  loops: str  # the enclosing while loops, outermost first
  flops: float
  moved: int  # bytes read and written


class Roofline:
  """Per-kernel time estimates of one module (module docstring)."""

  def __init__(self, text: str, peak_tflops: float, matmul_efficiency: float,
               attention_tflops: float, bandwidth: float, bandwidth_efficiency: float,
               unknown_trips: int = 1):
    self.computations, self.entry = parse_module(text)
    self.unknown_trips = unknown_trips
    self.unknown_loops: list[str] = []  # loops priced at ``unknown_trips``
    self.matmul_rate = peak_tflops * 1e12 * matmul_efficiency
    self.attention_rate = attention_tflops * 1e12
    self.memory_rate = bandwidth * bandwidth_efficiency
    self.kernels: list[Kernel] = []
    self._walk(self.entry, 1, [])

  def _fusion_bytes(self, called: str, out_type: str, operand_types: list[str]) -> int:
    body = self.computations.get(called, [])
    params = {i.name: int(re.search(r"parameter\((\d+)\)", i.line).group(1))
              for i in body if i.op == "parameter"}
    users = collections.defaultdict(list)
    for i in body:
      for k, o in enumerate(i.operands):
        users[o].append((i, k))
    in_place, updates = set(), 0
    types = {i.name: i.type for i in body}
    for i in body:
      if i.op == "dynamic-update-slice" and i.operands and i.operands[0] in params:
        in_place.add(i.operands[0])
        updates += nbytes(operand_type(types, i.operands[1]))
    def sliced(name: str) -> int | None:
      """Elements read from ``name`` if every use (through bitcasts and
      converts) only picks parts of it (a slice, a dynamic slice, a gather: a
      loss's target logits, a stacked weight's or residual's layer), else
      None: it is read whole."""
      uses, total = users.get(name, []), 0
      for u, k in uses:
        if u.op in ("bitcast", "convert"):
          part = sliced(u.name)
        elif u.op in ("dynamic-slice", "gather", "slice") and k == 0:
          part = sum(math.prod(dims) for _, dims in shapes(u.type))
        else:
          return None
        if part is None:
          return None
        total += part
      return total if uses else None

    read = 0
    for p, index in params.items():
      if p in in_place:
        continue
      part = sliced(p)
      if part is not None:
        read += part * _BYTES[shapes(types[p])[0][0]]
      elif index < len(operand_types):
        read += nbytes(operand_types[index])
    return read + (updates if in_place else nbytes(out_type))

  def _walk(self, computation: str, times: int, loops: list[str]) -> None:
    body = self.computations[computation]
    types = {i.name: i.type for i in body}
    for inst in body:
      if inst.op in _SKIP:
        continue
      if inst.op == "while":
        trips = re.search(r'known_trip_count":\{"n":"(\d+)"', inst.line)
        loop = re.search(r"body=%([\w.\-]+)", inst.line).group(1)
        if not trips:
          self.unknown_loops.append(inst.name)
        n = int(trips.group(1)) if trips else self.unknown_trips
        self._walk(loop, times * n, loops + [inst.name])
        continue
      if inst.op == "conditional":  # priced as its first branch (module doc)
        branches = re.search(r"branch_computations=\{%([\w.\-]+)", inst.line)
        if branches:
          self._walk(branches.group(1), times, loops + [inst.name])
        continue
      if inst.op in ("call", "async-start"):
        for called in re.findall(r"(?:to_apply|calls)=%([\w.\-]+)", inst.line):
          self._walk(called, times, loops + [inst.name])
        continue
      self._kernel(inst, types, times, loops)

  def _kernel(self, inst: Instruction, types: dict[str, str], times: int,
              loops: list[str]) -> None:
    operand_types = [operand_type(types, o) for o in inst.operands]
    moved = nbytes(inst.type) + sum(nbytes(t) for t in operand_types)
    flops, rate, kind = 0.0, None, inst.op
    if inst.op == "custom-call":
      target = re.search(r'custom_call_target="([^"]+)"', inst.line).group(1)
      if "fmha" in target:
        kind, flops, rate = "attention (cuDNN)", _attention_flops(inst, types, target), \
            self.attention_rate
      elif "gemm" in target or "matmul" in target:
        kind, flops, rate = "matmul", _matmul_flops(inst, types), self.matmul_rate
      else:
        kind = f"custom-call {target}"
    elif inst.op == "fusion":
      called = re.search(r"calls=%([\w.\-]+)", inst.line).group(1)
      fused = self.computations.get(called, [])
      moved = self._fusion_bytes(called, inst.type, operand_types)
      fused_types = {i.name: i.type for i in fused}
      dots = [i for i in fused if i.op == "dot"]
      ops = {i.op for i in fused}
      if dots:
        kind, rate = "matmul", self.matmul_rate
        flops = sum(_matmul_flops(d, fused_types) for d in dots)
      elif "dynamic-update-slice" in ops:
        kind = "stacked residual write (dynamic-update-slice)"
      elif "dynamic-slice" in ops and len(ops - {"parameter", "dynamic-slice", "bitcast",
                                                  "constant", "compare", "select", "add",
                                                  "subtract", "clamp"}) == 0:
        kind = "stacked read (dynamic-slice)"
      elif ops & {"reduce", "reduce-window"}:
        kind = "reduction"
      elif "broadcast" in ops and not inst.operands:
        kind = "fill (broadcast)"
      elif "scatter" in ops:
        kind = "scatter"
      else:
        kind = "elementwise"
    elif inst.op == "dot":  # unfused (CPU programs; rare on GPU)
      kind, flops, rate = "matmul", _matmul_flops(inst, types), self.matmul_rate
    elif inst.op == "dynamic-update-slice":
      moved = 2 * nbytes(operand_types[1]) if len(operand_types) > 1 else 0
      kind = "stacked residual write (dynamic-update-slice)"
    elif inst.op == "copy":
      kind = "copy"
    seconds = moved / self.memory_rate
    if flops and rate:
      seconds = max(seconds, flops / rate)
    self.kernels.append(Kernel(seconds * times, kind, inst.name, inst.type, times,
                               "/".join(loops), flops * times, moved * times))

  def report(self, top: int) -> str:
    by_kind: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0.0, 0])
    for k in self.kernels:
      row = by_kind[k.kind]
      row[0] += k.seconds
      row[1] += k.flops
      row[2] += k.moved
      row[3] += k.times
    total = sum(r[0] for r in by_kind.values())
    lines = [f"{'kind':46s} {'kernels':>8s} {'TFLOP':>8s} {'GB':>8s} {'est ms':>8s} {'share':>6s}"]
    for kind, (seconds, flops, moved, count) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
      lines.append(f"{kind:46s} {count:8d} {flops / 1e12:8.2f} {moved / 1e9:8.2f} "
                   f"{seconds * 1e3:8.2f} {seconds / total:6.1%}")
    lines.append(f"{'total':46s} {'':8s} {'':8s} {'':8s} {total * 1e3:8.2f}")
    if self.unknown_loops:
      lines.append(f"loops without a known trip count, priced at {self.unknown_trips} trips "
                   f"(--unknown-trips): {', '.join(self.unknown_loops)}")
    if top:
      lines.append(f"\nthe {top} costliest kernels (ms over all loop trips):")
      for k in sorted(self.kernels, reverse=True)[:top]:
        lines.append(f"{k.seconds * 1e3:8.2f}  x{k.times:<4d} {k.kind[:28]:28s} "
                     f"{k.name[:34]:34s} {k.type[:70]}  [{k.loops or 'entry'}]")
    return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python tools/hlo_roofline.py",
                              description=__doc__.split("\n")[0])
  p.add_argument("hlo", help="optimized HLO text of one GPU program")
  p.add_argument("--peak-tflops", type=float, default=989.4, help="dense bf16 peak (H100/H200)")
  p.add_argument("--matmul-efficiency", type=float, default=0.70)
  p.add_argument("--attention-tflops", type=float, default=300.0,
                 help="cuDNN fused attention, causal bf16 (measured on an H200)")
  p.add_argument("--bandwidth", type=float, default=4.8e12, help="bytes/s (H200; H100 3.35e12)")
  p.add_argument("--bandwidth-efficiency", type=float, default=0.80)
  p.add_argument("--unknown-trips", type=int, default=1,
                 help="trips of a loop whose count XLA does not know (the loss's loop over "
                      "the chunks that have trained positions: e.g. 12 of 16 for the "
                      "bench's rows, whose first quarter is the prompt)")
  p.add_argument("--top", type=int, default=25)
  args = p.parse_args(argv)
  try:
    text = open(args.hlo).read()
    roofline = Roofline(text, args.peak_tflops, args.matmul_efficiency, args.attention_tflops,
                        args.bandwidth, args.bandwidth_efficiency, args.unknown_trips)
  except (OSError, ValueError) as e:
    print(f"error: {args.hlo}: {e}", file=sys.stderr)
    return 2
  print(roofline.report(args.top))
  return 0


if __name__ == "__main__":
  sys.exit(main())
