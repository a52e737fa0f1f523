#!/usr/bin/env bash
# PEFT's own generic custom-model tests against gradient-view LoRA, and the same tests on PEFT's LoRA as a control.
#   scripts/peer_suites/peft_generic.sh [extra pytest arguments]
# Downloads the sdist of the installed peft (its tests ship only there) into a temporary folder; uses the python of
# $VENV (default .venv). Fails if a test of either suite fails. PEFT's tests that step the adapter with
# torch.optim.SGD/Adam are strict expected failures for gradient-view LoRA: hf_ext refuses that on purpose (README,
# PEFT section). CI runs it after the test suite.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="$(cd "$here/../.." && pwd)/${VENV:-.venv}/bin/python"
version=$("$python" -c "import peft; print(peft.__version__)")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m pip download --quiet --no-binary :all: --no-deps "peft==$version" -d "$work"
tar -xzf "$work"/peft-*.tar.gz -C "$work"
cp -r "$work"/peft-*/tests "$work/peft_tests"
touch "$work/peft_tests/__init__.py"
cp "$here/peft_gradient_view_cases.py" "$work/test_peft_gradient_view_cases.py"
cd "$work"
status=0
for suite in TestGradientView TestLoraControl; do
  echo "== $suite (peft $version)"
  "$python" -m pytest test_peft_gradient_view_cases.py -k "$suite" -q -p no:cacheprovider --tb=line -W ignore "$@" \
    > "$work/$suite.log" 2>&1 || status=1
  tail -n 12 "$work/$suite.log"
done
exit $status
