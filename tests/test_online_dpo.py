"""Online DPO: pair selection, the DPO loss, learning on the tiny model, and the weight-sync check (hf and vLLM)."""

from __future__ import annotations

import json
import os
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


def _multi_rank_recipe(tmp_path: Path, stage_sampler: dict | None = None, top_sampler: dict | None = None, **stage):
    """A two-stage recipe (SFT first) written as YAML: the check must fire before the SFT stage runs."""
    import yaml

    demos = tmp_path / "demos.jsonl"
    demos.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "hello"}]}) + "\n")
    st = {"kind": "online_dpo", "input": str(_prompts(tmp_path)), "model": "@sft",
          "reward_functions": {f"{__name__}:e_reward": 1.0}, **stage}
    if stage_sampler is not None:
        st["sampler"] = stage_sampler
    d = {"output_dir": str(tmp_path / "run"), "model": {"path": str(tmp_path)},
         "stages": [{"kind": "sft", "input": str(demos)}, st]}
    if top_sampler is not None:
        d["sampler"] = top_sampler
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


OPENAI = {"backend": "openai", "base_url": "http://127.0.0.1:9/v1"}


@pytest.mark.parametrize("stage_sampler,top_sampler,stage,match", [
    ({"backend": "vllm", "tensor_parallel_size": 4}, None, {},
     r"stages\[1\]: sampler\.tensor_parallel_size: 4 does not divide the 2 ranks"),
    (None, {"backend": "vllm", "tensor_parallel_size": 3}, {}, r"top-level sampler.*tensor_parallel_size: 3"),
    ({"backend": "vllm", "tensor_parallel_size": 4}, OPENAI, {},
     r"stages\[1\]: sampler\.tensor_parallel_size: 4"),  # the stage's own wins
    ({"backend": "hf"}, None, {"share_weights": False}, r"stages\[1\]: share_weights: false is not supported"),
])
def test_multi_rank_sampler_refused_before_the_first_stage(tmp_path, monkeypatch, stage_sampler, top_sampler, stage,
                                                          match):
    from posttrain.core.config import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    p = _multi_rank_recipe(tmp_path, stage_sampler, top_sampler, **stage)
    recipe = load_recipe(p, check_models=False)
    with pytest.raises(ConfigError, match=match) as ei:
        recipe.run()  # refused before stage sft runs
    msg = str(ei.value)
    assert "\n" not in msg and "vllm (one engine per rank, or per block of tensor_parallel_size ranks)" in msg
    assert not (tmp_path / "run").exists()  # nothing ran
    recipe.check_launch(only=["sft"])  # a launch of the other stages only is not refused for this one
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: every backend is fine
    load_recipe(p, check_models=False).check_launch()


@pytest.mark.parametrize("stage_sampler,top_sampler", [
    (None, None), ({"backend": "vllm"}, None), (None, {"backend": "vllm", "cpu_kv_cache_gb": 1}),
    ({"backend": "hf"}, OPENAI),  # the stage's own sampler is the effective one
    (OPENAI, None), (None, OPENAI),  # one vLLM server for all ranks (rank 0 sends it the weights)
    ({"backend": "vllm", "tensor_parallel_size": 2}, None),  # one engine spanning both ranks
])
def test_multi_rank_sampler_accepted(tmp_path, monkeypatch, stage_sampler, top_sampler):
    monkeypatch.setenv("WORLD_SIZE", "2")
    p = _multi_rank_recipe(tmp_path, stage_sampler, top_sampler)
    recipe = load_recipe(p, check_models=False)
    recipe.check_launch()
    assert recipe.stages[1].kind == "online_dpo"


