"""Padding-free DPO and reward-model training: packing layout, per-sequence reads, equality with TRL's padded path."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from posttrain.core.records import preference, write_records

WORDS = "alpha beta gamma delta river stone light paper water green seven answer question".split()


def mixed_prefs(n: int, seed: int = 0, lo: int = 1, hi: int = 60) -> list[dict]:
    """Preference records whose prompt and reply lengths vary a lot (so padding would matter)."""
    rng = random.Random(seed)

    def words(a: int, b: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(a, b)))

    return [preference([{"role": "user", "content": words(2, 20)}], words(lo, hi), words(lo, hi), source="t",
                       id=f"m{seed}-{i}") for i in range(n)]


def trl_rows(recs: list[dict]) -> list[dict]:
    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in recs]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def perturbed(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny policy with noise: a reference that differs from the policy."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("perturbed")
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    m.save_pretrained(out)
    return out


def close_grads(a: dict, b: dict, rtol: float = 1e-3) -> None:
    """Same parameters got gradients, equal up to ``rtol`` of each tensor's largest entry (and not all zero)."""
    assert set(a) == set(b) and a
    for k in a:
        scale = a[k].abs().max().item()
        assert (a[k] - b[k]).abs().max().item() <= rtol * scale + 1e-9, k
    assert any(a[k].abs().max().item() > 0 for k in a)


# ---------------------------------------------------------------- layout

