#!/usr/bin/env bash
# One lease of a GPU (the workplace's device tool), as one command: the CUDA-graph check (eager vs
# graph vs compiled graph, and the kept decoder's second call), the speed benchmark, the baseline
# (eager and graph-captured), the generated file for the AUC column, and (PROFILE=1) a profile of the step. Each
# step has its own time limit and writes under $OUT, so a failing step leaves the others' results. The
# AUCs are computed afterwards on CPU (calofm evaluate against the simulated reference).
#   OUT=runs/gpu bash benchmarks/gpu_session.sh            # on the GPU machine (at most 9.6 minutes)
# The benchmark rewrites its JSON after every row, so a step stopped by its limit keeps what it timed.
#   PROBE=1 OUT=runs/gpu bash benchmarks/gpu_session.sh    # only the recompilation and attention probes
#   DEV=cpu QUICK=1 OUT=/tmp/gs bash benchmarks/gpu_session.sh   # a dry run of the script on CPU
set -u
OUT=${OUT:-runs/gpu}
DEV=${DEV:-cuda}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
py=python3
log=$OUT/session.log
if [ -n "${QUICK:-}" ]; then  # dry run: tiny sizes
  N=16 CHECK=8 BATCHES=1,8 BASE_BATCHES=4 STEPS=4,2 REPEATS=1 PROF=8 T_CHECK=300 T_BENCH=600 T_BASE=120 T_GEN=200 T_PROF=200
  PROBE_DIAG=4,8 PROBE_AB=8 AB_MIN_ROWS=4 T_PROBE=300 T_PROBE_AB=300
else
  # the stop-16 lease: the first compilation took 117 s on the H100 machine, later ones (inductor's
  # on-disk cache) ~30 s; the baseline step 62 s. The profile runs only with PROFILE=1 (trim the others)
  N=1000 CHECK=256 BATCHES=1,100,1000,10000 BASE_BATCHES=100,1000,10000 STEPS=400,100,50,20 REPEATS=3 PROF=1000,10000
  T_CHECK=240 T_BENCH=210 T_BASE=75 T_GEN=50 T_PROF=60
  # PROBE=1 runs only the probes. Stop 17: a fresh machine's first compilation took 31-43 s, and each
  # new row count 10-20 s more (batches 4 then 100: ~85 s). The A/B decodes batch 10 000 with buckets of
  # at least 1024 rows (5 row counts, ~2 min). So the four probe calls take ~9 minutes
  PROBE_DIAG=4,100 PROBE_AB=10000 AB_MIN_ROWS=1024 T_PROBE=115 T_PROBE_AB=170
fi
{ date -u; nvidia-smi -L 2>&1; $py -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())"; } >>"$log" 2>&1

if [ -z "${PROBE:-}" ] || [ -n "${QUICK:-}" ]; then  # the probes run alone (PROBE=1)
echo "== graph check $(date -u +%T)" >>"$log"
timeout $T_CHECK $py benchmarks/graph_check.py --device "$DEV" --batch $CHECK --json "$OUT/graph_check.json" >>"$log" 2>&1
# a graph decoder that fails here would fail below too: stop, and keep the lease's time for a fixed rerun
if ! $py -c "import json, sys; d = json.load(open(sys.argv[1])); sys.exit(any('graph' not in d[p] for p in ('bf16', 'fp32')))" \
    "$OUT/graph_check.json" >>"$log" 2>&1; then
  echo "== graph check failed: stopping" >>"$log"; tail -c 11000 "$log"; exit 1
fi

echo "== bench $(date -u +%T)" >>"$log"
timeout $T_BENCH $py -m calofm.cli.main bench generate --device "$DEV" --material W --batches $BATCHES \
  --decode bf16+graph+compile,bf16+graph,fp32+graph --repeats $REPEATS --energies 10,50,100 \
  --energy-n 50 --sim-n 1000 --json "$OUT/bench_generate_gpu.json" >>"$log" 2>&1

echo "== baseline $(date -u +%T)" >>"$log"  # its own step: one slow point must not cost the calofm rows their JSON
timeout $T_BASE $py -m calofm.cli.main bench generate --device "$DEV" --material W --batches ${BATCHES##*,} \
  --decode bf16+graph --repeats 1 --energies 50 --energy-n 4 --sim-n 10 --baseline runs/diffusion-v20k \
  --baseline-batches $BASE_BATCHES --baseline-steps $STEPS --baseline-graph --json "$OUT/bench_baseline_gpu.json" >>"$log" 2>&1

echo "== generate $(date -u +%T)" >>"$log"  # the AUC column's file: W photons, seed 1, one batch
timeout $T_GEN $py -m calofm.cli.main generate --model calofm-small --device "$DEV" --material W --n $N --batch-size $N \
  --seed 1 --precision bf16 --graph --compile --no-progress -o "$OUT/calofm_bf16_graph_compile.h5" >>"$log" 2>&1
fi

# PROBE=1: why the compiled step recompiles per row count on the H100 (stop 17): each inductor setting
# of PROBE_SETTINGS in its own process, over the batches PROBE_DIAG (4 then 100: three recompilations
# at stop 17). Then the attention A/B: SDPA against the explicit attention, each in its own process
# over the batches PROBE_AB
if [ -n "${PROBE:-}${QUICK:-}" ]; then
  for setting in ${PROBE_SETTINGS:-shape_padding=False split_reductions=False}; do
    echo "== probe $setting $(date -u +%T)" >>"$log"
    TORCH_LOGS=recompiles timeout $T_PROBE $py benchmarks/recompile_probe.py --device "$DEV" --batches $PROBE_DIAG \
      --inductor "$setting" --json "$OUT/probe_${setting//[^A-Za-z0-9_]/_}.json" >>"$log" 2>&1
  done
  for attention in sdpa explicit; do
    echo "== probe attention $attention $(date -u +%T)" >>"$log"
    timeout $T_PROBE_AB $py benchmarks/recompile_probe.py --device "$DEV" --batches $PROBE_AB --min-rows $AB_MIN_ROWS \
      --attention $attention --json "$OUT/probe_attention_$attention.json" >>"$log" 2>&1
  done
fi

[ -n "${PROFILE:-}${QUICK:-}" ] && echo "== profile $(date -u +%T)" >>"$log" && timeout $T_PROF $py benchmarks/profile_step.py --device "$DEV" --batches $PROF --compile --json "$OUT/profile_step.json" \
  >"$OUT/profile_step.txt" 2>&1
echo "== done $(date -u)" >>"$log"
tail -c 11000 "$log"
