"""Stage ``sft`` on the tiny model: masking, packing, schedule, loss, resume, LoRA, bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from posttrain.core.records import demonstration, write_records


def make_demos(n: int, seed: int = 0, system: bool = True, long_every: int = 0) -> list[dict]:
    """Arithmetic demonstrations (learnable by the tiny model); every ``long_every``-th one is long."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        msgs = [{"role": "system", "content": "You add numbers."}] if system else []
        q = f"What is {a} + {b}?"
        if long_every and i % long_every == 0:
            q += " Please explain." * 60
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": f"{a} + {b} = {a + b}"}]
        out.append(demonstration(msgs, source="test", id=f"d{seed}-{i}"))
    return out


def sft_recipe(tmp: Path, model: Path, data: Path, **stage) -> dict:
    """A one-stage sft recipe dict on the tiny model."""
    train = {"learning_rate": 1e-3, "min_learning_rate": 1e-4, "num_train_epochs": 1,
             "per_device_train_batch_size": 1, "seed": 0}
    train.update(stage.pop("train", {}))
    st = {"kind": "sft", "input": str(data), "max_length": 256, "train": train}
    st.update(stage)
    return {"output_dir": str(tmp / "run"), "model": {"path": str(model)}, "stages": [st]}


def run_recipe(d: dict, tmp: Path) -> dict:
    from posttrain.stages import load_recipe, recipe_from_dict

    return recipe_from_dict(d, tmp / "recipe.yaml").run()


def read_log(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


# ---------------------------------------------------------------- pure parts

def test_assistant_only_mask_token_by_token(tok):
    from posttrain.core.chat import tokenize_conversation, training_template

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "2 + 3 = 5"}, {"role": "user", "content": "And 4 + 4?"},
            {"role": "assistant", "content": "8"}]
    ids, labels = tokenize_conversation(tok, msgs, training_template(tok))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    # Walk the token stream: the expected trained spans are exactly each assistant reply + its <|im_end|>.
    spans, cur = [], []
    for t, lab in zip(ids, labels):
        assert lab in (-100, t)
        if lab == t:
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    assert [tok.decode(s) for s in spans] == ["2 + 3 = 5<|im_end|>", "8<|im_end|>"]
    assert all(s[-1] == im_end for s in spans)  # the end-of-turn token is trained
    # every other token (system, user, <|im_start|>assistant headers, their <|im_end|>, newlines) is masked
    masked = [t for t, lab in zip(ids, labels) if lab == -100]
    assert tok.decode(masked).count("<|im_start|>") == 5
    assert masked.count(im_end) == 3  # system, user, user
    assert "Be brief." in tok.decode(masked) and "What is 2 + 3?" in tok.decode(masked)
    assert sum(lab != -100 for lab in labels) == sum(len(s) for s in spans)


def test_lr_multiplier_endpoints():
    from posttrain.core.trainkit import lr_multiplier

    for shape in ("linear", "cosine"):
        assert lr_multiplier(0, 50, 0, 0.1, shape) == 1.0
        assert abs(lr_multiplier(49, 50, 0, 0.1, shape) - 0.1) < 1e-12
        vals = [lr_multiplier(s, 50, 0, 0.1, shape) for s in range(50)]
        assert all(a >= b for a, b in zip(vals, vals[1:]))
    assert lr_multiplier(0, 10, 4, 0.1, "linear") == pytest.approx(0.2)
    assert lr_multiplier(4, 10, 4, 0.1, "linear") == 1.0


def test_prepare_rows_counts_overlong_and_missing_assistant(tok):
    from posttrain.trainers.sft import prepare_rows
    from posttrain.core.chat import training_template
    from posttrain.core.errors import BadInput

    recs = make_demos(10, long_every=5)
    recs.append(demonstration([{"role": "user", "content": "no answer here"}], source="t"))
    tmpl = training_template(tok)
    rows, st = prepare_rows(recs, tok, tmpl, 128, "drop", True, "mem")
    assert (st["skipped_no_assistant"], st["dropped_overlong"], st["rows"]) == (1, 2, 8)
    rows, st = prepare_rows(recs, tok, tmpl, 128, "truncate", True, "mem")
    # truncation keeps the start: the long question fills the window, so the answer is cut away
    assert st["truncated"] == 2 and st["dropped_no_trainable"] == 2 and st["rows"] == 8
    assert all(len(r["input_ids"]) <= 128 for r in rows)
    with pytest.raises(BadInput, match="none of 1 rows is trainable"):
        prepare_rows(recs[-1:], tok, tmpl, 128, "drop", True, "mem")
    with pytest.raises(BadInput, match="no demonstration records"):
        prepare_rows([], tok, tmpl, 128, "drop", True, "mem")


