#!/usr/bin/env bash
# The GPU table of docs/BENCHMARKS.md in one command, jaxsft against the
# PyTorch peer (tools/hf_peer.py) on the same device:
#
#   tools/gpu_bench.sh [OUT_DIR]               # the issue's table: ~7.5 min on an H200
#   tools/gpu_bench.sh --all [OUT_DIR]         # the table, then the A/B items (~20 min)
#   tools/gpu_bench.sh --cpu-smoke [OUT_DIR]   # every item on tiny shapes, on a CPU
#   tools/gpu_bench.sh --only A,B,... [OUT_DIR]  # just these items (table or A/B), in
#                                              # the script's order; combines with --cpu-smoke
#
# Run from the repository root (python = the environment with jax, torch,
# transformers, peft; PYTHON=... overrides; wheels in .whl/, from
# tools/gpu_wheels.sh, are installed first if datasets or ml_collections is
# missing). Items run in this order, each under its own `timeout`, and are
# skipped once the budget (BUDGET_S: 470 s for the table, 1500 with --all) is
# spent; a failed item is logged and the next one runs. Seconds are what each
# took on an H200 on 2026-11-29 (2 warmup + 6 timed steps). The table:
#   check        tools/gpu_check.py: cuDNN vs XLA attention (correctness, timings), and
#                whether an array donates after a host copy (checkpoint saves copy the state);
#                78 s
#   1b_full      llama3.2-1b, seq 2048, batch 8, full SFT, vs the eager peer; remat
#                none, so the 16 layers run unrolled (scan_unroll 0, auto); 77 s
#   1b_lora      llama3.2-1b LoRA vs PEFT; 137 s (40 s of it jaxsft's unrolled compile)
#   8b_lora      llama3-8b, LoRA r=16, batch 4, remat full, vs PEFT + checkpointing;
#                frozen base in bf16 on both sides (--frozen-dtype auto); 52 s
#   1b_packed    1b_full on packed SFT lengths vs the padded peer (non-pad tokens/s); 99 s
# With --all, then the A/B items (no peer unless named):
#   1b_full_unfused  1b_full with q/k/v and gate/up as separate matmuls
#                (--fused-projections off, the default before 2026-11-30): what the
#                fused projections gained (the roofline said 1.1%)
#   1b_full_chunk512  --loss-chunk 512 instead of 128: 4x fewer accumulations of the
#                128k x 2048 fp32 output-layer gradient, 4x bigger logits blocks
#                (+2.2 GiB); if faster, make it the GPU's default
#   8b_qlora     8b_lora with the frozen projections in 4 bits (--quantization nf4,
#                QLoRA) on both sides: the peer's base is bitsandbytes' Linear4bit
#                (its wheel carried in .whl/ by tools/gpu_wheels.sh); memory and speed
#   1b_full_rolled  1b_full with the layers in a rolled scan (--scan-unroll 1): measured
#                6.3% slower than unrolled on 2026-11-29 (the roofline said 8%), 0.7 GiB
#                less; 17 s
#   1b_lora_rolled  the same for 1b_lora: 6.8% slower, 18.8 GiB instead of 26.6; 25 s
#   1b_full_profile, 1b_lora_profile  two steps traced: where the time goes
#                (jaxsft.trace_report: by category, by source line, top ops) in the log
#                and NAME.summary.json; the loss's while loop runs 12 of its 16 chunks
#                (the rows' first quarter is prompt): look for gaps between its trips
#   1b_full_pa, 1b_lora_pa  --remat projections_attention (keep the projections' and
#                cuDNN attention's outputs, recompute the elementwise rest; rolled)
#   8b_lora_fp32base  8b_lora with the frozen base in fp32 on both sides, vs the peer
#   1b_compile   1b_full vs the torch.compile peer (--peer hf-compile; its compile
#                time lands in the warmup steps)
#   moe_check    tools/moe_dispatch_check.py: bucketed, dropless, grouped MoE equal dense
#   moe_lora     Mixtral-8x7B's shape cut to 4 layers, LoRA on attention and experts
#                (the Mixtral recipe's targets), batch 4, vs PEFT on transformers' Mixtral;
#                jaxsft's GPU MoE dispatch is bucketed (read moe_bucket_overflow)
#   moe_lora_grouped, moe_lora_dense  the grouped (~1.1x the routed FLOPs) and dense
#                (all experts) dispatches: should `auto` pick another on GPU?
# bf16 compute, fp32 master weights, 2 warmup + 10 timed steps, the median step.
# (The XLA-flag row of 2026-11-28, latency-hiding scheduler on / Triton GEMMs
# off, was slower than the defaults and is no longer run.)
#
# OUT_DIR gets env.txt (versions, nvidia-smi -L), target_config.pbtxt (the GPU's
# XLA target config, for jaxsft.aot), one .log per item, the
# profile items' NAME.summary.json, the 1B and 8B step items' NAME.memory.txt
# and NAME.roofline.txt (XLA's memory report of the step; the static roofline
# of its HLO) and results.jsonl (one JSON line per item: its name, exit code
# and the bench's JSON line): 14 files for the table, 45 with --all (44 on a CPU:
# no target config). Raw traces stay
# under $PROFILE_DIR (default /tmp/jaxsft_profiles). On a borrowed machine that
# returns few files, tar OUT_DIR into one.
set -u
SMOKE=0
ALL=0
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) SMOKE=1; ALL=1; shift ;;
    --all) ALL=1; shift ;;
    --only) ONLY=$2; ALL=1; shift 2 ;;
    *) break ;;
  esac
