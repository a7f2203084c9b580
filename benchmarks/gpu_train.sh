#!/usr/bin/env bash
# A time-budgeted training run on streamed simulation, then a short evaluation, as one command.
#
# Trains `calofm train --simulate W,Ta,Cu --particle gamma --energy 10:100 --geometry cpu` for BUDGET_MIN
# minutes of wall time (data preparation and compilation included; the schedule's length is fitted to
# the budget after the warm-up unless STEPS is given), with the simulation in WORKERS background
# processes, bf16 (--precision auto) and, on a GPU, torch.compile. Then simulates N_EVAL fresh reference
# showers per material (seed 424242, not a training stream), generates as many with the model, and
# runs `calofm evaluate` (no plots). Under $OUT: model.safetensors, manifest.json, log.jsonl (the
# training events, with the stream's production rate beside the trainer's token rate), train.log,
# metrics.json, eval.log: 6 files, the model about 15 MB.
#
#   OUT=runs/gpu_train bash benchmarks/gpu_train.sh     # GPU machine: 6 min training + ~2.5 min evaluation
#   DEV=cpu BUDGET_MIN=240 STEPS=20000 RUN=runs/cpu_train OUT=runs/cpu_train/out bash benchmarks/gpu_train.sh
#        # CPU: trains 4 hours; the same command again resumes RUN for another BUDGET_MIN minutes
#   DEV=cpu BUDGET_MIN=1 QUICK=1 OUT=/tmp/gt bash benchmarks/gpu_train.sh   # dry run of the script on CPU
#
# ORDER (default layer) is the hit order (`--order`); TOTALS (default off) the evaluation's
# `--totals` mode. ORDER=layer TOTALS=energy is the combination the fidelity ablation ranks first
# (docs/model.md, "Hit order").
#
# RUN (the run directory, with its checkpoints) lives outside $OUT: its optimizer state is larger than
# what comes back from the GPU machine, which keeps nothing anyway; on CPU it persists and resumes.
set -u
OUT=${OUT:-runs/gpu_train}
DEV=${DEV:-cuda}
RUN=${RUN:-/tmp/calofm_gpu_train}
BUDGET_MIN=${BUDGET_MIN:-6}
PRESET=${PRESET:-small}
ORDER=${ORDER:-layer}
TOTALS=${TOTALS:-off}
CORES=$(${PY:-python3} -c "import os; print(len(os.sched_getaffinity(0)))")
if [ "$DEV" = cuda ]; then
  WORKERS=${WORKERS:-$(( CORES > 3 ? CORES - 2 : 1 ))}  # 14 on the 16-core GPU machine; the trainer keeps a core
  BATCH=${BATCH:-256} COMPILE=${COMPILE:-1} N_EVAL=${N_EVAL:-300} EVAL_EVERY=${EVAL_EVERY:-500}
else
  WORKERS=${WORKERS:-1} BATCH=${BATCH:-32} COMPILE=${COMPILE:-0} N_EVAL=${N_EVAL:-300} EVAL_EVERY=${EVAL_EVERY:-500}
fi
MAX_VAL=${MAX_VAL:-1000}
if [ -n "${QUICK:-}" ]; then  # dry run: tiny model and samples, every step of the script still runs
  PRESET=tiny BATCH=8 N_EVAL=60 EVAL_EVERY=20 MAX_VAL=20
fi
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
py=${PY:-python3}
calofm="$py -m calofm.cli.main"
log=$OUT/train.log
start=$(date +%s)
{ date -u; nvidia-smi -L 2>&1 | head -2; $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  echo "cores $CORES, workers $WORKERS, batch $BATCH, budget $BUDGET_MIN min, preset $PRESET, order $ORDER, totals $TOTALS, compile $COMPILE, run $RUN"; } >>"$log" 2>&1

