"""The README's launch commands, run as documented with 2 CPU processes (issue 12).

A Qwen2-architecture model with Qwen2's real tokenizer and chat template is registered in a local
Hugging Face cache under the hub id the size recipes name (``Qwen/Qwen2-7B``), so the shipped
recipe resolves ``model.path``/``model.base`` exactly as on a real cluster; only sizes are shrunk
by command-line overrides. Each launch must exit 0 and leave every stage's outputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_hub_cache

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def qwen_hub(tmp_path_factory) -> Path:
    """An HF cache holding a tiny Qwen2-tokenizer model as ``Qwen/Qwen2-7B``."""
    root = tmp_path_factory.mktemp("launch")
    model = root / "model"
    subprocess.run([sys.executable, "-m", "posttrain.cli", "make-tiny-model", str(model), "--tokenizer", "qwen2"],
                   check=True, cwd=ROOT, capture_output=True)
    return make_hub_cache(root / "hub", {"Qwen/Qwen2-7B": model})


def _launch(config: str, hub: Path, out: Path, stages: str, overrides: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", VLLM_CPU_KVCACHE_SPACE="1")
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", config,
           "--num_processes", "2", "-m", "posttrain.cli", "run", "recipes/qwen2/7b.yaml", "--only", stages,
           f"output_dir={out}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)


def _shrink(*stages: str) -> list[str]:
    out = []
    for s in stages:
        out += [f"stages.{s}.max_length=256", f"stages.{s}.train.max_steps=2",
                f"stages.{s}.train.gradient_accumulation_steps=1", f"stages.{s}.train.save_steps=1"]
    return out


@pytest.mark.parametrize("config", ["recipes/accelerate/zero3.yaml", "recipes/accelerate/zero2.yaml"])
def test_readme_launch_command(config, qwen_hub, tmp_path):
    out = tmp_path / "run"
    r = _launch(config, qwen_hub, out, "sft,reward,dpo", _shrink("sft", "reward", "dpo"))
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-6000:])
    for stage in ("sft", "reward", "dpo"):
        manifest = json.loads((out / stage / "manifest.json").read_text())
        assert manifest["kind"] == stage and manifest["fingerprint"], manifest
    # the merging base was the hub id, resolved through the cache, and the trained policy is a Qwen2 model
    cfg = json.loads((out / "dpo" / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["vocab_size"] >= 151646

    if config.endswith("zero3.yaml"):
        _online_dpo_commands(config, qwen_hub, out)


# online DPO, shrunk: one episode of 4 prompts x 2 samples, short sequences, small CPU engines
ONLINE_SHRINK = ["stages.online_dpo.episodes=1", "stages.online_dpo.prompts_per_episode=4",
                 "stages.online_dpo.sampling.n=2", "stages.online_dpo.sampling.max_tokens=8",
                 "stages.online_dpo.batch_size=1", "stages.online_dpo.max_length=256",
                 "stages.online_dpo.train.warmup_steps=0", "stages.online_dpo.sync_chunk_mb=64"]


def _errors(r: subprocess.CompletedProcess) -> str:
    """The lines of a failed launch that say why (the rest is each rank's and the launcher's noise)."""
    return "\n".join(x for x in (r.stdout + r.stderr).splitlines() if "rror" in x or "Traceback" in x)[-6000:]


def _online_dpo_commands(config: str, hub: Path, out: Path) -> None:
    """recipes/accelerate/README.md's two online DPO launches, on the sft/reward/dpo outputs just made:
    colocated vLLM engines (one per rank), then a separate `vllm serve` in dev mode receiving the weights."""
    pytest.importorskip("vllm")
    from tests.conftest import vllm_serve

    r = _launch(config, hub, out, "online_dpo", ONLINE_SHRINK + ["stages.online_dpo.sampler.max_model_len=512"])
    assert r.returncode == 0, _errors(r)
    stats = json.loads((out / "online_dpo" / "stats.json").read_text())
    assert stats["sampler"] == "vllm" and stats["samples_per_rank"] == [4, 4] and stats["syncs_verified"] == 1
    with vllm_serve(out / "dpo", out.parent / "serve.log", dev_mode=True, max_model_len=512, name="policy") as url:
        server = "{backend: openai, base_url: \"%s\", served_model_name: policy}" % url
        r = _launch(config, hub, out, "online_dpo", ONLINE_SHRINK + [f"stages.online_dpo.sampler={server}"])
    assert r.returncode == 0, _errors(r)
    stats = json.loads((out / "online_dpo" / "stats.json").read_text())
    assert stats["sampler"] == "openai" and stats["samples_per_rank"] == [4, 4] and stats["syncs_verified"] == 1