done
OUT=${1:-/tmp/gpu_bench}
PY=${PYTHON:-python}
if [ "$ALL" = 1 ]; then BUDGET=${BUDGET_S:-1500}; else BUDGET=${BUDGET_S:-470}; fi
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"
START=$(date +%s)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The GPU machine's image lacks datasets and ml-collections: wheels carried in
# .whl/ (tools/gpu_wheels.sh) are installed beside it when an import fails.
if ls .whl/*.whl > /dev/null 2>&1 && ! "$PY" -c "import datasets, ml_collections, bitsandbytes" 2>/dev/null; then
  SITE=${WHEEL_SITE:-/tmp/jaxsft_site}
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl && export PYTHONPATH="$PYTHONPATH:$SITE"
fi

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(hostname)"
  lscpu 2>/dev/null | grep -m1 'Model name' || true
  nvidia-smi -L 2>&1 || echo "nvidia-smi: not available"
  "$PY" - <<'EOF' 2>&1
import importlib, sys
print("python", sys.version.split()[0])
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "torch", "transformers", "peft",
             "ml_collections", "datasets"):
  try:
    m = importlib.import_module(name)
    print(name, getattr(m, "__version__", "?"))
  except Exception as e:  # noqa: BLE001
    print(name, "MISSING:", type(e).__name__, e)
try:
  import jax
  print("jax devices:", jax.devices())
except Exception as e:  # noqa: BLE001
  print("jax devices: error", e)
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
# This GPU's XLA target config: later compiles for it on a CPU host
# (bench/train --target FILE, jaxsft.aot) then use its exact description.
"$PY" -m jaxsft.aot --write-config "$OUT/target_config.pbtxt" >> "$OUT/env.txt" 2>&1 || true

# selected NAME: whether NAME runs (--only names it, or there is no --only);
# the items not named leave no line and no file.
selected() {
  [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]
}

# run NAME TIMEOUT_S CMD...: run one item, log it, append its JSON line.
run() {
  local name=$1 limit=$2; shift 2
  local now left
  selected "$name" || return 0
  now=$(date +%s); left=$((BUDGET - (now - START)))
  if [ "$left" -lt 30 ]; then
    echo "== $name: SKIPPED (budget of ${BUDGET}s spent)"
    echo "{\"item\": \"$name\", \"rc\": null, \"skipped\": \"budget spent\"}" >> "$RESULTS"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (timeout ${limit}s): $*"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  tail -n 3 "$OUT/$name.log" | cut -c1-400
  "$PY" - "$name" "$rc" "$dt" "$OUT/$name.log" >> "$RESULTS" <<'EOF'
import json, sys
name, rc, dt, log = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
row = {"item": name, "rc": rc, "wall_s": dt}
lines = [l for l in open(log, errors="replace").read().splitlines() if l.startswith("{")]
if lines:
  try:
    row.update(json.loads(lines[-1]))
  except ValueError:
    row["unparsed"] = lines[-1][:500]
if rc == 124:
  row["timed_out"] = True
print(json.dumps(row))
EOF
  echo "== $name: rc=$rc in ${dt}s"
}

if [ "$SMOKE" = 1 ]; then
  SHAPE="--shape tiny --layers 1 --seq-len 64 --dtype float32"
  BIG="--shape tiny --layers 1 --seq-len 64 --dtype float32"
  STEPS="--warmup 1 --steps 1"
  B8="--batch 2"; B4="--batch 2"
  MOE="--shape tiny-moe --layers 1 --seq-len 64 --dtype float32"
  # NF4 blocks are 64 inputs wide: tiny's FFN (688) is not whole blocks.
  QLORA="--shape llama3.2-1b --layers 1 --seq-len 64 --dtype float32"
  CHECK="--cpu-smoke"
else
  SHAPE="--shape llama3.2-1b --seq-len 2048"
  BIG="--shape llama3-8b --seq-len 2048 --remat full"
  STEPS="--warmup 2 --steps 10"
  B8="--batch 8"; B4="--batch 4"
  MOE="--shape mixtral-8x7b --layers 4 --seq-len 2048"
  QLORA="$BIG"
  CHECK=""
fi
BENCH="$PY -m jaxsft.bench"

PROF=${PROFILE_DIR:-/tmp/jaxsft_profiles}
# profile NAME TIMEOUT_S ARGS...: trace two steps of a bench row (no peer); the
# report (by category, by source line, top ops) lands in NAME.log, its JSON in
# OUT/NAME.summary.json; the raw trace stays under $PROF/NAME.
profile() {
  local name=$1 limit=$2; shift 2
  selected "$name" || return 0
  run "$name" "$limit" $BENCH "$@" --warmup 1 --steps 1 --profile "$PROF/$name" --profile-steps 2
  [ -f "$PROF/$name/summary.json" ] && cp "$PROF/$name/summary.json" "$OUT/$name.summary.json"
}

# dumped NAME TIMEOUT_S CMD...: run NAME with XLA dumping its train step, and
# keep (1) XLA's memory-usage report of that step (every buffer of the step's
# peak allocation by size, with the shapes sharing it) as OUT/NAME.memory.txt:
# where the step's memory goes, read beside the row's peak_mem_gib and the
# peer's; (2) tools/hlo_roofline.py's static estimate of the same program as
# OUT/NAME.roofline.txt, to set the model (calibrated on 2026-11-28's three
# steps only) against this row's measured step_s.
dumped() {
  local name=$1 dump=/tmp/xla_dump_$1 saved=${XLA_FLAGS-}
  shift
  selected "$name" || return 0
  rm -rf "$dump"
  export XLA_FLAGS="$saved --xla_dump_to=$dump --xla_dump_hlo_module_re=.*train_step.*"
  run "$name" "$@"
  export XLA_FLAGS="$saved"
  local report hlo
  report=$(ls "$dump"/*train_step*memory-usage-report.txt 2>/dev/null | head -n 1)
  if [ -n "$report" ]; then head -c 30000 "$report" > "$OUT/$name.memory.txt"; fi
  hlo=$(ls -S "$dump"/*train_step*after_optimizations.txt 2>/dev/null | head -n 1)
  if [ -n "$hlo" ]; then
    # The loss's loop runs the chunks with a trained position: 12 of 16 in
    # the bench's 2048-token rows, whose first quarter is the prompt.
    "$PY" tools/hlo_roofline.py "$hlo" --top 15 --unknown-trips 12 > "$OUT/$name.roofline.txt" 2>&1 || true
  fi
  rm -rf "$dump"
}

# The issue's table first: its four peer rows.
run check 120 "$PY" tools/gpu_check.py $CHECK
dumped 1b_full 150 $BENCH $SHAPE $B8 $STEPS --method full --peer hf
dumped 1b_lora 200 $BENCH $SHAPE $B8 $STEPS --method lora --peer hf
dumped 8b_lora 200 $BENCH $BIG $B4 $STEPS --method lora --peer hf
run 1b_packed 150 $BENCH $SHAPE $B8 $STEPS --method full --packed-lengths sft --peer hf
if [ "$ALL" = 1 ]; then
  dumped 1b_full_unfused 90 $BENCH $SHAPE $B8 $STEPS --method full --fused-projections off
  run 1b_full_chunk512 90 $BENCH $SHAPE $B8 $STEPS --method full --loss-chunk 512
  dumped 8b_qlora 240 $BENCH $QLORA $B4 $STEPS --method lora --quantization nf4 --peer hf
  dumped 1b_full_rolled 90 $BENCH $SHAPE $B8 $STEPS --method full --scan-unroll 1
  dumped 1b_lora_rolled 90 $BENCH $SHAPE $B8 $STEPS --method lora --scan-unroll 1
  profile 1b_full_profile 90 $SHAPE $B8 --method full
  profile 1b_lora_profile 120 $SHAPE $B8 --method lora
  dumped 1b_full_pa 90 $BENCH $SHAPE $B8 $STEPS --method full --remat projections_attention
  dumped 1b_lora_pa 90 $BENCH $SHAPE $B8 $STEPS --method lora --remat projections_attention
  dumped 8b_lora_fp32base 200 $BENCH $BIG $B4 $STEPS --method lora --frozen-dtype param --peer hf
  run 1b_compile 180 $BENCH $SHAPE $B8 $STEPS --method full --peer hf-compile
  run moe_check 120 "$PY" tools/moe_dispatch_check.py
  run moe_lora 150 $BENCH $MOE $B4 $STEPS --method lora --peer hf \
    --lora-targets q_proj,k_proj,v_proj,o_proj,expert_gate_up,expert_down
  run moe_lora_grouped 120 $BENCH $MOE $B4 $STEPS --method lora --moe-dispatch grouped \
    --lora-targets q_proj,k_proj,v_proj,o_proj,expert_gate_up,expert_down
  run moe_lora_dense 120 $BENCH $MOE $B4 $STEPS --method lora --moe-dispatch dense \
    --lora-targets q_proj,k_proj,v_proj,o_proj,expert_gate_up,expert_down
fi

echo "== total $(( $(date +%s) - START ))s; results in $RESULTS"
"$PY" - "$RESULTS" <<'EOF'
import json, sys
keys = ("tokens_per_s", "nonpad_tokens_per_s", "mfu", "step_s", "compile_s", "peak_mem_gib",
        "setup_peak_mem_gib",
        "memory_estimate_bytes", "moe_bucket_overflow",
        "peer_tokens_per_s", "peer_nonpad_tokens_per_s", "peer_peak_mem_gib", "ratio",
        "nonpad_ratio")
for line in open(sys.argv[1]):
  r = json.loads(line)
  if r.get("gpu_check"):
    print(f"{r['item']:10s} passed {r['passed']}/{len(r['cases'])} failed {r['failed']} "
          f"donated after a host copy {r.get('donated_after_host_copy')} "
          f"timing {r.get('timing')}")
    continue
  vals = " ".join(f"{k}={r[k]:.4g}" if isinstance(r.get(k), float) else f"{k}={r.get(k)}"
                  for k in keys if k in r)
  print(f"{r['item']:10s} rc={r.get('rc')} {r.get('skipped', '')} {vals}")
EOF