def test_pack_layout_and_bad_input():
    from posttrain.core.packing import (
        completion_targets,
        last_token_index,
        pack_sequences,
    )

    b = pack_sequences([[5, 6, 7], [8], [9, 10]], [[0, 1, 1], [1], [0, 1]])
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1]]
    assert b["cu_seq_lens"].tolist() == [0, 3, 4, 6]
    assert last_token_index(b["cu_seq_lens"]).tolist() == [2, 3, 5]
    pos, seq = completion_targets(b["input_ids"][0], b["completion_mask"][0], b["cu_seq_lens"])
    # token 3 (sequence 1's only token) is marked but starts its sequence: nothing in the row predicts it
    assert pos.tolist() == [1, 2, 5] and seq.tolist() == [0, 0, 2]
    with pytest.raises(ValueError, match="empty sequence"):
        pack_sequences([[1], []])
    with pytest.raises(ValueError, match="as long as"):
        pack_sequences([[1, 2]], [[1]])


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_preference_packer_matches_trl_collator(mode):
    """Each packed segment is exactly the non-pad part of the same row of TRL's padded batch."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from posttrain.core.packing import PreferencePacker

    rng = random.Random(3)
    ex = [{"prompt_ids": [rng.randint(3, 99) for _ in range(rng.randint(1, 9))],
           "chosen_ids": [rng.randint(3, 99) for _ in range(rng.randint(1, 9))],
           "rejected_ids": [rng.randint(3, 99) for _ in range(rng.randint(1, 9))],
           "ref_chosen_logps": -float(i), "ref_rejected_logps": -2.0 * i} for i in range(5)]
    padded = DataCollatorForPreference(pad_token_id=0, max_length=10, truncation_mode=mode)(ex)
    packed = PreferencePacker(max_length=10, truncation_mode=mode)(ex)
    cu = packed["cu_seq_lens"].tolist()
    assert len(cu) == 11
    for i in range(10):
        keep = padded["attention_mask"][i].bool()
        seg = slice(cu[i], cu[i + 1])
        assert packed["input_ids"][0, seg].tolist() == padded["input_ids"][i][keep].tolist()
        assert packed["completion_mask"][0, seg].tolist() == padded["completion_mask"][i][keep].tolist()
        assert packed["position_ids"][0, seg].tolist() == list(range(cu[i + 1] - cu[i]))
    assert packed["ref_rejected_logps"].tolist() == padded["ref_rejected_logps"].tolist()


def test_pair_packer_matches_trl_reward_collator():
    from trl.trainer.reward_trainer import DataCollatorForPreference

    from posttrain.core.packing import PairPacker

    ex = [{"chosen_ids": [1, 2, 3], "rejected_ids": [4, 5], "margin": 0.5},
          {"chosen_ids": [6], "rejected_ids": [7, 8, 9, 10], "margin": 2.0}]
    padded = DataCollatorForPreference(pad_token_id=0)(ex)
    packed = PairPacker()(ex)
    cu = packed["cu_seq_lens"].tolist()
    for i in range(4):
        keep = padded["attention_mask"][i].bool()
        assert packed["input_ids"][0, cu[i]:cu[i + 1]].tolist() == padded["input_ids"][i][keep].tolist()
    assert packed["margin"].tolist() == padded["margin"].tolist()


# ---------------------------------------------------------------- per-sequence reads on the real model

@pytest.mark.parametrize("attn", ["sdpa_varlen", "sdpa", "eager"])
def test_packed_logps_equal_one_at_a_time_and_ignore_neighbours(tiny_model_dir, attn):
    """Per-sequence log-probs of a packed row equal each sequence alone; changing a neighbour changes nothing."""
    import torch

    from posttrain.core.losses import response_logprobs
    from posttrain.core.packing import enable_packed_forward, pack_sequences
    from posttrain.core.trainkit import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir), "float32", attn).eval()
    enable_packed_forward(model)
    rng = random.Random(5)
    seqs = [[rng.randint(3, 1000) for _ in range(rng.randint(2, 40))] for _ in range(5)]
    plens = [0, 1, 3, 7, 2]  # plen 0: the completion starts the sequence, its first token is not scored

    def packed(ss: list[list[int]]) -> torch.Tensor:
        b = pack_sequences(ss, [[0] * p + [1] * (len(s) - p) for s, p in zip(ss, plens)])
        with torch.no_grad():
            return model(input_ids=b["input_ids"], position_ids=b["position_ids"], cu_seq_lens=b["cu_seq_lens"],
                         completion_mask=b["completion_mask"])["logps"]

    got = packed(seqs)
    with torch.no_grad():
        alone = torch.cat([response_logprobs(model, [(s, p)], 0, "cpu") for s, p in zip(seqs, plens)])
    assert got.tolist() == pytest.approx(alone.tolist(), rel=1e-5, abs=1e-4)
    other = [list(s) for s in seqs]
    other[1] = [t + 1 for t in other[1]]  # a different neighbour before sequences 2..4
    again = packed(other)
    assert again[2:].tolist() == pytest.approx(got[2:].tolist(), rel=1e-5, abs=1e-4)
    assert again[1].item() != pytest.approx(got[1].item(), abs=1e-3)


def test_packed_scores_equal_scorer(tiny_model_dir, tok):
    """The reward read from a packed row is the scorer's (last real token, left or right padding)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from posttrain.core.packing import enable_packed_forward, pack_sequences
    from reward.scorer import RewardScorer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir / "reward").eval()
    convs = [r["prompt"] + r["chosen"] for r in mixed_prefs(6, seed=2)]
    ids = [list(tok.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]) for c in convs]
    enable_packed_forward(model)
    b = pack_sequences(ids)
    with torch.no_grad():
        got = model(input_ids=b["input_ids"], position_ids=b["position_ids"], cu_seq_lens=b["cu_seq_lens"])["scores"]
    want = RewardScorer.from_model(model, tok, batch_size=3).score_ids(ids)
    assert got.tolist() == pytest.approx(want, rel=1e-5, abs=1e-5)
    with torch.no_grad():  # and the model's ordinary forward is untouched
        plain = model(input_ids=torch.tensor([ids[0]])).logits[0, 0].item()
    assert plain == pytest.approx(want[0], rel=1e-5, abs=1e-5)


# ---------------------------------------------------------------- DPO: packed == TRL padded

