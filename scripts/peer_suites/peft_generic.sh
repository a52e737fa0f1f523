#!/usr/bin/env bash
# PEFT's own generic custom-model tests against gradient-view LoRA, and the same tests on PEFT's LoRA as a control.
#   scripts/peer_suites/peft_generic.sh [extra pytest arguments]
# Downloads the sdist of the installed peft (its tests ship only there) into a temporary folder; uses the python of
# $VENV (default .venv). Expected with peft 0.21.2: gradient-view 475 passed, 21 skipped, 40 failed — the 40 are
# PEFT's tests stepping the adapter with torch.optim.SGD/Adam, which hf_ext refuses on purpose (README, PEFT section).
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
for suite in TestGradientView TestLoraControl; do
  echo "== $suite (peft $version)"
  "$python" -m pytest test_peft_gradient_view_cases.py -k "$suite" -q -p no:cacheprovider --tb=line -W ignore "$@" \
    | tail -n 12 || true
done
