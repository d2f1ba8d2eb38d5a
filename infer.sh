#!/usr/bin/env bash
# Turn a trained checkpoint into OpenVINO models for CPU inference:
#   models/chexnet_fp32.xml   FP32 (ov.convert_model, dynamic batch, FP32 weights)
#   models/chexnet_int8.xml   INT8 (NNCF post-training quantization on 300 val images,
#                             compared with FP32 on 300 other val images)
#   models/chexnet.json       what was exported, and the SHA-256 of every model file
#
#   bash infer.sh [CHECKPOINT] [infer.py options]
#     CHECKPOINT defaults to the best checkpoint of the last training run (newest runs/*/best.pt)
#     --max-auc-drop 0.005   accuracy-controlled quantization (val mean AUC may drop this much)
#     --calibration-size N   val images to calibrate on (default 300)
#     --validation-size N    other val images to check INT8 against FP32 on (default 300)
#     --data-dir, --split    calibration data (default: those the checkpoint was trained on)
#     --model-dir DIR        where to write (default models/; infer.py looks there)
# Then: python infer.py --mode int8   (or fp32, torch)
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
if [ -x "$VENV/bin/python" ]; then python=$VENV/bin/python; else python=python3; fi

checkpoint=
if [ $# -gt 0 ] && [[ $1 != -* ]]; then checkpoint=$1; shift; fi
if [ -z "$checkpoint" ]; then
    checkpoint=$(ls -t runs/*/best.pt 2>/dev/null | head -n 1 || true)
    if [ -z "$checkpoint" ]; then
        echo "error: no checkpoint given and no runs/*/best.pt: train first (bash run.sh)" \
             "or pass a checkpoint: bash infer.sh path/to/best.pt" >&2
        exit 2
    fi
    echo "infer.sh: the best checkpoint of the last training run: $checkpoint"
fi
exec "$python" infer.py --export --checkpoint "$checkpoint" "$@"
