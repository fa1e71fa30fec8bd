"""Online DPO: pair selection, the DPO loss, learning on the tiny model, and the weight-sync check (hf and vLLM)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain.core.weight_sync import SyncError
from posttrain.trainers import online_dpo, online_loop
from reward.sources import total_rewards
from posttrain.core.losses import dpo_loss, sequence_logprobs
from posttrain.stages import load_recipe, recipe_from_dict

PROMPTS = ["What is 12 + 7?", "Name three colors.", "Write one short sentence about the sea.", "Count to five.",
           "What is 3 * 4?", "Say hello.", "Give me a number.", "Describe a tree."]


def e_reward(prompts, responses, records):
    """A learnable property with spread even for a random model: how many letters 'e' the response has."""
    return [float(r.count("e")) for r in responses]


def _prompts(tmp_path: Path) -> Path:
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(json.dumps({"id": f"p{i}", "prompt": [{"role": "user", "content": t}]}) + "\n"
                         for i, t in enumerate(PROMPTS)))
    return p


def _recipe(tmp_path: Path, model: Path, **stage):
    st = {"kind": "online_dpo", "input": str(_prompts(tmp_path)), "model": str(model),
          "reward_functions": {f"{__name__}:e_reward": 1.0}, "unterminated_penalty": 0.0, "episodes": 2, "prompts_per_episode": 4,
          "sampling": {"n": 4, "temperature": 1.0, "max_tokens": 12}, "train": {"learning_rate": 1e-3, "lr_schedule": "constant"},
          "batch_size": 4}
    st.update(stage)
    return recipe_from_dict({"output_dir": str(tmp_path / "run"), "seed": 0, "stages": [st]}, tmp_path / "r.yaml")


def _metrics(tmp_path: Path) -> list[dict]:
    return [json.loads(x) for x in (tmp_path / "run" / "online_dpo" / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- pure pieces

def test_pick_pairs_best_worst_and_skips():
    pairs, skipped = online_dpo.pick_pairs([[0.1, 0.9, 0.5], [1.0, 1.0, 1.0], [0.0, 0.05, 0.02], [3.0, -1.0]], 0.1)
    assert pairs == [(0, 1, 0), (3, 0, 1)] and skipped == 2  # a tie and a gap of 0.05 < 0.1


def test_total_rewards_weights_and_penalty():
    srcs = [("a", 2.0, lambda p, r, recs: [1.0, 0.0]), ("b", 0.5, lambda p, r, recs: [0.0, 4.0])]
    tot, means = total_rewards(srcs, [[], []], ["x", "y"], [{}, {}], [True, False], penalty=1.5)
    assert tot == [2.0, 0.5] and means == {"a": 0.5, "b": 2.0}


def test_dpo_loss_values():
    pc, pr, rc, rr = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0])
    out = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # h = 0.5*(1) - 0.5*(-1) = 1
    torch.testing.assert_close(out["loss"], -torch.nn.functional.logsigmoid(torch.tensor([1.0])))
    torch.testing.assert_close(out["margin"], torch.tensor([1.0]))
    ids = torch.tensor([[5, 6, 7]])
    logits = torch.zeros(1, 3, 10)
    assert float(sequence_logprobs(logits, ids, torch.tensor([[0, 1, 1]]))) == pytest.approx(2 * -torch.log(torch.tensor(10.0)).item())


def test_config_errors():
    from posttrain.core.config import ConfigError

    with pytest.raises(ConfigError, match="reward"):
        recipe_from_dict({"output_dir": "x", "stages": [{"kind": "online_dpo", "input": __file__}]}, Path("r.yaml"))
    with pytest.raises(ConfigError, match="LoRA"):
        recipe_from_dict({"output_dir": "x", "stages": [{"kind": "online_dpo", "input": __file__, "reward_model": "m",
                                                         "lora": {"r": 2}, "merging": {}}]}, Path("r.yaml"))


# ---------------------------------------------------------------- on the tiny model

def test_online_dpo_raises_reward_and_saves_model(tiny_model_dir, tmp_path):
    r = _recipe(tmp_path, tiny_model_dir, episodes=4, prompts_per_episode=8, train={"learning_rate": 3e-3},
                epochs_per_episode=4, sampling={"n": 6, "temperature": 1.0, "max_tokens": 12})
    res = r.run()
    m = _metrics(tmp_path)
    assert [x["episode"] for x in m] == list(range(4))
    # measured: 4.4 -> 5.4 -> 9.3 -> 15.2 (random start: ~4.4 letters 'e' in 12 tokens)
    assert m[-1]["reward_mean"] > m[0]["reward_mean"] + 2.0, [x["reward_mean"] for x in m]
    for k in ("reward_min", "reward_max", "gap_mean", "skipped", "loss", "chosen_reward", "rejected_reward",
              "margin", "kl_ref", "response_len", "time_generate", "time_score", "time_train", "time_sync",
              "logp_margin", "sync_logprob_diff"):
        assert k in m[-1], k
    assert m[-1]["kl_ref"] > 0  # the policy moved away from the reference
    out = tmp_path / "run" / "online_dpo"
    assert res["online_dpo"]["summary"]["pairs"] > 0
    assert (out / "model.safetensors").exists() and not (out / "checkpoint").exists()
    assert list((out / "tensorboard").iterdir())
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # @online_dpo works as a model path


def test_merging_and_lora_run(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    base.save_pretrained(tmp_path / "base")
    r = _recipe(tmp_path, tiny_model_dir, episodes=1,
                merging={"method": "onties", "keep_rate": 0.1, "alpha": 1e-3, "base_model": str(tmp_path / "base")})
    r.run()
    assert _metrics(tmp_path)[0]["pairs"] > 0
    (tmp_path / "l").mkdir()  # LoRA with a separate sampler copy: adapter merged, weights pushed and verified
    r2 = _recipe(tmp_path / "l", tiny_model_dir, episodes=1, lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                 sampler={"backend": "hf"}, share_weights=False)
    r2.run()
    assert (tmp_path / "l" / "run" / "online_dpo" / "model.safetensors").exists()


def test_resume_at_episode_granularity(tiny_model_dir, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = online_loop.OnlineDPOLoop.episode

    def dies_in_third(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(self, *a, **k)

    monkeypatch.setattr(online_loop.OnlineDPOLoop, "episode", dies_in_third)
    r = _recipe(tmp_path, tiny_model_dir, episodes=3)
    with pytest.raises(KeyboardInterrupt):
        r.run()
    assert json.loads((tmp_path / "run" / "online_dpo" / "checkpoint" / "state.json").read_text())["episode"] == 2
    monkeypatch.setattr(online_loop.OnlineDPOLoop, "episode", real)
    r.run()
    assert [x["episode"] for x in _metrics(tmp_path)] == [0, 1, 2]


def test_sync_check_catches_skipped_sync_hf(tiny_model_dir, tmp_path, monkeypatch):
    # A separate hf copy (not sharing the policy) must receive the weights; pretend the push was forgotten.
    monkeypatch.setattr(online_loop, "push_weights", lambda sampler, policy: None)
    r = _recipe(tmp_path, tiny_model_dir, episodes=2, sampler={"backend": "hf"}, share_weights=False)
    with pytest.raises(SyncError, match="after episode 0"):
        r.run()


def test_vllm_sync_and_skipped_sync(tiny_model_dir, tmp_path, monkeypatch, vllm_sampler):
    probe = list(range(5, 40))
    before = vllm_sampler.probe_logprobs(probe)
    (tmp_path / "ok").mkdir()
    r = _recipe(tmp_path / "ok", tiny_model_dir, episodes=1, prompts_per_episode=2)
    r.run(sampler=vllm_sampler)
    m = _metrics(tmp_path / "ok")
    assert m[0]["sync_logprob_diff"] < 1e-3 and m[0]["pairs"] > 0  # real push through collective_rpc verified
    # the injected engine is handed back with its starting weights
    assert max(abs(a - b) for a, b in zip(vllm_sampler.probe_logprobs(probe), before)) < 1e-4
    monkeypatch.setattr(online_loop, "push_weights", lambda sampler, policy: None)
    (tmp_path / "skip").mkdir()
    r = _recipe(tmp_path / "skip", tiny_model_dir, episodes=1, prompts_per_episode=2)
    with pytest.raises(SyncError, match="vllm sampler"):
        r.run(sampler=vllm_sampler)
    assert max(abs(a - b) for a, b in zip(vllm_sampler.probe_logprobs(probe), before)) < 1e-4


@pytest.mark.slow
def test_two_processes_deepspeed_zero2_zero3_with_merging(tiny_model_dir, tmp_path):
    """accelerate launch, 2 CPU ranks (gloo), the shipped ZeRO-2/3 configs, merging optimizer on."""
    import os
    import subprocess
    import sys

    import yaml
    from transformers import AutoModelForCausalLM

    from tests.conftest import free_port

    root = Path(__file__).resolve().parents[1]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    base.save_pretrained(tmp_path / "base")
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="",
               TORCH_EXTENSIONS_DIR=str(root / ".torch_extensions"), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", PYTHONPATH=str(root))
    first = {}
    for stage in (2, 3):
        (tmp_path / f"z{stage}").mkdir(exist_ok=True)
        r = _recipe(tmp_path / f"z{stage}", tiny_model_dir, reward_functions={"tests.test_online_dpo:e_reward": 1.0},
                    merging={"method": "ondare", "keep_rate": 0.5, "alpha": 1e-3, "base_model": str(tmp_path / "base")})
        rp = tmp_path / f"z{stage}.yaml"
        rp.write_text(yaml.safe_dump(r.raw))
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(root / "recipes" / "accelerate" / f"zero{stage}.yaml"), "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--main_process_port", str(free_port()), "-m", "posttrain.cli", "run", str(rp)]
        p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=400)
        assert p.returncode == 0, p.stderr[-4000:]
        out = tmp_path / f"z{stage}" / "run" / "online_dpo"
        stats = json.loads((out / "stats.json").read_text())
        assert stats["distributed"] == {"world_size": 2, "deepspeed": True, "zero_stage": stage}
        m = _metrics(tmp_path / f"z{stage}")
        assert [x["episode"] for x in m] == [0, 1] and m[0]["pairs"] > 0  # one writer, every pair trained
        first[stage] = (m[0]["reward_mean"], m[0]["samples"])
        moved = AutoModelForCausalLM.from_pretrained(out)
        start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        assert max((a - b).abs().max().item() for a, b in zip(moved.parameters(), start.parameters())) > 1e-4
    assert first[2] == first[3]  # the same prompts sampled by the same ranks before any update
