#!/usr/bin/env bash
# The device check (benchmarks/device_check.py) on a lent GPU machine, in one call that ends inside 8 minutes.
#
#   scripts/device_check.sh --fetch-wheels     here, with PyPI reachable: download into .whl/ the packages the GPU
#                                              machine lacks (diffusers, which `import hf_ext` needs; peft; lion-pytorch;
#                                              liger-kernel) and keep .whl/ out of git (.git/info/exclude)
#   scripts/device_check.sh [ARGS...]          on the GPU machine: install .whl/*.whl (if any) into /tmp/site
#                                              ($DEVICE_CHECK_SITE), put it first on PYTHONPATH, then run
#                                              `python3 -m benchmarks.device_check --device cuda --out "$OUT" ARGS...`
#
# ARGS go to the check (e.g. --quick for a smoke run, --only SECTION ...). The report (device_check.json, .md) and
# the log land in $OUT (default benchmarks/results/device/). The check stops its own sections at its time budget
# (400 s); `timeout` is the backstop: SIGTERM at DEVICE_CHECK_TIMEOUT seconds (default 450; the check then records
# the running section as out of time and writes its report), SIGKILL 15 s later. The JSON is rewritten after every
# section, so even a killed run leaves a partial report.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(diffusers==0.42.1 peft==0.21.2 lion-pytorch==0.2.5 liger-kernel==0.8.5)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    mkdir -p .whl .git/info
    grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
fi

export PYTHONUNBUFFERED=1
OUT_DIR="${OUT:-benchmarks/results/device}"
SITE="${DEVICE_CHECK_SITE:-/tmp/site}"  # where the carried wheels are installed (first on PYTHONPATH)
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/device_check.log"
started=$(date +%s)

{
    echo "device_check.sh: $(date -u +%FT%TZ), $(python3 --version 2>&1), $(uname -m)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "nvidia-smi: not available"
} | tee "$LOG"

if compgen -G ".whl/*.whl" > /dev/null; then
    if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .whl/*.whl >> "$LOG" 2>&1; then
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        echo "installed into $SITE: $(cd .whl && ls -1 *.whl | tr '\n' ' ')" | tee -a "$LOG"
    else
        echo "installing .whl/*.whl failed (see $LOG); running with the packages already there" | tee -a "$LOG"
    fi
else
    echo "no .whl/*.whl carried: running with the packages already there (import hf_ext needs diffusers)" | tee -a "$LOG"
fi

timeout --signal=TERM --kill-after=15 "${DEVICE_CHECK_TIMEOUT:-450}" \
    python3 -m benchmarks.device_check --device cuda --out "$OUT_DIR" "$@" 2>&1 | tee -a "$LOG"
status=${PIPESTATUS[0]}
echo "device_check.sh: exit status $status after $(( $(date +%s) - started )) s" | tee -a "$LOG"
exit "$status"
