#!/usr/bin/env bash
# The GPU checks as one command: the CUDA-graph check (eager vs the static step vs the compiled static
# step, and the kept run's second call), the speed benchmark, the diffusion baseline (eager and
# graph-captured), and the generated file for the AUC column (evaluated afterwards on CPU with
# `calofm evaluate` against the simulated reference). Each step has its own time limit and writes
# under $OUT, so a failing step leaves the others' results; the benchmark rewrites its JSON after
# every row, so a step stopped by its limit keeps what it timed.
#   OUT=runs/gpu bash benchmarks/gpu_session.sh                   # on the GPU machine (at most ~10 minutes)
#   DEV=cpu QUICK=1 OUT=/tmp/gs bash benchmarks/gpu_session.sh     # a dry run of the script on CPU
set -u
OUT=${OUT:-runs/gpu}
DEV=${DEV:-cuda}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
py=python3
log=$OUT/session.log
if [ -n "${QUICK:-}" ]; then  # dry run: tiny sizes
  N=16 CHECK=8 BATCHES=1,8 BASE_BATCHES=4 STEPS=4,2 REPEATS=1 T_CHECK=300 T_BENCH=600 T_BASE=120 T_GEN=200
else
  # on the H100 a fresh machine's first compilation took 30-120 s (later ones use inductor's on-disk
  # cache) and each new row count of the compiled step 10-20 s more; the baseline step ~60 s
  N=1000 CHECK=256 BATCHES=1,100,1000,10000 BASE_BATCHES=100,1000,10000 STEPS=400,100,50,20 REPEATS=3
  T_CHECK=240 T_BENCH=210 T_BASE=75 T_GEN=50
fi
{ date -u; nvidia-smi -L 2>&1; $py -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())"; } >>"$log" 2>&1

echo "== graph check $(date -u +%T)" >>"$log"
timeout $T_CHECK $py benchmarks/graph_check.py --device "$DEV" --batch $CHECK --json "$OUT/graph_check.json" >>"$log" 2>&1
# a static step that fails here would fail below too: stop, and keep the machine's time for a fixed rerun
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

echo "== done $(date -u)" >>"$log"
tail -c 11000 "$log"
