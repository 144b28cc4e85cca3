#!/usr/bin/env bash
# The demo command of the README: builds the environment on first use (tools/env.sh),
# generates the embedded dataset on first use, trains EAPM RetinaNet on it on the CPU
# and prints COCO-style AP on its val split. Extra arguments go to train_net.py
# (e.g. --config-file configs/quickstart/retinanet.yaml, or KEY VALUE overrides).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
cfg=configs/quickstart/eapm_retinanet.yaml
if [ "${1:-}" = "--config-file" ]; then cfg=$2; shift 2; fi
start=$(date +%s)
bash tools/env.sh python train_net.py --config-file "$cfg" "$@"
echo "[demo] finished in $(( $(date +%s) - start )) s; results: the 'copypaste' AP lines above, the log under OUTPUT_DIR"
