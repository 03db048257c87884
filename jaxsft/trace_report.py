"""Where a profiled step's time goes: a text summary of a ``jax.profiler`` trace.

    python -m jaxsft.trace_report DIR [--top 25] [--json]

``DIR`` is what ``python -m jaxsft.bench --profile DIR`` wrote: the profiler's
``plugins/profile/<run>/*.trace.json.gz`` (the newest run is read) and
``step.hlo.txt``, the compiled step's optimized HLO (``compiled.as_text()``).
The trace says how long each XLA op ran; the HLO says what each op is (opcode,
fusion kind, custom-call target, result shape) and which line of which source
file it came from, so a row reads "fusion.123, 9.1 ms/step, matmul, losses.py:140
_chunk_nll, backward" instead of a bare op name. No TensorBoard needed, and the
summary is small enough to bring back from a borrowed GPU.

Which events count as op time:
  * GPU/TPU (a ``/device:...`` process): kernels tagged with the op that
    launched them (``args.hlo_op``), summed per op; without such tags, the
    events of the device's "XLA Ops" line; failing that, every event of the
    device processes.
  * CPU (``/host:CPU`` only): the events of XLA's executor threads, whose names
    are the HLO instruction names; runtime bookkeeping (``Thunk...``,
    ``ThreadpoolListener...``, ``end: ...``) is left out.
  Events nest (a ``while`` holds the ops of its body), so each counts its
  self time: its duration minus that of the events inside it on its thread.

Per-step figures divide by the number of ``train`` step annotations the bench
writes (``jax.profiler.StepTraceAnnotation``), or 1 where there are none.
``busy`` is op time per step; on a CPU it adds the executor threads' times, so
it may exceed the wall-clock step.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import json
import pathlib
import re
import statistics
import sys

HLO_FILE = "step.hlo.txt"
STEP_EVENT = "train"
MAX_OPS = 300  # rows kept in the summary, longest first
# Runtime bookkeeping on XLA:CPU's executor threads, not ops.
_CPU_NOT_OPS = ("Thunk", "ThreadpoolListener", "SlinkyThreadPool", "end: ")
CATEGORIES = ("matmul", "attention", "collective", "copy/transpose", "elementwise/reduce",
              "loop control", "other")
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
                "send", "recv")
_MATMUL_OPCODES = ("dot", "convolution", "ragged-dot")
_MATMUL_KERNELS = ("gemm", "nvjet", "cublas", "cutlass", "matmul", "xmma")
_ATTENTION_KERNELS = ("fmha", "flash", "sdpa", "attention", "cudnn")


@dataclasses.dataclass
class Op:
  """One HLO instruction of the compiled step, as far as the report needs it."""
  name: str
  opcode: str
  shape: str
  kind: str = ""           # a fusion's kind (kLoop, kInput, kOutput, kCustom)
  target: str = ""         # a custom-call's target
  op_name: str = ""        # metadata op_name: the JAX transformation path
  source: str = ""         # "file.py:line function" of the innermost jaxsft frame
  has_dot: bool = False    # a fusion whose computation contains a dot/convolution
  backend_kind: str = ""   # backend_config fusion kind, e.g. __triton_gemm, __ynn_fusion


# ----------------------------------------------------------------------------- HLO text

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")


def _split_type(rest: str) -> tuple[str, str]:
  """``"f32[2]{0} add(...)..."`` → (type, remainder); tuple types may hold spaces."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  head, _, tail = rest.partition(" ")
  return head, tail


def _frames(text: str) -> dict[int, tuple[str, int, str, int]]:
  """stack_frame_id → (file, line, function, parent frame id) from the module's
  FileNames / FunctionNames / FileLocations / StackFrames tables."""
  tables: dict[str, dict[int, str]] = {}
  section = None
  for line in text.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      section = tables.setdefault(line, {})
    elif line.startswith(("%", "ENTRY")):
      break  # the computations follow the tables
    elif section is not None and line.strip():
      key, _, value = line.strip().partition(" ")
      if key.isdigit():
        section[int(key)] = value.strip().strip('"')

  def field(value: str, name: str) -> int:
    m = re.search(rf"\b{name}=(\d+)", value)
    return int(m.group(1)) if m else 0

  files, functions = tables.get("FileNames", {}), tables.get("FunctionNames", {})
  locations = tables.get("FileLocations", {})
  frames = {}
  for fid, value in tables.get("StackFrames", {}).items():
    loc = locations.get(field(value, "file_location_id"), "")
    frames[fid] = (files.get(field(loc, "file_name_id"), "?"), field(loc, "line"),
                   functions.get(field(loc, "function_name_id"), "?"),
                   field(value, "parent_frame_id"))
  return frames


