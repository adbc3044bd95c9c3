#!/usr/bin/env bash
# What a lent GPU, or a user with one, runs first: about 10 minutes on one GPU.
#
#     bash bench/gpu.sh [REPORT.md]          (default ./gpu-report.md; PYTHON=... to pick the interpreter)
#
# 1. `finetune selftest` on the GPU (with --nproc N when N GPUs are visible: a torchrun training too);
# 2. bench/benchmark.py (finetune against a classic loop) on a generated dataset;
# 3. bench/feeder.py (each input pipeline with a no-op model) on ImageNet-size and phone-size photos.
# A step that fails or runs out of time is recorded and the next one runs. The report holds
# nvidia-smi, the versions, each step's exit status (124: out of time) and seconds, and the end of its
# output. Exit status: 0 when every step that ran passed, else 1.
set -u

report_arg="${1:-gpu-report.md}"
case "$report_arg" in
    /*) report="$report_arg" ;;
    *) report="$PWD/$report_arg" ;;
esac
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo" || exit 2
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then PYTHON="$repo/.venv/bin/python"; else PYTHON="python3"; fi
fi
work="$(mktemp -d "${TMPDIR:-/tmp}/finetune-gpu-XXXXXX")"
trap 'rm -rf -- "$work"' EXIT
export PYTHONUNBUFFERED=1

step_names=()
step_codes=()
step_seconds=()
step_logs=()

# run_step NAME SECONDS COMMAND...: the command's output in its own log, its status and time recorded
run_step() {
    local name="$1" limit="$2"
    shift 2
    local log="$work/step-${#step_names[@]}.log"
    local started="$SECONDS"
    echo "== $name (at most ${limit} s)"
    if command -v timeout >/dev/null 2>&1; then
        timeout --kill-after=20 "$limit" "$@" >"$log" 2>&1
    else
        "$@" >"$log" 2>&1
    fi
    local code="$?"
    tail -n 5 "$log"
    echo "== $name: exit $code after $((SECONDS - started)) s"
    step_names+=("$name")
    step_codes+=("$code")
    step_seconds+=("$((SECONDS - started))")
    step_logs+=("$log")
}

gpus="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null)"
case "$gpus" in
    '' | *[!0-9]*) gpus=0 ;;
esac

# 1. the selftest
selftest=("$PYTHON" -m finetune selftest --device auto)
if [ "$gpus" -gt 1 ]; then
    selftest+=(--nproc "$gpus")
fi
run_step "selftest ($gpus GPU(s) visible)" 270 "${selftest[@]}"

# 2. the benchmark, on a generated dataset (3 classes of 200 images)
data="$work/sample"
if "$PYTHON" -m finetune sample-data "$data" --per-class 200 >"$work/sample.log" 2>&1; then
    run_step "benchmark (resnet50, head/last/all, 3 epochs)" 210 \
        "$PYTHON" bench/benchmark.py --data "$data" --archs resnet50 --strategies head,last,all --epochs 3 \
        --weights none --skip-predict
else
    step_names+=("benchmark: generating its dataset")
    step_codes+=("1")
    step_seconds+=("0")
    step_logs+=("$work/sample.log")
fi

# 3. the feeder bench, on photos it generates (or on the sample data if it cannot generate)
if [ ! -f bench/feeder.py ]; then
    echo "== feeder: bench/feeder.py is not here (yet): skipped"
    step_names+=("feeder: bench/feeder.py missing, skipped")
    step_codes+=("-")
    step_seconds+=("0")
    step_logs+=("")
elif "$PYTHON" bench/feeder.py --help 2>/dev/null | grep -q -- '--generate'; then
    for kind in imagenet phone; do
        count=512 batches=20
        [ "$kind" = phone ] && count=128 batches=10
        run_step "feeder ($count $kind photos)" 60 \
            "$PYTHON" bench/feeder.py --generate "$kind" --count "$count" --data "$work/feeder-$kind" \
            --batches "$batches" --json "$work/feeder-$kind.json"
    done
else
    run_step "feeder (sample data)" 120 \
        "$PYTHON" bench/feeder.py --data "$data" --batches 20 --json "$work/feeder-sample.json"
fi

# The report
{
    echo "# finetune on this GPU machine"
    echo
    changed="$(git status --porcelain --untracked-files=no 2>/dev/null | wc -l | tr -d ' ')"
    echo "$(date -u '+%Y-%m-%d %H:%M UTC') on $(hostname), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')" \
        "(${changed:-?} tracked files changed since)"
    echo
    echo "## Steps"
    echo
    echo "| step | exit status | seconds |"
    echo "|---|---|---|"
    for i in "${!step_names[@]}"; do
        echo "| ${step_names[$i]} | ${step_codes[$i]} | ${step_seconds[$i]} |"
    done
    echo
    echo "## Machine"
    echo
    echo '```'
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi 2>&1
        nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv 2>&1
    else
        echo "nvidia-smi: not found"
    fi
    "$PYTHON" -c 'import platform, torch, torchvision
print("python", platform.python_version(), "on", platform.platform())
print("torch", torch.__version__, "torchvision", torchvision.__version__, "CUDA", torch.version.cuda,
      "cuDNN", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
print("GPUs:", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])' 2>&1
    echo "CPU cores: $(nproc 2>/dev/null || echo '?')"
    echo '```'
    for i in "${!step_names[@]}"; do
        log="${step_logs[$i]}"
        [ -n "$log" ] && [ -f "$log" ] || continue
        echo
        echo "## ${step_names[$i]} (exit ${step_codes[$i]})"
        echo
        echo '```'
        tail -n 80 "$log"
        echo '```'
    done
    for json in "$work"/feeder-*.json; do
        [ -f "$json" ] || continue
        echo
        echo "## $(basename "$json")"
        echo
        echo '```json'
        cat "$json"
        echo
        echo '```'
    done
} >"$report"
echo "wrote $report"
for code in "${step_codes[@]}"; do
    [ "$code" = 0 ] || [ "$code" = "-" ] || exit 1
done
exit 0