def test_tokenizer_without_chat_template(tok):
    import copy

    from posttrain.core.chat import training_template
    from posttrain.core.errors import BadInput

    t2 = copy.deepcopy(tok)
    t2.chat_template = None
    with pytest.raises(BadInput, match="no chat template"):
        training_template(t2, "tok-dir")
    t2.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(BadInput, match="generation"):
        training_template(t2, "tok-dir")


def test_packed_logits_equal_per_sequence(tiny_model_dir, tok, tmp_path):
    import torch

    from posttrain.trainers.sft import SFTStageConfig, build_sft_trainer, prepare_rows
    from posttrain.core.trainkit import TrainArgs
    from posttrain.core.chat import training_template

    rows, _ = prepare_rows(make_demos(12, seed=3, long_every=4), tok, training_template(tok), 512, "drop", True, "m")
    cfg = SFTStageConfig(input="x", max_length=512, train=TrainArgs(max_steps=1))
    tr = build_sft_trainer(cfg, str(tiny_model_dir), tok, rows, None, tmp_path, seed=0)
    batch = next(iter(tr.get_train_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1  # padding-free: one flat row
    pos = batch["position_ids"][0]
    starts = (pos == 0).nonzero().flatten().tolist() + [pos.numel()]
    assert len(starts) > 2  # several documents share the row
    model = tr.model.eval()
    assert model.config._attn_implementation == "sdpa_varlen"  # per-document sdpa on CPU
    varlen = {k: batch[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")}
    with torch.no_grad():
        # with the collator's document boundaries (the training path) and with position_ids only (masked sdpa)
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                       **varlen).logits[0]
        masked = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        for a, b in zip(starts, starts[1:]):
            single = model(input_ids=batch["input_ids"][:, a:b], use_cache=False).logits[0]
            torch.testing.assert_close(packed[a:b], single, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(masked[a:b], single, atol=2e-5, rtol=1e-4)
        # a padded batch (2-D attention mask) goes through ordinary masked sdpa
        docs = [batch["input_ids"][0, a:b] for a, b in zip(starts, starts[1:])][:2]
        width = max(len(d) for d in docs)
        ids = torch.stack([torch.cat([d, d.new_zeros(width - len(d))]) for d in docs])
        am = torch.stack([(torch.arange(width) < len(d)).long() for d in docs])
        padded = model(input_ids=ids, attention_mask=am, use_cache=False).logits
        for i, d in enumerate(docs):
            torch.testing.assert_close(padded[i, : len(d)], model(input_ids=d[None], use_cache=False).logits[0],
                                       atol=2e-5, rtol=1e-4)
    # first label of every document is ignored, so no document is trained to continue the previous one
    assert all(batch["labels"][0, a].item() == -100 for a in starts[:-1])
    # the chunked LM-head loss (default) equals the naive full-logits cross-entropy
    n = batch["labels"][:, 1:].ne(-100).sum()
    with torch.no_grad():
        chunked = tr.compute_loss(model, dict(batch), num_items_in_batch=n)
        tr.naive_loss = True
        naive = tr.compute_loss(model, dict(batch), num_items_in_batch=n)
    torch.testing.assert_close(chunked, naive, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- full runs

def test_sft_loss_falls_and_schedule_endpoints(tiny_model_dir, tmp_path):
    data = tmp_path / "demos.jsonl"
    recs = make_demos(40)
    recs.append(demonstration([{"role": "user", "content": "unanswered"}], source="t"))
    write_records(data, recs)
    res = run_recipe(sft_recipe(tmp_path, tiny_model_dir, data, max_length=128,
                                train={"num_train_epochs": 2}), tmp_path)
    s = res["sft"]["summary"]
    assert s["data"]["skipped_no_assistant"] == 1 and s["data"]["rows"] == 40
    out = tmp_path / "run" / "sft"
    log = read_log(out / "loss_log.jsonl")
    assert len(log) == s["steps"] > 10
    first, last = [r["loss"] for r in log[:3]], [r["loss"] for r in log[-3:]]
    assert sum(last) / 3 < sum(first) / 3 - 1.0
    assert log[0]["lr"] == pytest.approx(1e-3, rel=1e-9)
    assert log[-1]["lr"] == pytest.approx(1e-4, rel=1e-9)
    assert (out / "config.json").exists() and (out / "tokenizer_config.json").exists()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # later stages can use @sft as a model


def test_resume_gives_same_weights(tiny_model_dir, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from posttrain.trainers import sft

    data = tmp_path / "demos.jsonl"
    write_records(data, make_demos(24))
    train = {"max_steps": 6, "save_steps": 3, "gradient_accumulation_steps": 2}
    ref = run_recipe(sft_recipe(tmp_path / "a", tiny_model_dir, data, train=dict(train)), tmp_path / "a")
    assert ref["sft"]["summary"]["resumed_from"] is None

    class Crash(RuntimeError):
        pass

    class KillAfterCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == 3:
                raise Crash("killed after checkpoint-3")

    real = sft.build_sft_trainer

    def with_crash(*a, **kw):
        kw["callbacks"] = list(kw.get("callbacks") or []) + [KillAfterCheckpoint()]
        return real(*a, **kw)

    monkeypatch.setattr(sft, "build_sft_trainer", with_crash)
    with pytest.raises(Crash):
        run_recipe(sft_recipe(tmp_path / "b", tiny_model_dir, data, train=dict(train)), tmp_path / "b")
    monkeypatch.setattr(sft, "build_sft_trainer", real)
    res = run_recipe(sft_recipe(tmp_path / "b", tiny_model_dir, data, train=dict(train)), tmp_path / "b")
    assert res["sft"]["summary"]["resumed_from"].endswith("checkpoint-3")
    wa = load_file(tmp_path / "a" / "run" / "sft" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "run" / "sft" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)
    la = read_log(tmp_path / "a" / "run" / "sft" / "loss_log.jsonl")
    lb = read_log(tmp_path / "b" / "run" / "sft" / "loss_log.jsonl")
    assert [r["step"] for r in lb] == list(range(1, 7))  # replayed steps are not logged twice
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], rel=1e-5)


def test_lora_merge_and_save(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    data = tmp_path / "demos.jsonl"
    write_records(data, make_demos(8))
    res = run_recipe(sft_recipe(tmp_path, tiny_model_dir, data, lora={"r": 4, "alpha": 8, "dropout": 0.0,
                                                                       "target_modules": ["q_proj", "v_proj"]},
                                train={"max_steps": 3, "learning_rate": 1e-2}), tmp_path)
    assert res["sft"]["summary"]["saved"] == "lora-merged"
    out = tmp_path / "run" / "sft"
    assert (out / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    q1 = merged.model.layers[0].self_attn.q_proj.weight
    q0 = base.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(q1, q0)  # the adapter was merged into the weights
    torch.testing.assert_close(merged.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)


def test_bad_input_errors_before_training(tiny_model_dir, tmp_path):
    from posttrain.core.errors import BadInput, ConfigError

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    # the recipe check reads the input before any stage runs
    with pytest.raises(ConfigError, match=r"stages\[0\]\.input: .*empty\.jsonl: no records"):
        run_recipe(sft_recipe(tmp_path, tiny_model_dir, empty), tmp_path)
    noasst = tmp_path / "noasst.jsonl"
    write_records(noasst, [demonstration([{"role": "user", "content": f"q{i}"}], source="t") for i in range(3)])
    with pytest.raises(ConfigError, match=r"noasst\.jsonl: 3 of 3 rows are unusable \(no_assistant_turn: 3"):
        run_recipe(sft_recipe(tmp_path, tiny_model_dir, noasst), tmp_path)
    assert not (tmp_path / "run" / "sft" / "manifest.json").exists()