def _source(frames, frame_id: int) -> str:
  """The innermost frame in jaxsft's own code (else the innermost frame)."""
  first, seen = "", set()
  while frame_id in frames and frame_id not in seen:
    seen.add(frame_id)
    path, line, function, parent = frames[frame_id]
    here = f"{pathlib.Path(path).name}:{line} {function}"
    first = first or here
    if "jaxsft/" in path.replace("\\", "/"):
      return here
    frame_id = parent
  return first


def parse_hlo(text: str) -> dict[str, Op]:
  """Every instruction of an optimized HLO module text, by name (names are
  unique in a module). Fusions are marked ``has_dot`` when their fused
  computation multiplies matrices."""
  frames = _frames(text)
  ops: dict[str, Op] = {}
  computation_dots: dict[str, bool] = {}
  calls: dict[str, str] = {}
  current = None
  for line in text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      current = m.group(1)
      continue
    m = _INSTR.match(line)
    if not m or current is None:
      continue
    name, rest = m.groups()
    shape, rest = _split_type(rest)
    opcode = re.match(r"[\w\-]*", rest).group(0)
    if opcode in _MATMUL_OPCODES:
      computation_dots[current] = True
    meta = re.search(r'metadata=\{([^}]*)\}', rest)
    meta = meta.group(1) if meta else ""
    op_name = re.search(r'op_name="([^"]*)"', meta)
    frame = re.search(r"stack_frame_id=(\d+)", meta)
    source_file = re.search(r'source_file="([^"]*)"', meta)
    source_line = re.search(r"source_line=(\d+)", meta)
    if frame:
      source = _source(frames, int(frame.group(1)))
    elif source_file:
      source = f"{pathlib.Path(source_file.group(1)).name}:{source_line.group(1) if source_line else '?'}"
    else:
      source = ""
    kind = re.search(r"\bkind=(\w+)", rest)
    target = re.search(r'custom_call_target="([^"]*)"', rest)
    backend_kind = re.search(r'"kind":"([^"]*)"', rest)
    called = re.search(r"\bcalls=%?([\w.\-]+)", rest)
    if called:
      calls[name] = called.group(1)
    ops[name] = Op(name=name, opcode=opcode, shape=shape, kind=kind.group(1) if kind else "",
                   target=target.group(1) if target else "",
                   op_name=op_name.group(1) if op_name else "", source=source,
                   backend_kind=backend_kind.group(1) if backend_kind else "")
  for name, computation in calls.items():
    ops[name].has_dot = computation_dots.get(computation, False)
  return ops


def category(name: str, op: Op | None) -> str:
  """What kind of work an op (or, unmapped, a kernel name) is: one of CATEGORIES."""
  lname = name.lower()
  if op is None:
    if any(k in lname for k in _ATTENTION_KERNELS):
      return "attention"
    if any(k in lname for k in _MATMUL_KERNELS):
      return "matmul"
    if any(k in lname for k in ("nccl", *_COLLECTIVES)):
      return "collective"
    return "other"
  target = op.target.lower()
  if op.opcode == "custom-call" and any(k in target for k in _ATTENTION_KERNELS):
    return "attention"
  if (op.opcode in _MATMUL_OPCODES or op.has_dot
      or any(k in target for k in _MATMUL_KERNELS) or "gemm" in op.backend_kind):
    return "matmul"
  if any(op.opcode.startswith(c) for c in _COLLECTIVES):
    return "collective"
  if op.opcode in ("copy", "transpose", "copy-start", "copy-done") or (
      op.opcode == "fusion" and re.match(r"(copy|transpose)", op.name)):
    return "copy/transpose"
  if op.opcode in ("while", "conditional", "call"):
    return "loop control"
  if op.opcode in ("fusion", "reduce", "add", "multiply", "select", "exponential", "convert",
                   "broadcast", "dynamic-update-slice", "dynamic-slice", "gather", "scatter",
                   "reduce-window", "concatenate", "pad", "slice", "iota", "compare", "divide",
                   "subtract", "maximum", "rsqrt", "log", "tanh", "negate", "sort"):
    return "elementwise/reduce"
  return "other"


