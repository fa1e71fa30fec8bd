"""Stage ``reward`` and ``RewardScorer`` on the tiny model: learning, held-out metrics, padding, bad input."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest

from posttrain.core.records import RecordError, preference, read_records, write_records

ROOT = Path(__file__).resolve().parent.parent


def arith_module():
    """scripts/make_arith_preferences.py, imported by path (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("make_arith_preferences", ROOT / "scripts" / "make_arith_preferences.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def reward_recipe(tmp: Path, model: Path | str, data: Path, **stage) -> dict:
    """A one-stage reward recipe dict on the tiny model (a rate fit for random initial weights)."""
    train = {"learning_rate": 1e-3, "min_learning_rate": 1e-4, "num_train_epochs": 3,
             "per_device_train_batch_size": 16, "weight_decay": 0.0, "seed": 0}
    train.update(stage.pop("train", {}))
    st = {"kind": "reward", "input": str(data), "model": str(model), "max_length": 256, "train": train}
    st.update(stage)
    return {"output_dir": str(tmp / "run"), "model": {"path": str(model)}, "stages": [st]}


def run_recipe(d: dict, tmp: Path) -> dict:
    from posttrain.stages import load_recipe, recipe_from_dict

    return recipe_from_dict(d, tmp / "recipe.yaml").run()


def read_jsonl(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


# ---------------------------------------------------------------- the trained model (shared)

@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """Train once on 240 generated arithmetic pairs (48 prompts held out); re-run the recipe once."""
    import time

    tmp = tmp_path_factory.mktemp("reward")
    data = tmp / "arith.jsonl"
    write_records(data, arith_module().arith_preferences(240, seed=1))
    d = reward_recipe(tmp, tiny_model_dir / "reward", data, eval_fraction=0.2, breakdown=["meta.op"])
    t0 = time.time()
    first = run_recipe(d, tmp)
    seconds = time.time() - t0
    out = tmp / "run" / "reward"
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    second = run_recipe(d, tmp)  # finished stage: skipped
    return {"dir": out, "data": data, "first": first, "second": second, "mtime": mtime, "seconds": seconds,
            "eval": json.loads((out / "eval.json").read_text())}


def test_learnable_preference_reaches_heldout_accuracy(trained):
    h = trained["eval"]["heldout"]
    print(f"held-out accuracy {h['accuracy']:.3f}, mean margin {h['mean_margin']:.3f}, n={h['n']}, "
          f"train+eval {trained['seconds']:.1f}s")
    assert h["n"] == 48
    assert h["accuracy"] >= 0.9
    assert h["mean_margin"] > 0
    # per-source breakdown (always) and the configured meta field
    by_src = h["by_source"]
    assert set(by_src) == {"arith:add", "arith:sub"}
    assert sum(g["n"] for g in by_src.values()) == h["n"]
    assert set(h["by_meta.op"]) == {"+", "-"}
    assert h["by_meta.op"]["+"]["accuracy"] == by_src["arith:add"]["accuracy"]
    assert trained["eval"]["train_sample"]["n"] == 192
    summary = trained["first"]["reward"]["summary"]
    assert summary["heldout_accuracy"] == h["accuracy"]
    assert summary["data"]["train_pairs"] == 192 and summary["data"]["eval_pairs"] == 48


def test_heldout_split_is_by_prompt(trained):
    from reward.train import split_heldout

    recs = read_records(trained["data"])
    train, held = split_heldout(recs, 0.2, "prompt", seed=0)
    prompts = {json.dumps(r["prompt"]) for r in train}
    assert held and not any(json.dumps(r["prompt"]) in prompts for r in held)
    assert split_heldout(recs, 0.2, "prompt", seed=0) == (train, held)  # deterministic
    ids = {p["id"] for p in read_jsonl(trained["dir"] / "eval_scores.jsonl")}
    assert len(ids) == 48


def test_loss_log_falls_and_stage_is_skipped_on_rerun(trained):
    log = read_jsonl(trained["dir"] / "loss_log.jsonl")
    assert [r["step"] for r in log] == list(range(1, len(log) + 1))
    assert len(log) == math.ceil(192 / 16) * 3
    first = sum(r["loss"] for r in log[:3]) / 3
    last = sum(r["loss"] for r in log[-3:]) / 3
    assert last < 0.5 * first, (first, last)
    assert all("rewards/accuracy" in r for r in log)
    # second Recipe.run skipped the finished stage: same manifest, model file untouched
    assert trained["second"]["reward"] == trained["first"]["reward"]
    assert (trained["dir"] / "model.safetensors").stat().st_mtime_ns == trained["mtime"]


def test_scorer_prefers_chosen_on_heldout_and_matches_stage_eval(trained):
    from reward.scorer import RewardScorer

    recs = {r["id"]: r for r in read_records(trained["data"])}
    pairs = read_jsonl(trained["dir"] / "eval_scores.jsonl")
    held = [recs[p["id"]] for p in pairs]
    with RewardScorer(str(trained["dir"]), batch_size=8) as s:
        ch = s.score([r["prompt"] for r in held], [r["chosen"][0]["content"] for r in held])
        rj = s.score([r["prompt"] for r in held], [r["rejected"][0]["content"] for r in held])
    acc = sum(c > r for c, r in zip(ch, rj)) / len(held)
    assert acc >= 0.9
    for p, c, r in zip(pairs, ch, rj):
        assert c == pytest.approx(p["chosen"], abs=1e-4) and r == pytest.approx(p["rejected"], abs=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_scorer_batch_equals_one_at_a_time(trained, side):
    from reward.scorer import RewardScorer

    recs = read_records(trained["data"])[:12]
    prompts = [r["prompt"] for r in recs]
    # very different lengths, so most rows of a batch are padded
    responses = [r["chosen"][0]["content"] + " ok" * (i * 5) for i, r in enumerate(recs)]
    s = RewardScorer(str(trained["dir"]), batch_size=12)
    s.tokenizer.padding_side = side
    batched = s.score(prompts, responses)
    single = [s.score([p], [r])[0] for p, r in zip(prompts, responses)]
    s.close()
    assert batched == pytest.approx(single, abs=1e-4)
    assert len(set(round(x, 4) for x in batched)) > 1  # not a constant function


def test_scorer_reads_the_last_real_token(tiny_model_dir):
    """Our mask-based pooling equals the model's own pooling on an unpadded sequence."""
    import torch

    from reward.scorer import RewardScorer

    s = RewardScorer(str(tiny_model_dir / "reward"), device="cpu")
    conv = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "2 + 2 = 4"}]
    ids = s.encode(conv)
    own = s.model(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert s.score_messages([conv])[0] == pytest.approx(own, abs=1e-5)
    assert s.score([], []) == []
    # over-long conversations keep their end (where the score is read), and are counted
    short = RewardScorer(str(tiny_model_dir / "reward"), device="cpu", max_length=8)
    assert short.score_messages([conv])[0] == pytest.approx(short.score_ids([ids[-8:]])[0], abs=1e-6)
    assert short.truncated == 1
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        s.score([conv[:1], conv[:1]], ["a"])


@pytest.mark.parametrize("side", ["left", "right"])
def test_scorer_pools_where_the_model_pools_when_the_text_ends_in_the_pad_id(tiny_model_dir, side):
    """pad == eos and a template that ends a reply with eos: HF pools before the trailing pad-id tokens, and
    so must the scorer (alone and in a padded batch), or scores at inference differ from training."""
    import torch

    from reward.scorer import RewardScorer

    s = RewardScorer(str(tiny_model_dir / "reward"), device="cpu")
    s.tokenizer.padding_side = side
    conv = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "2 + 2 = 4"}]
    ids = s.encode(conv)
    s.model.config.pad_token_id = ids[-1]  # the conversation's last token is now the model's pad id
    own = s.model(input_ids=torch.tensor([ids])).logits[0, 0].item()
    before_last = s.model(input_ids=torch.tensor([ids[:-1]])).logits[0, 0].item()
    assert own == pytest.approx(before_last, abs=1e-5)  # the model's own rule, which training used
    longer = s.encode([conv[0], {"role": "assistant", "content": "2 + 2 = 4, because 2 and 2 make 4"}])
    alone, batched = s.score_ids([ids])[0], s.score_ids([ids, longer])[0]
    assert alone == pytest.approx(own, abs=1e-5) and batched == pytest.approx(own, abs=1e-4)


def test_scorer_rejects_a_causal_lm(tiny_model_dir):
    from reward.scorer import RewardScorer

    with pytest.raises(ValueError, match="not a reward model"):
        RewardScorer(str(tiny_model_dir))


# ---------------------------------------------------------------- pure helpers

def test_pair_metrics_and_bt_loss():
    import torch

    from reward.train import bradley_terry_loss, pair_metrics

    m = pair_metrics([2.0, 0.0, 1.0], [1.0, 0.0, 3.0])
    assert m["accuracy"] == pytest.approx(0.5)  # one win, one tie (1/2), one loss
    assert m["ties"] == 1 and m["mean_margin"] == pytest.approx(-1 / 3)
    expect = (math.log1p(math.exp(-1)) + math.log(2) + math.log1p(math.exp(2))) / 3
    assert m["loss"] == pytest.approx(expect)
    c, r, mg = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.5]), torch.tensor([0.5, 0.0])
    got = bradley_terry_loss(c, r, mg).item()
    want = -(math.log(1 / (1 + math.exp(-0.5))) + math.log(1 / (1 + math.exp(0.5)))) / 2
    assert got == pytest.approx(want, rel=1e-6)
    assert bradley_terry_loss(c, r).item() < got  # a positive margin asks for more separation


