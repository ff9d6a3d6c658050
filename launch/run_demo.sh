#!/usr/bin/env bash
# The demo, start to finish on a CPU: synthetic data -> train configs/demo.yaml from scratch ->
# score CAM, refined, affinity CAM and affinity pseudo labels and the segmentation on the val split.
#   bash launch/run_demo.sh [key=value ...]      (make demo runs this inside .venv)
#   DEMO_CONFIG=configs/demo_full.yaml bash launch/run_demo.sh     (make demo-full)
# Results: work_dirs/<config name>/results.json (mIoU in [0, 1] and minutes), table on the terminal.
# The data set goes to the config's data.root, its images data.crop_size pixels square (after the
# key=value arguments). Other places and sizes (tests use them): DEMO_DATA (instead of data.root;
# refused together with a data.root= or data.list_dir= argument),
# DEMO_NUM_TRAIN (12000), DEMO_DATA_ARGS (more tools/make_demo_data.py flags, e.g. "--num-val 3"),
# DEMO_WORK_DIR (work_dirs/<config name>). A set is reused only when its meta.json says it is the
# one these flags make (tools/make_demo_data.py --check: the generator version, the size, the
# image counts and every flag in DEMO_DATA_ARGS, --seed included); otherwise it is made again.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${DEMO_CONFIG:-configs/demo.yaml}
WORK=${DEMO_WORK_DIR:-work_dirs/$(basename "$CONFIG" .yaml)}
start=$(date +%s)
# The config's data place and image size, after the key=value arguments (a wrong key stops here).
config_data=$(python - "$CONFIG" "$@" <<'PY'
import sys
from afa.config import load_config
cfg = load_config(sys.argv[1], [a for a in sys.argv[2:] if "=" in a and not a.startswith("-")])
print(cfg.data.crop_size, cfg.data.root)
PY
)
case " ${DEMO_DATA_ARGS:-} " in
    *" --size"*) echo "run_demo.sh: DEMO_DATA_ARGS must not set --size: the images are made" \
                      "data.crop_size pixels square (pass data.crop_size=N instead)" >&2; exit 2 ;;
esac
if [ -n "${DEMO_DATA:-}" ]; then
    for arg in "$@"; do
        case "$arg" in
            data.root=*|data.list_dir=*)
                echo "run_demo.sh: DEMO_DATA ($DEMO_DATA) and the argument $arg both name the" \
                     "data set: give one of them" >&2; exit 2 ;;
        esac
    done
fi
SIZE=${config_data%% *}
DATA=${DEMO_DATA:-${config_data#* }}
NUM_TRAIN=${DEMO_NUM_TRAIN:-12000}
# shellcheck disable=SC2086  # DEMO_DATA_ARGS holds several flags
make_data=(python tools/make_demo_data.py --out "$DATA" --num-train "$NUM_TRAIN" --size "$SIZE"
           ${DEMO_DATA_ARGS:-})
held=0
"${make_data[@]}" --check >/dev/null || held=$?
case $held in
    0) ;;                                           # the set these flags make: reuse it
    1) rm -rf "$DATA"; "${make_data[@]}" ;;
    *) echo "run_demo.sh: tools/make_demo_data.py rejected DEMO_DATA_ARGS (${DEMO_DATA_ARGS:-})" \
            >&2; exit "$held" ;;                    # a bad flag: exit before removing anything
esac
data=(data.root="$DATA" data.list_dir="$DATA")
before=$(ls "$WORK"/checkpoints/iter_*.pth 2>/dev/null | tail -n 1 || true)
python tools/train.py --config "$CONFIG" --work-dir "$WORK" --resume auto "${data[@]}" "$@"
ckpt=$(ls "$WORK"/checkpoints/iter_*.pth | tail -n 1)
# The trainer validates its last iteration on the val split (val_scores.json); score the final
# checkpoint with tools/evaluate.py only when that is missing or older (e.g. an earlier run's).
if ! python - "$WORK" "$ckpt" <<'PY'
import json, sys
from pathlib import Path
work, ckpt = Path(sys.argv[1]), Path(sys.argv[2])
val = work / "val_scores.json"
it = int(ckpt.stem.removeprefix("iter_"))  # checkpoints are named iter_NNNNNN.pth
ok = val.is_file() and json.loads(val.read_text())["iteration"] == it
if ok:
    (work / "eval.json").write_text(json.dumps(json.loads(val.read_text())["scores"], indent=2))
sys.exit(0 if ok else 1)
PY
then
    python tools/evaluate.py --config "$CONFIG" --checkpoint "$ckpt" --json "$WORK/eval.json" \
        "${data[@]}" "$@"
fi
python - "$WORK" "$start" "$before" "$ckpt" <<'PY'
import json, sys, time
from pathlib import Path
work, start = Path(sys.argv[1]), float(sys.argv[2])
trained = sys.argv[3] != sys.argv[4]  # did this invocation train (a new last checkpoint)?
scores = json.loads((work / "eval.json").read_text())
results = {k: round(scores[k]["miou"], 4) for k in ("cam", "refined", "aff_cam", "affinity", "seg")}
results["minutes"] = round((time.time() - start) / 60, 2)
previous = work / "results.json"
if not trained and previous.is_file():  # a finished run re-scored: keep its own duration
    results["minutes"] = json.loads(previous.read_text()).get("minutes", results["minutes"])
(work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
print("\nDemo results (val mIoU):")
for key in ("cam", "refined", "aff_cam", "affinity", "seg"):
    print(f"  {key:<9} {100 * results[key]:6.2f}")
print(f"  took {results['minutes']} minutes; written to {work / 'results.json'}")
PY
