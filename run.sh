#!/usr/bin/env bash
# Set up and train CheXNet on whatever this machine has:  bash run.sh [main.py arguments]
#
#  1. a virtual environment (.venv, or $VENV) from requirements.txt; inside an Intel Gaudi
#     container it sees the container's own torch and never reinstalls it;
#  2. the accelerators: Gaudi (hl-smi), else NVIDIA GPUs (nvidia-smi), else the CPU;
#  3. torchrun with one process per accelerator, on the full data set in data/ when it is
#     there, else a short demonstration on the bundled sample.
# Extra arguments go to main.py and win over the defaults here. Several nodes: set NNODES and
# RDZV_ENDPOINT=host:port (same on every node) and run this on each. MAX_RESTARTS=K restarts
# workers after a failure (resuming from the last checkpoint); 3 by default on the full data.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}

in_gaudi_container() { python3 -c "import habana_frameworks.torch" >/dev/null 2>&1; }

if [ ! -x "$VENV/bin/python" ]; then
    echo "run.sh: creating the virtual environment $VENV"
    if in_gaudi_container; then
        python3 -m venv --system-site-packages "$VENV"
    else
        python3 -m venv "$VENV"
    fi
fi
stamp="$VENV/.requirements-installed"
if ! cat requirements.txt requirements-edge.txt | cmp -s - "$stamp"; then
    echo "run.sh: installing requirements.txt into $VENV"
    if "$VENV/bin/python" -c "import habana_frameworks.torch" >/dev/null 2>&1; then
        # The Gaudi container's torch and torchvision are built for it: keep them.
        # (requirements.txt's `-r requirements-edge.txt` is relative to it: named here instead)
        grep -vE '^(torch|torchvision)([<>=! ]|$)|^-r ' requirements.txt > "$VENV/.requirements-gaudi"
        "$VENV/bin/pip" install -q -r requirements-edge.txt -r "$VENV/.requirements-gaudi"
    else
        "$VENV/bin/pip" install -q -r requirements.txt
    fi
    cat requirements.txt requirements-edge.txt > "$stamp"
fi

count() { "$@" 2>/dev/null | grep -c . || true; }
device=cpu; nproc=1
if command -v hl-smi >/dev/null && [ "$(count hl-smi -Q index -f csv,noheader)" -gt 0 ]; then
    device=hpu; nproc=$(count hl-smi -Q index -f csv,noheader)
elif command -v nvidia-smi >/dev/null && [ "$(count nvidia-smi -L)" -gt 0 ]; then
    device=cuda; nproc=$(count nvidia-smi -L)
fi

data_dir=${DATA_DIR:-data}
# ChestX-ray14 (images/ + label table), CheXpert (train.csv + valid.csv) or MIMIC-CXR-JPG
if { [ -d "$data_dir/images" ] && ls "$data_dir"/Data_Entry_2017*.csv* >/dev/null 2>&1; } ||
   { [ -f "$data_dir/train.csv" ] && [ -f "$data_dir/valid.csv" ]; } ||
   [ -f "$data_dir/mimic-cxr-2.0.0-chexpert.csv.gz" ]; then
    defaults=(--data-dir "$data_dir")
    restarts=${MAX_RESTARTS:-3}
    echo "run.sh: training on $data_dir with $nproc x $device"
elif [ -n "${DATA_DIR:-}" ] && [ -d "$data_dir" ]; then  # a folder that is no data set: no demo
    echo "error: DATA_DIR=$data_dir: not ChestX-ray14 (images/ + Data_Entry_2017*.csv), CheXpert" \
         "(train.csv + valid.csv) or MIMIC-CXR-JPG (mimic-cxr-2.0.0-chexpert.csv.gz)" >&2
    exit 1
else
    defaults=(--data-dir sample --train-size 256 --epochs 3 --workers 2 --out-dir runs/sample-demo)
    restarts=${MAX_RESTARTS:-0}
    echo "run.sh: no ChestX-ray14 in $data_dir/ (bash batch_download.sh fetches it, 42 GB);"
    echo "run.sh: running a short demonstration on the bundled 200-image sample with $nproc x $device"
fi

if [ -n "${NNODES:-}" ]; then
    launch=(--nnodes="$NNODES" --rdzv-backend=c10d --rdzv-endpoint="${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port}"
            --rdzv-id="${RDZV_ID:-chexnet}")
else
    launch=(--standalone)
fi
# pytorch/pytorch#135712: restarted workers can hang on a rendezvous store shared with torchrun.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
cmd=("$VENV/bin/python" -m torch.distributed.run "${launch[@]}" --nproc_per_node="$nproc"
     --max-restarts="$restarts" main.py --device "$device" "${defaults[@]}" "$@")
if [ "$nproc" = 1 ] && [ -z "${NNODES:-}" ] && [ "$restarts" = 0 ]; then
    # one process, nothing to restart: no launcher (torchrun's rendezvous for a single
    # process only printed keep-alive warnings on a busy machine)
    cmd=("$VENV/bin/python" main.py --device "$device" "${defaults[@]}" "$@")
fi
echo "run.sh: ${cmd[*]}"
# Data, weights, checkpoint and out-dir are checked once, in one process, before torchrun: a
# bad input is one line here, not a failure that torchrun would restart MAX_RESTARTS times.
# (It also downloads the ImageNet weights once, before the workers start.)
"$VENV/bin/python" main.py --check --device "$device" "${defaults[@]}" "$@" || exit $?
exec "${cmd[@]}"