def test_margin_column_reaches_the_loss(tiny_model_dir, tmp_path):
    """TRL's loss on a collated batch with our margin rows equals the pure margin loss."""
    import torch
    from transformers import AutoTokenizer

    from reward.train import RewardStageConfig, bradley_terry_loss, build_reward_trainer, tokenize_pairs
    from posttrain.core.config import build

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    recs = arith_module().arith_preferences(4, seed=3)
    for i, r in enumerate(recs):
        r["margin"] = float(i)
    recs[3].pop("margin")  # rows without a margin get 0
    rows, kept, dropped = tokenize_pairs(recs, tok, 256, True, "test")
    assert [x["margin"] for x in rows] == [0.0, 1.0, 2.0, 0.0] and dropped == 0
    cfg = build(RewardStageConfig, {"input": "x", "train": {"per_device_train_batch_size": 4}})
    trainer = build_reward_trainer(cfg, str(tiny_model_dir / "reward"), tok, rows, tmp_path, seed=0)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert batch["margin"].tolist() == [0.0, 1.0, 2.0, 0.0]
    model = trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch)).item()
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    c, r = scores.chunk(2)
    assert loss == pytest.approx(bradley_terry_loss(c, r, batch["margin"]).item(), rel=1e-5)
    assert loss != pytest.approx(bradley_terry_loss(c, r).item(), rel=1e-3)