train() {  # $1: budget in minutes, $2: --compile or nothing
  if [ -e "$RUN/checkpoints/latest" ]; then
    cmd=(train --resume -o "$RUN" --max-minutes "$1" --workers "$WORKERS" --no-progress $2)
  else
    cmd=(train --simulate W,Ta,Cu --particle gamma --energy 10:100 --geometry cpu --preset "$PRESET" -o "$RUN" --order "$ORDER"
      --device "$DEV" --precision auto --max-minutes "$1" ${STEPS:+--steps $STEPS} --batch-size "$BATCH"
      --workers "$WORKERS" --max-val "$MAX_VAL" --eval-every "$EVAL_EVERY" --ckpt-every "$EVAL_EVERY"
      --log-every 20 ${THREADS:+--threads $THREADS} --no-progress $2)
  fi
  echo "calofm ${cmd[*]}" >>"$log"
  # the guard: the budget plus the final evaluation and checkpoint
  timeout "$($py -c "print(int(float('$1') * 60 + 150))")" $calofm "${cmd[@]}" >>"$log" 2>&1
}
echo "== train $(date -u +%T)" >>"$log"
flag=""; [ "$COMPILE" = 1 ] && flag=--compile
train "$BUDGET_MIN" "$flag"
rc=$?
if [ $rc -ne 0 ] && [ -n "$flag" ] && [ ! -e "$RUN/model.safetensors" ]; then
  # compilation failed before the first checkpoint: spend what is left of the budget training eagerly
  left=$($py -c "print(round(max(0.5, float('$BUDGET_MIN') - ($(date +%s) - $start) / 60), 2))")
  echo "== train failed (rc $rc) with --compile; eager for $left min $(date -u +%T)" >>"$log"
  rm -rf "$RUN"
  train "$left" ""
  rc=$?
fi
echo "== train rc $rc $(date -u +%T)" >>"$log"
for f in model.safetensors manifest.json log.jsonl; do [ -e "$RUN/$f" ] && cp "$RUN/$f" "$OUT/"; done

if [ -e "$RUN/model.safetensors" ]; then
  elog=$OUT/eval.log
  ev=$RUN/eval
  mkdir -p "$ev"
  prec=fp32; [ "$DEV" = cuda ] && prec=bf16
  for m in W Ta Cu; do
    echo "== $m $(date -u +%T)" >>"$elog"
    timeout 120 $calofm simulate --material $m --particle gamma --energy 10:100 --geometry cpu --n "$N_EVAL" \
      --seed 424242 --workers "$WORKERS" -o "$ev/sim_$m.h5" >>"$elog" 2>&1
    timeout 150 $calofm generate --model "$RUN" --material $m --particle gamma --energy 10:100 --n "$N_EVAL" \
      --seed 7 --device "$DEV" --precision $prec --totals "$TOTALS" --no-progress -o "$ev/gen_$m.h5" >>"$elog" 2>&1
  done
  echo "== evaluate $(date -u +%T)" >>"$elog"
  timeout 240 $calofm evaluate --reference "$ev"/sim_W.h5 "$ev"/sim_Ta.h5 "$ev"/sim_Cu.h5 \
    --generated "$ev"/gen_W.h5 "$ev"/gen_Ta.h5 "$ev"/gen_Cu.h5 -o "$ev/report" --no-plots --bootstrap 10 \
    --threads "$(( CORES > 4 ? 4 : 1 ))" --quiet >>"$elog" 2>&1
  [ -e "$ev/report/metrics.json" ] && cp "$ev/report/metrics.json" "$OUT/"
fi
echo "== done in $(( $(date +%s) - start )) s $(date -u +%T)" >>"$log"
tail -n 25 "$log"; [ -e "$OUT/eval.log" ] && tail -n 12 "$OUT/eval.log"
$py - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
try:
    events = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
except OSError:
    sys.exit(print("no training log"))
tr = [e for e in events if e["event"] == "train"][1:]  # the first interval holds the compilation
if tr:
    mean = lambda k: sum(e.get(k, 0) for e in tr) / len(tr)  # noqa: E731
    print(f"steps {tr[-1]['step']}, loss {tr[-1]['loss']:.3f}; trainer {mean('tokens_per_s'):.0f} tokens/s, "
          f"simulation {mean('sim_tokens_per_s'):.0f} tokens/s ({mean('sim_showers_per_s'):.0f} showers/s) "
          f"with {tr[-1].get('stream_workers')} workers, data wait {sum(e.get('data_wait_s', 0) for e in tr):.1f} s")
val = [e for e in events if e["event"] == "val"]
if val:
    print(f"val nll/token at step {val[-1]['step']}: " + ", ".join(f"{m} {r['nll']:.4f}" for m, r in val[-1]["val"].items()))
EOF
exit 0
