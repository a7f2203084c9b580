"""The trained (not averaged) weights of a checkpoint, as a model directory: the other side of the
weight-average ablation (docs/model.md, "The exported weights are a moving average").

    python benchmarks/trained_weights.py RUN_DIR/checkpoints/step-N -o DIR

A run exports the moving average of its weights (`--ema`); each checkpoint keeps the weights being
trained beside the optimizer state. This writes those into DIR with the checkpoint's tokenizer and
manifest (training section marked "weights": "trained"), so `benchmarks/learning_curve.py` or
`calofm demo --model DIR` can compare them with the average at the same compute.
"""

from __future__ import annotations

import argparse
import json
import os

from safetensors.torch import load_file

from calofm.checkpoint import MANIFEST_FILE, OPTIMIZER_FILE, atomic_write_text, load_model, save_model, trained_weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a run's checkpoints/step-N directory")
    ap.add_argument("-o", "--output", required=True, help="new model directory")
    args = ap.parse_args()
    if os.path.exists(args.output):
        raise SystemExit(f"{args.output} exists; give a new directory")
    model, tokenizer, manifest = load_model(args.checkpoint)
    tensors = load_file(os.path.join(args.checkpoint, OPTIMIZER_FILE))
    trained = trained_weights(tensors)
    if not trained:
        raise SystemExit(f"{args.checkpoint}: no trained weights beside the optimizer state (a run without "
                         "the weight average: its model.safetensors is already the trained weights)")
    model.load_state_dict(trained)
    out = save_model(args.output, model, tokenizer, dict(manifest.get("training", {}), weights="trained"))
    if "min_p" in manifest:  # the sampling cuts tuned for the run, if any
        out["min_p"] = manifest["min_p"]
        atomic_write_text(os.path.join(args.output, MANIFEST_FILE), json.dumps(out, indent=1))
    print(f"wrote {args.output}: trained weights of {args.checkpoint} (sha256 {out['weights']['sha256'][:12]})")


if __name__ == "__main__":
    main()
