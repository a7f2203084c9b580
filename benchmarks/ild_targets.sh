#!/usr/bin/env bash
# calofm-ild against its targets (the ILD issue's protocol): per class, N generated against N freshly
# simulated showers (default 2000), 10-100 GeV uniform, seeded as `calofm demo --model calofm-ild --n N
# --seed SEED` seeds them (class i: reference seed SEED+100+i, generation seed SEED+i), so the showers are
# neither training showers nor the demo references the min-p cuts were chosen on (seed 1). Each class is
# evaluated alone and its high-level AUC read with five classifier folds and five classifier seeds
# (benchmarks/classifier_spread.py). Every step is skipped when its output exists: rerun after a kill.
#
#   OUT=runs/ild-targets bash benchmarks/ild_targets.sh    # the six classes: ~32 min on a 2-core AVX512 EPYC, ~75 AVX2-only
#   OUT=runs/ild-targets CLASSES="3:W:e- 5:Pb:e-" ADAPTERS="Pb DIR" TAG=mine bash benchmarks/ild_targets.sh
#
# ADAPTERS: the adapters composed for every class, in order (names of shipped ones or directories; "":
# the base alone; the base's classes are bit-identical with any of them loaded). TAG names the generated
# samples, so that several adapter sets share one set of references; GENERATE: further `calofm generate`
# options (e.g. "--totals energy"); MODEL: another model directory (its adapters under MODEL/adapters).
# The summary goes to $OUT/targets_$TAG.json, the paper's W1 and KL table of the same showers
# (benchmarks/published_table.py) to $OUT/published_$TAG.json.
set -euo pipefail
export OUT=${OUT:-runs/ild-targets}
export N=${N:-2000}
export SEED=${SEED:-3000}
THREADS=${THREADS:-2}
export TAG=${TAG:-shipped}
ADAPTERS=${ADAPTERS-"Pb e-"}  # ADAPTERS="": the base alone
CLASSES=${CLASSES:-"0:W:gamma 1:Ta:gamma 2:Pb:gamma 3:W:e- 4:Ta:e- 5:Pb:e-"}
export GENERATE=${GENERATE:-}
MODEL=${MODEL:-src/calofm/weights/calofm-ild}
adapter_args=()
for a in $ADAPTERS; do
  [ -d "$a" ] || a=$MODEL/adapters/$a
  adapter_args+=(--adapter "$a")
done
mkdir -p "$OUT"
dirs=()
labelled=()  # CLASS=metrics.json, for benchmarks/published_table.py
for cfg in $CLASSES; do
  IFS=: read -r i m p <<< "$cfg"
  ref=$OUT/ref_${m}_${p}.h5
  run=$OUT/${TAG}_${m}_${p}
  dirs+=("$run")
  labelled+=("${m}_${p}=$run/eval/metrics.json")
  [ -f "$run/spread.json" ] && continue
  mkdir -p "$run"
  echo "$(date +%T) $m $p: simulate, generate, evaluate, five folds"
  [ -f "$ref" ] || calofm simulate --geometry ild --material "$m" --particle "$p" --energy 10:100 --n "$N" \
    --seed $((SEED + 100 + i)) -o "$ref" > "$run/sim.log"
  [ -f "$run/gen.h5" ] || calofm generate --model "$MODEL" ${adapter_args[@]+"${adapter_args[@]}"} --material "$m" --particle "$p" \
    --energy 10:100 --n "$N" --seed $((SEED + i)) --batch-size 500 --threads "$THREADS" --no-progress \
    $GENERATE -o "$run/gen.h5" > "$run/gen.log"
  [ -f "$run/eval/metrics.json" ] || calofm evaluate --reference "$ref" --generated "$run/gen.h5" --seed "$SEED" \
    --no-plots -o "$run/eval" > "$run/eval.log"
  python benchmarks/classifier_spread.py "$run/eval" --seeds 0-4 --folds 5 --threads "$THREADS" \
    --json "$run/spread.json" > "$run/spread.log"
done
export TARGETS_COMMAND="MODEL=$MODEL OUT=$OUT N=$N SEED=$SEED THREADS=$THREADS TAG=$TAG ADAPTERS='$ADAPTERS' CLASSES='$CLASSES' GENERATE='$GENERATE' bash benchmarks/ild_targets.sh"
python - "$OUT/targets_$TAG.json" "$ADAPTERS" "${dirs[@]}" <<'PY'
import json, os, sys
sys.path.insert(0, "benchmarks")
from provenance import provenance
out, adapters, runs = sys.argv[1], sys.argv[2].split(), sys.argv[3:]
r4 = lambda x: round(float(x), 4)
rows = []
for run in runs:
    spread = json.load(open(os.path.join(run, "spread.json")))["rows"][0]
    m = json.load(open(os.path.join(run, "eval", "metrics.json")))  # one class per report
    rows.append({"class": os.path.basename(run)[len(os.environ["TAG"]) + 1:], "n_reference": m["n_reference"],
                 "n_generated": m["n_generated"], "auc_high_5fold": spread["mean"], "auc_high_5fold_seeds": spread["auc"],
                 "auc_high_one_split": r4(m["classifier_auc_high"]), "auc_low_one_split": r4(m["classifier_auc_low"]),
                 "noise_floor_auc_high_low": [r4(m["noise_floor"]["classifier_auc_high"]),
                                              r4(m["noise_floor"]["classifier_auc_low"])],
                 "response_worst": m["response"]["worst"]})  # E_vis/E_inc, the worst 10 GeV bin
    print(f"{rows[-1]['class']:24s} high-level AUC, five folds {spread['mean']:.3f}; one split high "
          f"{m['classifier_auc_high']:.3f}, low {m['classifier_auc_low']:.3f}")
with open(out + ".tmp", "w") as fh:
    json.dump({**provenance(), "command": os.environ["TARGETS_COMMAND"], "n": int(os.environ["N"]),
               "seed": int(os.environ["SEED"]), "adapters": adapters, "generate": os.environ["GENERATE"],
               "rows": rows}, fh, indent=1)
os.replace(out + ".tmp", out)
print("wrote", out)
PY
python benchmarks/published_table.py "${labelled[@]}" --json "$OUT/published_$TAG.json" > "$OUT/published_$TAG.md"
echo "wrote $OUT/published_$TAG.json (tables: $OUT/published_$TAG.md)"