def test_weight_chunks_keep_decoder_layers_whole_and_push_everything(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from posttrain.core.sampling.hf import HFSampler
    from posttrain.core.weight_sync import _named_tensors, iter_weight_chunks, push_weights, weight_chunks

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    chunks = weight_chunks(_named_tensors(policy), 1 << 20)
    names = [n for c in chunks for n, _ in c]
    assert sorted(names) == sorted(policy.state_dict()) and "lm_head.weight" in names  # tied: under both names
    assert len(chunks) >= 3
    for i in range(policy.config.num_hidden_layers):  # vLLM fuses q/k/v and gate/up: a layer goes in one piece
        assert sum(any(n.startswith(f"model.layers.{i}.") for n, _ in c) for c in chunks) == 1
    assert len(weight_chunks(_named_tensors(policy), 1 << 30)) == 1
    copy = HFSampler(str(tiny_model_dir))
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    assert push_weights(copy, policy, 1 << 20) == len(chunks)
    for (n, a), (_, b) in zip(policy.state_dict().items(), copy.model.state_dict().items()):
        assert torch.equal(a, b), n
    from peft import get_peft_model

    from posttrain.core.trainkit import LoraSection, lora_config

    lora = get_peft_model(policy, lora_config(LoraSection(r=2, target_modules=["q_proj"])))
    q = lora.base_model.model.model.layers[0].self_attn.q_proj
    got = []
    for c in iter_weight_chunks(lora, 1 << 20):  # merged while the chunks are read, unmerged afterwards
        assert q.merged
        got += [n for n, _ in c]
    assert sorted(got) == sorted(names) and not q.merged


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
    monkeypatch.setattr(online_loop, "push_weights", lambda *a, **k: 0)
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
    monkeypatch.setattr(online_loop, "push_weights", lambda *a, **k: 0)
    (tmp_path / "skip").mkdir()
    r = _recipe(tmp_path / "skip", tiny_model_dir, episodes=1, prompts_per_episode=2)
    with pytest.raises(SyncError, match="vllm sampler"):
        r.run(sampler=vllm_sampler)
    assert max(abs(a - b) for a, b in zip(vllm_sampler.probe_logprobs(probe), before)) < 1e-4


@pytest.mark.parametrize("fault", ["corrupted", "dropped"])
def test_vllm_push_with_one_bad_chunk_is_caught(tiny_model_dir, tmp_path, monkeypatch, vllm_sampler, fault):
    """The real chunked push into the engine, with one chunk of the first push damaged on its way: its
    tensors scaled by 0.5 (corrupted) or the chunk not delivered at all (a partial push). The probe after the
    push must see it and stop the run with SyncError; the injected engine gets its starting weights back."""
    probe = list(range(5, 40))
    before = vllm_sampler.probe_logprobs(probe)
    real, real_push = type(vllm_sampler).update_weights, online_loop.push_weights
    calls = {"push": 0, "chunk": 0, "chunks": []}

    def counting_push(*a, **k):  # the real push; counts pushes (the first one, before episode 0, is left alone)
        calls["push"] += 1
        calls["chunk"] = 0
        n = real_push(*a, **k)
        calls["chunks"].append(n)
        return n

    def damaged(self, named_tensors):
        calls["chunk"] += 1
        if calls["push"] == 2 and calls["chunk"] == 2:  # after episode 0: the second chunk (decoder layers)
            if fault == "dropped":
                return None
            named_tensors = [(n, t * 0.5) for n, t in named_tensors]
        return real(self, named_tensors)

    monkeypatch.setattr(online_loop, "push_weights", counting_push)
    monkeypatch.setattr(type(vllm_sampler), "update_weights", damaged)
    r = _recipe(tmp_path, tiny_model_dir, episodes=1, prompts_per_episode=2, sync_chunk_mb=1)
    with pytest.raises(SyncError, match="after episode 0: the vllm sampler's log-probs"):
        r.run(sampler=vllm_sampler)
    assert calls["push"] == 2 and calls["chunks"][0] >= 3  # several chunks per push; one was damaged
    monkeypatch.setattr(type(vllm_sampler), "update_weights", real)
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


def test_learning_rate_follows_the_shared_schedule(tiny_model_dir, tmp_path):
    """Online DPO uses the shared training section: warm-up, then decay from the peak to the floor over the planned
    optimizer steps (it once had a constant learning rate of its own)."""
    from posttrain.core.trainkit import lr_at

    r = _recipe(tmp_path, tiny_model_dir, episodes=3, prompts_per_episode=4,
                train={"learning_rate": 1e-3, "min_learning_rate": 1e-4, "lr_schedule": "linear", "warmup_steps": 1})
    res = r.run()
    lrs = [x["lr"] for x in _metrics(tmp_path)]
    sched = res["online_dpo"]["summary"]["schedule"]
    assert sched == {"planned_steps": 3, "lr_schedule": "linear"}  # one optimizer step per episode here
    train = r.stages[0].config.train
    assert lrs == pytest.approx([lr_at(train, i, 3) for i in range(3)], rel=1e-9)
    assert lrs[0] < lrs[1] == pytest.approx(1e-3) and lrs[2] == pytest.approx(1e-4)  # warm-up, peak, floor


@pytest.mark.parametrize("backend", ["hf", pytest.param("vllm", marks=pytest.mark.slow)])
def test_recipe_chat_template_reaches_online_dpo(tiny_model_dir, tmp_path, monkeypatch, backend):
    """The recipe's tokenizer.chat_template renders both what the sampler generates from and the prompt part
    of every trained sequence (it once reached only SFT; online DPO used the tokenizer folder's template)."""
    from transformers import AutoTokenizer

    if backend == "vllm":
        pytest.importorskip("vllm")
    tmpl = tmp_path / "t.jinja"
    tmpl.write_text("{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}\n{% endfor %}"
                    "{% if add_generation_prompt %}<<assistant>> {% endif %}")
    stage = {"episodes": 1, "sampling": {"n": 2, "temperature": 1.0, "max_tokens": 8}}
    if backend == "vllm":
        stage["sampler"] = {"backend": "vllm", "max_model_len": 512, "cpu_kv_cache_gb": 1}
    r = _recipe(tmp_path, tiny_model_dir, **stage)
    raw = dict(r.raw, tokenizer={"chat_template": str(tmpl)})
    r = recipe_from_dict(raw, tmp_path / "r.yaml")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    def want(prompt):
        return list(tok.apply_chat_template(prompt, chat_template=tmpl.read_text(), add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"])

    seen: dict = {"train": []}
    real_make, real_ids = online_loop.OnlineDPOLoop._make_sampler, online_loop.OnlineDPOLoop._ids

    def spy_make(self):
        real_make(self)
        seen["sampler"] = (self.sampler.name, self.sampler.encode([self.prompts[0]])[0], want(self.prompts[0]))

    def spy_ids(self, prompt, c):
        ids, n = real_ids(self, prompt, c)
        seen["train"].append((ids[:n], want(prompt)))
        return ids, n

    monkeypatch.setattr(online_loop.OnlineDPOLoop, "_make_sampler", spy_make)
    monkeypatch.setattr(online_loop.OnlineDPOLoop, "_ids", spy_ids)
    r.run()
    name, got, expected = seen["sampler"]
    assert name == backend and got == expected
    default = list(tok.apply_chat_template(PROMPTS_AS_MESSAGES[0], add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"])
    assert want(PROMPTS_AS_MESSAGES[0]) != default  # the template really differs from the folder's
    assert seen["train"] and all(a == b for a, b in seen["train"])


PROMPTS_AS_MESSAGES = [[{"role": "user", "content": t}] for t in PROMPTS]


def test_cpu_share_splits_the_cores_over_the_ranks_of_a_node():
    from posttrain.trainers.online_support import cpu_share

    assert [cpu_share(r, 2, [0, 1]) for r in range(2)] == [[0], [1]]
    assert [cpu_share(r, 2, [4, 5, 6, 7, 8]) for r in range(2)] == [[4, 5], [6, 7]]
    assert [cpu_share(r, 4, [0, 1]) for r in range(4)] == [[0], [1], [0], [1]]  # fewer cores than ranks


def test_engine_per_rank_binds_each_local_rank_to_its_cores_and_restores(monkeypatch):
    """On CPUs each rank's engine is started with VLLM_CPU_OMP_THREADS_BIND = its own cores (vLLM's automatic
    binding put every one-worker engine on the same core); a binding the user set is kept; the environment
    is restored once the engine has started."""
    from types import SimpleNamespace

    from posttrain.trainers.online_support import cpu_share, engine_per_rank

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        with engine_per_rank(SimpleNamespace(world=2, rank=rank, device="cpu"), "vllm"):
            seen.append(os.environ["VLLM_CPU_OMP_THREADS_BIND"])
            assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
        assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
    assert seen == [",".join(map(str, cpu_share(r, 2))) for r in (0, 1)]
    if len(os.sched_getaffinity(0)) >= 2:
        assert set(seen[0].split(",")).isdisjoint(seen[1].split(","))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    with engine_per_rank(SimpleNamespace(world=2, rank=1, device="cpu"), "vllm"):
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