# ---------------------------------------------------------------- bad input

def test_identical_pairs_are_counted_and_skipped():
    from reward.train import BadInput, clean_pairs

    p = [{"role": "user", "content": "hi"}]
    good = preference(p, "a", "b", source="t")
    same = preference(p, "a", "a", source="t")
    kept, st = clean_pairs([good, same, dict(good)], "f.jsonl")
    assert [r["id"] for r in kept] == [good["id"]]
    assert st["skipped_identical"] == 1 and st["duplicate_ids"] == 1
    with pytest.raises(BadInput, match=r"^f\.jsonl: none of 1 preference rows is usable"):
        clean_pairs([same], "f.jsonl")
    with pytest.raises(BadInput, match=r"^f\.jsonl: no preference records$"):
        clean_pairs([], "f.jsonl")


def test_bad_input_through_the_stage(tiny_model_dir, tmp_path):
    from reward.train import BadInput

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    from posttrain.core.errors import ConfigError

    with pytest.raises(ConfigError) as e:  # the recipe check reads the input before any stage runs
        run_recipe(reward_recipe(tmp_path / "a", tiny_model_dir / "reward", empty), tmp_path / "a")
    assert str(e.value).endswith(f"stages[0].input: {empty}: no records (the input is empty or only blank lines)")

    broken = tmp_path / "broken.jsonl"
    rows = [json.dumps(r) for r in arith_module().arith_preferences(3)]
    bad = json.loads(rows[1])
    del bad["rejected"]
    rows[1] = json.dumps(bad)
    broken.write_text("\n".join(rows) + "\n")
    with pytest.raises(ConfigError) as e:
        run_recipe(reward_recipe(tmp_path / "b", tiny_model_dir / "reward", broken), tmp_path / "b")
    assert f"stages[0].input: {broken}:2: 'rejected'" in str(e.value) and "\n" not in str(e.value)

    same = tmp_path / "same.jsonl"
    p = [{"role": "user", "content": "q"}]
    write_records(same, [preference(p, "x", "x", source="t"), preference(p, "y", "y", source="t")])
    with pytest.raises(ConfigError, match=r"same\.jsonl: 2 of 2 rows are unusable \(chosen_equals_rejected: 2"):
        run_recipe(reward_recipe(tmp_path / "c", tiny_model_dir / "reward", same), tmp_path / "c")
    # nothing was trained or marked complete
    assert not (tmp_path / "c" / "run" / "reward" / "manifest.json").exists()


