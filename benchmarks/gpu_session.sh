#!/usr/bin/env bash
# One lease of a GPU (the workplace's device tool), as one command: the CUDA-graph check, the generated
# files for the AUC column, the speed benchmark, then torch.compile variants if time is left. Each step
# has its own time limit and writes under $OUT, so a failing step leaves the others' results. The AUCs
# are computed afterwards on CPU (calofm evaluate against the simulated reference).
#   OUT=runs/gpu bash benchmarks/gpu_session.sh            # on the GPU machine (at most 9.7 minutes)
#   DEV=cpu QUICK=1 OUT=/tmp/gs bash benchmarks/gpu_session.sh   # a dry run of the script on CPU
set -u
OUT=${OUT:-runs/gpu}
DEV=${DEV:-cuda}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
py=python3
log=$OUT/session.log
if [ -n "${QUICK:-}" ]; then  # dry run: tiny sizes
  N=16 CHECK=8 BATCHES=1,8 BASE_BATCHES=4 STEPS=4,2 REPEATS=1 ABL=8 T_BENCH=300
else
  N=1000 CHECK=256 BATCHES=1,100,1000,10000 BASE_BATCHES=100,1000,10000 STEPS=400,100,50,20 REPEATS=3 ABL=1000 T_BENCH=270
fi
{ date -u; nvidia-smi -L 2>&1; $py -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())"; } >>"$log" 2>&1

echo "== graph check" >>"$log"
timeout 60 $py benchmarks/graph_check.py --device "$DEV" --batch $CHECK --json "$OUT/graph_check.json" >>"$log" 2>&1
# a graph decoder that fails here would fail below too: stop, and keep the lease's time for a fixed rerun
if ! $py -c "import json, sys; d = json.load(open(sys.argv[1])); sys.exit('error' in d['bf16'] or 'error' in d['fp32'])" \
    "$OUT/graph_check.json" >>"$log" 2>&1; then
  echo "== graph check failed: stopping" >>"$log"; tail -c 11000 "$log"; exit 1
fi

for p in bf16 fp32; do  # the files of the AUC column: W photons, seed 1, one batch, like runs/speed/calofm_*_14.h5
  echo "== generate $p graph" >>"$log"
  timeout 40 $py -m calofm.cli.main generate --model calofm-small --device "$DEV" --material W --n $N --batch-size $N --seed 1 \
    --precision $p --graph --no-progress -o "$OUT/calofm_${p}_graph.h5" >>"$log" 2>&1
done

echo "== bench" >>"$log"
timeout $T_BENCH $py -m calofm.cli.main bench generate --device "$DEV" --material W --batches $BATCHES \
  --decode fp32,fp32+graph,bf16+graph,bf16+graph+nocompact --repeats $REPEATS --energies 10,50,100 \
  --energy-n 50 --sim-n 1000 --ablation --ablation-n $ABL --json "$OUT/bench_generate_gpu.json" >>"$log" 2>&1

echo "== baseline" >>"$log"  # its own step: one slow point must not cost the calofm rows their JSON
timeout 80 $py -m calofm.cli.main bench generate --device "$DEV" --material W --batches ${BATCHES##*,} \
  --decode bf16+graph --repeats 1 --energies 50 --energy-n 4 --sim-n 10 --baseline runs/diffusion-v20k \
  --baseline-batches $BASE_BATCHES --baseline-steps $STEPS --json "$OUT/bench_baseline_gpu.json" >>"$log" 2>&1

echo "== compile" >>"$log"
timeout 90 $py -m calofm.cli.main bench generate --device "$DEV" --material W --batches ${BATCHES#1,} \
  --decode bf16+graph+compile,bf16+compile --repeats $REPEATS --energies 50 --energy-n 8 --sim-n 100 \
  --json "$OUT/bench_compile_gpu.json" >>"$log" 2>&1
echo "== done $(date -u)" >>"$log"
tail -c 11000 "$log"