# ----------------------------------------------------------------------------- the trace

def find_trace(profile_dir: pathlib.Path) -> pathlib.Path:
  """The newest run's Chrome-format trace under ``profile_dir``."""
  # <host>.trace.json.gz, or perfetto_trace.json.gz (same events) where only that exists.
  traces = sorted(profile_dir.rglob("*trace.json.gz"),
                  key=lambda p: (p.parent.name, not p.name.startswith("perfetto")))
  if not traces:
    raise FileNotFoundError(
        f"no *.trace.json.gz under {profile_dir}: point at the directory given to "
        f"`python -m jaxsft.bench --profile DIR` (or to jax.profiler.start_trace)")
  return traces[-1]


def _self_times(events: list[dict]) -> list[tuple[dict, float]]:
  """(event, duration minus its children's) for complete events on one thread."""
  events = sorted(events, key=lambda e: (e["ts"], -e.get("dur", 0)))
  out: list[list] = []
  stack: list[tuple[float, int]] = []  # (end, index into out)
  for e in events:
    start, dur = e["ts"], e.get("dur", 0)
    while stack and stack[-1][0] <= start:
      stack.pop()
    if stack:
      out[stack[-1][1]][1] -= dur
    out.append([e, dur])
    stack.append((start + dur, len(out) - 1))
  return [(e, max(t, 0.0)) for e, t in out]


def op_times(trace: dict) -> tuple[dict[str, float], dict[str, int], str, list[float]]:
  """(self time in µs per op name, events per op, where the ops came from, step
  durations in µs) of a Chrome-format trace (module doc)."""
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  processes, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      processes[e["pid"]] = e.get("args", {}).get("name", "")
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e.get("tid"))] = e.get("args", {}).get("name", "")
  complete = [e for e in events if e.get("ph") == "X" and "ts" in e]
  steps = [e["dur"] for e in complete if e["name"] == STEP_EVENT and "dur" in e]
  devices = {pid for pid, name in processes.items() if name.startswith("/device:")}
  chosen: list[dict] = []
  key = lambda e: e["name"]  # noqa: E731
  if devices:
    on_device = [e for e in complete if e["pid"] in devices]
    tagged = [e for e in on_device if e.get("args", {}).get("hlo_op")]
    if tagged:
      chosen, source = tagged, "device kernels, by hlo_op"
      key = lambda e: e["args"]["hlo_op"]  # noqa: E731
    else:
      xla_ops = [e for e in on_device if threads.get((e["pid"], e.get("tid"))) == "XLA Ops"]
      chosen, source = (xla_ops, "device 'XLA Ops' line") if xla_ops else (on_device, "device events")
  else:
    # Bookkeeping is dropped before nesting, so time inside a loop that no op
    # accounts for stays the loop's own.
    chosen = [e for e in complete
              if threads.get((e["pid"], e.get("tid")), "").startswith("tf_XLA")
              and not e["name"].startswith(_CPU_NOT_OPS)]
    source = "CPU executor threads"
  by_thread = collections.defaultdict(list)
  for e in chosen:
    by_thread[(e["pid"], e.get("tid"))].append(e)
  times: dict[str, float] = collections.defaultdict(float)
  counts: dict[str, int] = collections.defaultdict(int)
  for thread_events in by_thread.values():
    for e, t in _self_times(thread_events):
      name = key(e)
      times[name] += t
      counts[name] += 1
  return dict(times), dict(counts), source, steps


# ----------------------------------------------------------------------------- the summary