def _dpo_trainer(tiny, tok, rows, out: Path, packing: bool, lora: bool, precompute: bool, ref: Path | None):
    from posttrain.core.config import build
    from posttrain.trainers.dpo import DPOStageConfig, build_dpo_trainer

    st: dict = {"input": "x", "packing": packing, "precompute_ref_log_probs": precompute, "max_length": 64,
                "train": {"per_device_train_batch_size": 4, "seed": 0}}
    if lora:
        st["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0}
    cfg = build(DPOStageConfig, st)
    out.mkdir(parents=True, exist_ok=True)
    return build_dpo_trainer(cfg, str(tiny), tok, rows, None, out, 0, "float32",
                             "sdpa_varlen" if packing else "sdpa", str(ref) if ref else None)


def _one_step(tr, lora: bool) -> dict:
    """Loss, metrics, per-sequence log-probs and gradients of one micro-batch (the first four pairs)."""
    import torch

    if lora:  # a non-zero adapter, the same in both trainers: the policy now differs from the reference
        g = torch.Generator().manual_seed(3)
        for n, p in sorted(tr.model.named_parameters()):
            if "lora_B" in n:
                p.data.copy_(0.2 * torch.randn(p.shape, generator=g))
    batch = tr._prepare_inputs(tr.data_collator([tr.train_dataset[i] for i in range(4)]))
    tr.model.train()
    loss = tr.compute_loss(tr.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        if "cu_seq_lens" in batch:
            logps = tr._packed(tr.model, batch)["logps"]
        else:
            labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
            logps = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                             fused_lm_head=True).log_probs.sum(1)
    ref = ([tr.train_dataset[i]["ref_chosen_logps"] for i in range(4)]
           if "ref_chosen_logps" in tr.train_dataset.column_names else None)
    return {"loss": loss.item(), "metrics": {k: v[-1] for k, v in tr._metrics["train"].items()}, "grads": grads,
            "logps": logps.tolist(), "ref": ref, "tokens": batch["input_ids"].numel()}


@pytest.mark.parametrize("lora,precompute", [(False, False), (False, True), (True, False), (True, True)])
def test_packed_dpo_equals_trl_padded(tiny_model_dir, perturbed, tok, tmp_path, lora, precompute):
    rows = trl_rows(mixed_prefs(8, seed=1))
    ref = None if lora else perturbed
    pad = _one_step(_dpo_trainer(tiny_model_dir, tok, rows, tmp_path / "pad", False, lora, precompute, ref), lora)
    pk = _one_step(_dpo_trainer(tiny_model_dir, tok, rows, tmp_path / "pack", True, lora, precompute, ref), lora)
    assert pk["tokens"] < pad["tokens"]  # the packed row holds no padding
    assert abs(pad["loss"] - math.log(2)) > 1e-3  # a real reference: not the policy itself
    assert pk["loss"] == pytest.approx(pad["loss"], rel=1e-5)
    assert pk["logps"] == pytest.approx(pad["logps"], rel=1e-5, abs=1e-4)
    if precompute:
        assert pk["ref"] == pytest.approx(pad["ref"], rel=1e-5, abs=1e-4)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
              "entropy", "logits/chosen", "logits/rejected"):
        assert pk["metrics"][k] == pytest.approx(pad["metrics"][k], rel=1e-4, abs=1e-4), k
    for k in ("rewards/accuracies", "mean_token_accuracy"):
        assert pk["metrics"][k] == pytest.approx(pad["metrics"][k], abs=1e-6), k
    assert pk["metrics"]["num_tokens"] == pad["metrics"]["num_tokens"] == pk["tokens"]  # real tokens only
    close_grads(pad["grads"], pk["grads"])


def test_packed_dpo_moe_router_loss_equals_trl(tmp_path, tok):
    """On a Qwen2-MoE the packed loss carries the same load-balancing term as TRL's padded one."""
    from posttrain.core.tiny import TinySpec, make_tiny_model

    moe = make_tiny_model(tmp_path / "moe", TinySpec(moe=True), reward=False)
    rows = trl_rows(mixed_prefs(4, seed=4))
    pad = _one_step(_dpo_trainer(moe, tok, rows, tmp_path / "pad", False, False, False, None), False)
    pk = _one_step(_dpo_trainer(moe, tok, rows, tmp_path / "pack", True, False, False, None), False)
    assert pad["metrics"]["aux_loss"] > 0
    assert pk["metrics"]["aux_loss"] == pytest.approx(pad["metrics"]["aux_loss"], rel=1e-5)
    assert pk["loss"] == pytest.approx(pad["loss"], rel=1e-5)
    close_grads(pad["grads"], pk["grads"])


# ---------------------------------------------------------------- reward model: packed == TRL padded