# ---------------------------------------------------------------- LoRA from the policy, shipped files

def test_lora_from_policy_folder_merges_and_scores(tiny_model_dir, tmp_path):
    """Start from the causal-LM policy (fresh score head), LoRA, merged folder loads in the scorer."""
    from reward.scorer import RewardScorer

    data = tmp_path / "d.jsonl"
    write_records(data, arith_module().arith_preferences(16, seed=2))
    d = reward_recipe(tmp_path, tiny_model_dir, data, eval_fraction=0.25, train_eval_limit=0,
                      lora={"r": 4, "alpha": 8, "dropout": 0.0}, train={"max_steps": 2, "per_device_train_batch_size": 4})
    m = run_recipe(d, tmp_path)["reward"]["summary"]
    out = tmp_path / "run" / "reward"
    assert m["saved"] == "lora-merged" and m["steps"] == 2
    assert (out / "adapter" / "adapter_config.json").exists()
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2ForSequenceClassification"]
    ev = json.loads((out / "eval.json").read_text())
    assert ev["heldout"]["n"] == 4 and ev["train_sample"] is None
    with RewardScorer(str(out)) as s:
        x = s.score([[{"role": "user", "content": "What is 1 + 1?"}]], ["1 + 1 = 2"])
    assert len(x) == 1 and math.isfinite(x[0])


def test_shipped_preference_file_matches_its_script(tmp_path):
    shipped = ROOT / "recipes" / "data" / "arith_preferences.jsonl"
    again = tmp_path / "again.jsonl"
    assert arith_module().main([str(again)]) == 0
    assert again.read_bytes() == shipped.read_bytes()
    recs = read_records(shipped, "preference")
    assert len(recs) == 200 and len({json.dumps(r["prompt"]) for r in recs}) == 200


def test_shipped_recipe_validates():
    from posttrain.stages import load_recipe, recipe_from_dict

    r = load_recipe(ROOT / "recipes" / "examples" / "reward_tiny.yaml")
    assert [s.kind for s in r.stages] == ["make_tiny_model", "reward"]
    assert os.path.basename(r.stages[1].config.input) == "arith_preferences.jsonl"