def summarize(profile_dir, hlo_text: str | None = None) -> dict:
  """The report's figures (per step, milliseconds) for the trace under
  ``profile_dir``; ``hlo_text`` defaults to ``profile_dir/step.hlo.txt``."""
  profile_dir = pathlib.Path(profile_dir)
  path = find_trace(profile_dir)
  with gzip.open(path, "rt") as f:
    trace = json.load(f)
  if hlo_text is None and (profile_dir / HLO_FILE).is_file():
    hlo_text = (profile_dir / HLO_FILE).read_text()
  ops = parse_hlo(hlo_text) if hlo_text else {}
  times, counts, source, steps = op_times(trace)
  n = max(len(steps), 1)
  busy = sum(times.values())
  by_category = collections.Counter()
  by_source = collections.Counter()
  rows = []
  for name, t in times.items():
    op = ops.get(name) or ops.get(name.lstrip("%"))
    cat = category(name, op)
    by_category[cat] += t
    where = (op.source if op and op.source else "(unknown)")
    by_source[where] += t
    rows.append({
        "op": name, "ms_per_step": t / n / 1e3, "share": t / busy if busy else 0.0,
        "count_per_step": counts[name] / n, "category": cat,
        "hlo": "" if op is None else " ".join(
            x for x in (op.opcode, op.kind, op.target, op.backend_kind) if x),
        "shape": "" if op is None else op.shape,
        "source": where,
        "backward": bool(op and "transpose(" in op.op_name),
    })
  rows.sort(key=lambda r: -r["ms_per_step"])
  return {
      "trace": str(path), "hlo": bool(ops), "ops_from": source, "steps": len(steps),
      "step_ms": statistics.median(steps) / 1e3 if steps else None,
      "busy_ms_per_step": busy / n / 1e3,
      "categories": {c: by_category[c] / n / 1e3 for c in CATEGORIES if by_category[c]},
      "sources": {s: t / n / 1e3 for s, t in by_source.most_common()},
      "ops": rows[:MAX_OPS],
  }


def format_report(summary: dict, top: int = 25) -> str:
  """``summarize``'s figures as a few aligned text tables."""
  busy = summary["busy_ms_per_step"] or 1e-9
  out = [f"trace: {summary['trace']}",
         f"ops from: {summary['ops_from']}; HLO text: {'yes' if summary['hlo'] else 'no (bare op names)'}",
         f"steps traced: {summary['steps']}; median step: "
         + (f"{summary['step_ms']:.2f} ms" if summary["step_ms"] else "n/a")
         + f"; op time per step: {busy:.2f} ms"]
  out.append("\nby category (ms/step, share of op time):")
  for cat, ms in sorted(summary["categories"].items(), key=lambda kv: -kv[1]):
    out.append(f"  {cat:<20} {ms:10.2f}  {100 * ms / busy:5.1f}%")
  out.append("\nby source line (top 12):")
  for where, ms in list(summary["sources"].items())[:12]:
    out.append(f"  {where[:60]:<60} {ms:10.2f}  {100 * ms / busy:5.1f}%")
  out.append(f"\ntop {top} ops:")
  out.append(f"  {'ms/step':>9} {'share':>6} {'n':>5}  {'op':<28} {'category':<18} {'bwd':<3} "
             f"{'hlo':<24} {'shape':<28} source")
  for r in summary["ops"][:top]:
    out.append(f"  {r['ms_per_step']:9.3f} {100 * r['share']:5.1f}% {r['count_per_step']:5.0f}  "
               f"{r['op'][:28]:<28} {r['category']:<18} {'yes' if r['backward'] else '':<3} "
               f"{r['hlo'][:24]:<24} {r['shape'][:28]:<28} {r['source']}")
  return "\n".join(out)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m jaxsft.trace_report", description=__doc__.split("\n")[0])
  p.add_argument("profile_dir", help="the directory given to `python -m jaxsft.bench --profile`")
  p.add_argument("--hlo", help=f"the compiled step's HLO text (default: DIR/{HLO_FILE} if present)")
  p.add_argument("--top", type=int, default=25, help="how many ops to list (default 25)")
  p.add_argument("--json", action="store_true", help="print the summary as JSON instead")
  args = p.parse_args(argv)
  try:
    hlo = pathlib.Path(args.hlo).read_text() if args.hlo else None
    summary = summarize(args.profile_dir, hlo)
  except (FileNotFoundError, OSError, json.JSONDecodeError, EOFError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(summary) if args.json else format_report(summary, args.top))
  return 0


if __name__ == "__main__":
  sys.exit(main())
