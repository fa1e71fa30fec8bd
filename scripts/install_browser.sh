#!/usr/bin/env bash
# Install what the annotation-app browser test (tests/test_annotate.py) needs, idempotently:
#   - Debian's `chromium` package (apt), driven through its executable at /usr/bin/chromium;
#   - Playwright for Python (pip) into the project's environment.
# It never runs `playwright install`: that downloads a browser build, which cannot be fetched here.
# Usage: bash scripts/install_browser.sh        (PYTHON=/path/to/python to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium
fi
if ! "$PY" -c "import playwright.sync_api" >/dev/null 2>&1; then
  "$PY" -m pip install -q "playwright>=1.40"
fi
echo "chromium: $(chromium --version 2>/dev/null | tail -1)"
echo "playwright: $("$PY" -c 'import importlib.metadata as m; print(m.version("playwright"))')"
