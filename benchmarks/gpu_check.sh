#!/usr/bin/env bash
# The GPU checks of the benchmarks issue, prepared as one short device call.
#
#   bash benchmarks/gpu_check.sh fetch   # here (PyPI reachable): the pure-Python wheels the GPU image
#                                        # lacks, into .whl/ (ignored by git, ~1.6 MB)
#   bash benchmarks/gpu_check.sh run     # there, with .whl carried: logs and JSON into $OUT
#
# `run` installs the wheels into /tmp/site (the image has torch, lightning, torchmetrics, pytest,
# hypothesis, scikit-learn), then, each step under its own time limit so that one slow step leaves the
# others their figures: every CUDA test (no host-device sync in forward, backward and metrics; CUDA equals
# CPU in fp32 and bf16; every config trained under bf16-mixed and 16-mixed), the loss table on the GPU,
# the fused LM losses in fp32 and bf16, and LossModule's overhead. The steps' limits add up to 8.5
# minutes: give the device call a timeout of ~590 s. On a machine without CUDA, `run` is a dry run (the
# CUDA tests skip, the benchmarks take tiny sizes). $PYTHON, default python3, runs every step.
set -uo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"

wheels=(
    jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.15.0
    gymnasium==1.4.0 Farama-Notifications==0.0.6 pytorch-metric-learning==2.9.0
)

case "${1:-}" in
fetch)
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "${wheels[@]}"
    ls .whl
    ;;
run)
    out="${OUT:-$(mktemp -d)}"
    export PYTHONUNBUFFERED=1
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || exit 1
        export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
    fi
    export PYTHONPATH="$PWD:${PYTHONPATH:-}"
    "$py" - <<'EOF' 2>&1 | tee "$out/env.txt"
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
    if "$py" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
        device=cuda quick=() fused=(--repeats 3 --pairs ce,distill,reverse,jsd) overhead=(--epochs 3 --repeats 3)
    else  # a dry run of the same steps
        device=cpu quick=(--quick) fused=(--n 256 --hidden 32 --vocab 512 --repeats 1 --in-process)
        overhead=(--epochs 2 --warmup-epochs 1 --repeats 1)
    fi
    failed=0
    step() {  # step NAME SECONDS COMMAND...: output to $out/NAME.txt, the exit status noted (124: timed out)
        local name=$1 seconds=$2 status
        shift 2
        echo "== $name: $*"
        timeout "$seconds" "$@" >"$out/$name.txt" 2>&1
        status=$?
        tail -n 5 "$out/$name.txt"
        echo "== $name: exit $status" | tee -a "$out/$name.txt"
        [ "$status" -eq 0 ] || failed=1
    }
    step tests 240 "$py" -m pytest -q -p no:cacheprovider -o addopts="-ra --strict-markers" tests \
        --ignore=tests/test_notebooks.py -k "cuda or CUDA"
    step losses 120 "$py" -m benchmarks --device "$device" "${quick[@]}" --repeats 10 --json "$out/losses.json"
    step fused 50 "$py" -m benchmarks.fused_linear --device "$device" "${fused[@]}" --json "$out/fused.json"
    step fused_bf16 30 "$py" -m benchmarks.fused_linear --device "$device" "${fused[@]}" --dtype bfloat16
    gpu=$([ "$device" = cuda ] && echo gpu || echo cpu)
    step overhead 50 "$py" -m benchmarks.module_overhead --device "$gpu" "${overhead[@]}"
    ls -l "$out"
    exit "$failed"
    ;;
*)
    echo "usage: bash benchmarks/gpu_check.sh fetch|run" >&2
    exit 2
    ;;
esac
