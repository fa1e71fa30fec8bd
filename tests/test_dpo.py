"""Stage ``dpo`` on the tiny model: learning a preference, reference modes, LoRA, merging hook, bad input."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from posttrain.core.records import preference, write_records


def make_prefs(n: int, seed: int = 0, same: int = 0) -> list[dict]:
    """Pairs where the chosen reply answers and the rejected one refuses: learnable by the tiny model."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        p = [{"role": "user", "content": f"What is {a} + {b}?"}]
        rej = f"Sure, {a} + {b} = {a + b}." if i < same else f"No. I will not answer that question about {a}."
        out.append(preference(p, f"Sure, {a} + {b} = {a + b}.", rej, source="test", id=f"p{seed}-{i}"))
    return out


def dpo_recipe(tmp: Path, model: Path, data: Path, **stage) -> dict:
    """A one-stage dpo recipe on the tiny model."""
    train = {"learning_rate": 5e-4, "min_learning_rate": 5e-5, "per_device_train_batch_size": 4, "seed": 0}
    train.update(stage.pop("train", {}))
    st = {"kind": "dpo", "input": str(data), "max_length": 128, "train": train}
    st.update(stage)
    return {"output_dir": str(tmp / "run"), "model": {"path": str(model)}, "stages": [st]}


def run_recipe(d: dict, tmp: Path) -> dict:
    from posttrain.stages import load_recipe, recipe_from_dict

    return recipe_from_dict(d, tmp / "recipe.yaml").run()


def read_log(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def perturbed_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with noise added: a reference (or base) that differs from the policy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("perturbed")
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    m.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def test_dpo_raises_margin_and_heldout_accuracy(tiny_model_dir, tmp_path):
    data, held = tmp_path / "prefs.jsonl", tmp_path / "held.jsonl"
    write_records(data, make_prefs(34, seed=0, same=2))
    write_records(held, make_prefs(12, seed=1))
    res = run_recipe(dpo_recipe(tmp_path, tiny_model_dir, data, eval_input=str(held)), tmp_path)
    s = res["dpo"]["summary"]
    assert s["data"]["skipped_chosen_equals_rejected"] == 2 and s["data"]["rows"] == 32
    before, after = s["eval"]["before"], s["eval"]["after"]
    assert before["margin"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the start
    assert after["margin"] > before["margin"] + 0.5
    assert after["accuracy"] >= 0.9 > before["accuracy"]
    log = read_log(tmp_path / "run" / "dpo" / "loss_log.jsonl")
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and log[-1]["loss"] < 0.3
    assert log[0]["lr"] == pytest.approx(5e-4) and log[-1]["lr"] == pytest.approx(5e-5)
    assert json.loads((tmp_path / "run" / "dpo" / "eval.json").read_text())["after"]["accuracy"] >= 0.9


def test_precomputed_and_live_reference_same_first_steps(tiny_model_dir, perturbed_model, tmp_path):
    data = tmp_path / "prefs.jsonl"
    write_records(data, make_prefs(16))
    losses = {}
    for pre in (False, True):
        d = tmp_path / f"pre{int(pre)}"
        res = run_recipe(dpo_recipe(d, tiny_model_dir, data, ref_model=str(perturbed_model),
                                    precompute_ref_log_probs=pre, train={"max_steps": 2}), d)
        assert res["dpo"]["summary"]["reference"] == ("precomputed" if pre else str(perturbed_model))
        losses[pre] = [r["loss"] for r in read_log(d / "run" / "dpo" / "loss_log.jsonl")]
    assert abs(losses[False][0] - math.log(2)) > 1e-3  # a real reference, not the policy itself
    assert losses[True] == pytest.approx(losses[False], rel=1e-5, abs=1e-6)


def test_lora_dpo_reference_is_disabled_adapter(tiny_model_dir, tmp_path):
    data = tmp_path / "prefs.jsonl"
    write_records(data, make_prefs(8))
    res = run_recipe(dpo_recipe(tmp_path, tiny_model_dir, data, lora={"r": 4, "alpha": 8, "dropout": 0.0},
                                train={"max_steps": 2, "learning_rate": 1e-2}), tmp_path)
    s = res["dpo"]["summary"]
    assert s["reference"] == "disabled-adapter" and s["saved"] == "lora-merged"
    log = read_log(tmp_path / "run" / "dpo" / "loss_log.jsonl")
    # the adapter starts at zero, so the policy equals the adapter-disabled reference on step 1
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert log[1]["loss"] < log[0]["loss"]


def test_merging_optimizer_hook_and_other_loss_type(tiny_model_dir, perturbed_model, tmp_path):
    pytest.importorskip("posttrain.core.merging")
    data = tmp_path / "prefs.jsonl"
    write_records(data, make_prefs(8))
    res = run_recipe(dpo_recipe(tmp_path, tiny_model_dir, data, train={"max_steps": 2}, loss_type=["ipo"],
                                merging={"method": "ondare", "keep_rate": 0.5, "alpha": 1e-3,
                                         "base_model": str(perturbed_model)}), tmp_path)
    s = res["dpo"]["summary"]
    assert s["merging"]["method"] == "ondare" and s["steps"] == 2
    assert s["loss_type"] == ["ipo"]  # other TRL loss types pass through
    log = read_log(tmp_path / "run" / "dpo" / "loss_log.jsonl")
    assert abs(log[0]["loss"] - math.log(2)) > 0.05  # IPO's squared loss, not the sigmoid one


def test_bad_preference_input(tiny_model_dir, tmp_path):
    import copy

    from transformers import AutoTokenizer

    from posttrain.trainers.dpo import DPOStageConfig, build_dpo_trainer
    from posttrain.core.errors import BadInput, ConfigError

    same = tmp_path / "same.jsonl"
    write_records(same, make_prefs(3, same=3))
    with pytest.raises(ConfigError, match="same.jsonl: 3 of 3 rows are unusable .*chosen_equals_rejected"):
        run_recipe(dpo_recipe(tmp_path, tiny_model_dir, same), tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty.jsonl: no records"):
        run_recipe(dpo_recipe(tmp_path / "e", tiny_model_dir, empty), tmp_path / "e")
    tok = copy.deepcopy(AutoTokenizer.from_pretrained(tiny_model_dir))
    tok.chat_template = None
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in make_prefs(2)]
    with pytest.raises(BadInput, match="no chat template"):
        build_dpo_trainer(DPOStageConfig(input="x"), str(tiny_model_dir), tok, rows, None, tmp_path, 0)