@pytest.mark.parametrize("lora", [False, True])
def test_packed_reward_equals_trl_padded(tiny_model_dir, tok, tmp_path, lora):
    import torch

    from posttrain.core.config import build
    from reward.scorer import RewardScorer
    from reward.train import RewardStageConfig, build_reward_trainer, tokenize_pairs

    recs = mixed_prefs(8, seed=6)
    for i, r in enumerate(recs):
        r["margin"] = float(i % 3)
    rows, _, _ = tokenize_pairs(recs, tok, 512, True, "t")
    got = {}
    for packing in (False, True):
        st: dict = {"input": "x", "packing": packing, "center_rewards_coefficient": 0.01,
                    "train": {"per_device_train_batch_size": 4, "seed": 0}}
        if lora:
            st["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0}
        out = tmp_path / str(packing)
        out.mkdir()
        tr = build_reward_trainer(build(RewardStageConfig, st), str(tiny_model_dir / "reward"), tok, rows, out, 0,
                                  "float32", "sdpa_varlen" if packing else "sdpa")
        ex = [tr.train_dataset[i] for i in range(4)]
        batch = tr._prepare_inputs(tr.data_collator(ex))
        tr.model.train()
        loss = tr.compute_loss(tr.model, batch)
        loss.backward()
        got[packing] = {"loss": loss.item(), "metrics": {k: v[-1] for k, v in tr._metrics["train"].items()},
                        "grads": {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}}
        if packing:
            with torch.no_grad():
                scores = tr.packed_scores(tr.model, batch).tolist()
            base = tr.model.get_base_model() if lora else tr.model
            want = RewardScorer.from_model(base, tok).score_ids([e["chosen_ids"] for e in ex] +
                                                                [e["rejected_ids"] for e in ex])
            assert scores == pytest.approx(want, rel=1e-5, abs=1e-5)
            assert batch["margin"].tolist() == [0.0, 1.0, 2.0, 0.0]
    pad, pk = got[False], got[True]
    assert pk["loss"] == pytest.approx(pad["loss"], rel=1e-5)
    for k in ("min_reward", "mean_reward", "max_reward", "margin", "accuracy"):
        assert pk["metrics"][k] == pytest.approx(pad["metrics"][k], rel=1e-4, abs=1e-5), k
    assert pk["metrics"]["num_tokens"] == pad["metrics"]["num_tokens"]  # TRL counts real tokens: all of ours
    close_grads(pad["grads"], pk["grads"])


# ---------------------------------------------------------------- stages end to end

def _loss_log(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def _run(d: dict, tmp: Path) -> dict:
    from posttrain.stages import recipe_from_dict

    return recipe_from_dict(d, tmp / "recipe.yaml").run()


def test_dpo_stage_packed_trains_like_padded(tiny_model_dir, perturbed, tmp_path):
    """Same recipe, packing on and off: equal loss logs over optimizer steps (with accumulation), eval works."""
    data, held = tmp_path / "prefs.jsonl", tmp_path / "held.jsonl"
    write_records(data, mixed_prefs(16, seed=7))
    write_records(held, mixed_prefs(4, seed=8))
    logs, summaries = {}, {}
    for packing in (False, True):
        d = tmp_path / str(packing)
        st = {"kind": "dpo", "input": str(data), "eval_input": str(held), "max_length": 96, "packing": packing,
              "ref_model": str(perturbed),
              "train": {"learning_rate": 5e-4, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
                        "max_steps": 3, "seed": 0, "report_to": []}}
        res = _run({"output_dir": str(d / "run"), "model": {"path": str(tiny_model_dir)}, "stages": [st]}, d)
        summaries[packing] = res["dpo"]["summary"]
        logs[packing] = _loss_log(d / "run" / "dpo" / "loss_log.jsonl")
    assert summaries[True]["packing"] is True and summaries[True]["attn_implementation"] == "sdpa_varlen"
    assert [r["loss"] for r in logs[True]] == pytest.approx([r["loss"] for r in logs[False]], rel=1e-4)
    assert [r["rewards/margins"] for r in logs[True]] == pytest.approx([r["rewards/margins"] for r in logs[False]],
                                                                     rel=1e-3, abs=1e-4)
    for when in ("before", "after"):
        for k in ("loss", "margin", "accuracy"):
            assert summaries[True]["eval"][when][k] == pytest.approx(summaries[False]["eval"][when][k],
                                                                     rel=1e-4, abs=1e-5), (when, k)


def test_reward_stage_packed_trains_like_padded(tiny_model_dir, tmp_path):
    data = tmp_path / "prefs.jsonl"
    write_records(data, mixed_prefs(24, seed=9))
    logs, summaries = {}, {}
    for packing in (False, True):
        d = tmp_path / str(packing)
        st = {"kind": "reward", "input": str(data), "model": str(tiny_model_dir / "reward"), "max_length": 256,
              "packing": packing, "eval_fraction": 0.25, "train_eval_limit": 4,
              "train": {"learning_rate": 1e-3, "per_device_train_batch_size": 4, "max_steps": 3, "seed": 0,
                        "report_to": []}}
        res = _run({"output_dir": str(d / "run"), "model": {"path": str(tiny_model_dir)}, "stages": [st]}, d)
        summaries[packing] = res["reward"]["summary"]
        logs[packing] = _loss_log(d / "run" / "reward" / "loss_log.jsonl")
    assert summaries[True]["attn_implementation"] == "sdpa_varlen"
    assert len(logs[True]) == 3
    assert [r["loss"] for r in logs[True]] == pytest.approx([r["loss"] for r in logs[False]], rel=1e-4)
    assert summaries[True]["heldout_mean_margin"] == pytest.approx(summaries[False]["heldout_mean_margin"],
                                                                   rel=1e-3, abs=1e-5)


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("stage,match", [
    ({"kind": "dpo", "packing": True, "loss_type": ["ipo"]}, "implements \\['sigmoid'\\] only"),
    ({"kind": "dpo", "packing": True, "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}, "only"),
    ({"kind": "dpo", "packing": True, "train": {"extra": {"ld_alpha": 0.5}}}, "train.extra.ld_alpha has no effect"),
    ({"kind": "dpo", "packing": True, "train": {"extra": {"padding_free": True}}}, "padding_free has no effect"),
    ({"kind": "reward", "packing": True, "train": {"extra": {"pad_to_multiple_of": 8}}},
     "pad_to_multiple_of has no effect"),
])
def test_packing_refuses_keys_without_effect(tiny_model_dir, tmp_path, stage, match):
    from posttrain.core.errors import ConfigError

    data = tmp_path / "p.jsonl"
    write_records(data, mixed_prefs(2))
    st = {"input": str(data), **stage}
    with pytest.raises(ConfigError, match=match):
        _run({"output_dir": str(tmp_path / "run"), "model": {"path": str(tiny_model_dir)}, "stages": [st]}, tmp_path)
    st["packing"] = False  # the same keys are fine on the padded path (reward's pad_to_multiple_of included)
    from posttrain.stages import recipe_from_dict

    recipe_from_dict({"output_dir": str(tmp_path / "run"), "model": {"path": str(tiny_model_dir)}, "stages": [st]},
                     tmp_path / "recipe.yaml")


def test_trainer_level_refusals():
    """Building the packed trainers directly (benchmark, library use) refuses inert TRL options too."""
    from trl import DPOConfig, RewardConfig

    from posttrain.trainers.dpo_packed import check_packed_args
    from reward.packed import check_packed_args as check_reward

    base = {"output_dir": "/tmp/x", "use_cpu": True, "bf16": False, "report_to": "none"}
    check_packed_args(DPOConfig(**base))
    for kw, match in [({"loss_type": ["hinge"]}, "not 'hinge'"), ({"use_weighting": True}, "use_weighting"),
                      ({"f_divergence_type": "js_divergence"}, "f_divergence_type"),
                      ({"pad_to_multiple_of": 8}, "pad_to_multiple_of"),
                      ({"loss_type": ["robust"], "label_smoothing": 0.1}, "robust")]:
        with pytest.raises(ValueError, match=match):
            check_packed_args(DPOConfig(**base, **kw))
    check_reward(RewardConfig(**base))
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        check_reward(RewardConfig(**base, pad_to_multiple_of=8))
