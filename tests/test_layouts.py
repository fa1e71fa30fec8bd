"""Foreign layouts and containers: every TRL dataset type, ShareGPT/Alpaca, JSONL/JSON/Parquet/datasets
folders/hub references, normalised to canonical records; one training step of sft, dpo and reward from each
container."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.core.errors import RecordError
from posttrain.core.layouts import implicit_text_prompt, normalise
from posttrain.core.records import read_records, to_chat_prompt, validate

U = [{"role": "user", "content": "What color is the sky?"}]
A_BLUE = [{"role": "assistant", "content": "It is blue."}]
A_GREEN = [{"role": "assistant", "content": "It is green."}]
P_SKY = [{"role": "user", "content": "The sky is"}]


def asst(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


# Every TRL dataset type (standard and conversational) and what it becomes, by the kind a stage asks for.
# (row, kind, expected kind, expected canonical fields, expected meta.layout or None for canonical rows)
CASES = [
    # language modelling
    ({"text": "The sky is blue."}, "demonstration", "demonstration", {"text": "The sky is blue."}, "text"),
    ({"messages": U + A_BLUE}, "demonstration", "demonstration", {"messages": U + A_BLUE}, None),
    # prompt-only
    ({"prompt": "The sky is"}, "prompt", "prompt", {"prompt": P_SKY}, None),
    ({"prompt": U}, "prompt", "prompt", {"prompt": U}, None),
    # prompt-completion -> demonstrations (strings become one user / one assistant turn, joining spaces dropped)
    ({"prompt": "The sky is", "completion": " blue."}, "demonstration", "demonstration",
     {"messages": P_SKY + asst("blue.")}, "prompt_completion"),
    ({"prompt": U, "completion": A_BLUE}, "demonstration", "demonstration", {"messages": U + A_BLUE},
     "prompt_completion"),
    # preference, explicit prompt
    ({"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}, "preference", "preference",
     {"prompt": P_SKY, "chosen": asst("blue."), "rejected": asst("green.")}, "standard_preference"),
    ({"prompt": U, "chosen": A_BLUE, "rejected": A_GREEN}, "preference", "preference",
     {"prompt": U, "chosen": A_BLUE, "rejected": A_GREEN}, None),
    # preference, implicit prompt (trl-lib/ultrafeedback_binarized; standard: cut at a word boundary)
    ({"chosen": "The sky is blue.", "rejected": "The sky is green."}, "preference", "preference",
     {"prompt": P_SKY, "chosen": asst("blue."), "rejected": asst("green.")}, "standard_implicit_prompt_preference"),
    ({"chosen": U + A_BLUE, "rejected": U + A_GREEN}, "preference", "preference",
     {"prompt": U, "chosen": A_BLUE, "rejected": A_GREEN}, "conversational_implicit_prompt_preference"),
    # string prompt + full conversations that repeat it (HuggingFaceH4/ultrafeedback_binarized)
    ({"prompt": "What color is the sky?", "chosen": U + A_BLUE, "rejected": U + A_GREEN, "score_chosen": 8.0},
     "preference", "preference", {"prompt": U, "chosen": A_BLUE, "rejected": A_GREEN},
     "prompt_repeated_in_completions"),
    # string prompt + conversational completions that do not repeat it
    ({"prompt": "What color is the sky?", "chosen": A_BLUE, "rejected": A_GREEN}, "preference", "preference",
     {"prompt": U, "chosen": A_BLUE, "rejected": A_GREEN}, "string_prompt_preference"),
    # kind "prompt" from other layouts: the turns before the last assistant turn
    ({"messages": [{"role": "system", "content": "S"}] + U + A_BLUE + [{"role": "user", "content": "And?"}]
      + A_GREEN}, "prompt", "prompt",
     {"prompt": [{"role": "system", "content": "S"}] + U + A_BLUE + [{"role": "user", "content": "And?"}]}, "messages"),
    ({"chosen": U + A_BLUE, "rejected": U + A_GREEN}, "prompt", "prompt", {"prompt": U}, "preference"),
    ({"prompt": "The sky is", "completion": " blue.", "label": True}, "prompt", "prompt", {"prompt": P_SKY},
     "unpaired_preference"),
    # ShareGPT and Alpaca
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}, "demonstration",
     "demonstration", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
     "sharegpt"),
    ({"instruction": "Add the numbers.", "input": "2 3", "output": "5"}, "demonstration", "demonstration",
     {"messages": [{"role": "user", "content": "Add the numbers.\n\n2 3"}, {"role": "assistant", "content": "5"}]},
     "alpaca"),
    # detection (kind None)
    ({"text": "x y"}, None, "demonstration", {"text": "x y"}, "text"),
    ({"prompt": U, "chosen": A_BLUE, "rejected": A_GREEN}, None, "preference",
     {"prompt": U, "chosen": A_BLUE, "rejected": A_GREEN}, None),
]


@pytest.mark.parametrize("row,kind,want_kind,fields,layout", CASES, ids=[f"{i}" for i in range(len(CASES))])
def test_every_layout_normalises(row, kind, want_kind, fields, layout):
    got_kind, rec = normalise(json.loads(json.dumps(row)), kind, "f.jsonl:1")
    assert got_kind == want_kind
    for k, v in fields.items():
        assert rec[k] == v, k
    assert rec.get("meta", {}).get("layout") == layout
    rec = validate(rec, got_kind, "f.jsonl:1")  # the canonical checks accept what normalise made
    assert rec["id"] and rec["source"] == "user"


def test_original_columns_are_kept_in_meta():
    row = {"id": 7, "prompt": "What color is the sky?", "prompt_id": "abc", "chosen": U + A_BLUE,
           "rejected": U + A_GREEN, "messages": U + A_BLUE, "score_chosen": 8.5, "source": "uf", "margin": 2}
    _, rec = normalise(dict(row), "preference", "x")
    assert rec["id"] == "7" and rec["source"] == "uf" and rec["margin"] == 2.0
    assert rec["meta"]["original"] == {"prompt_id": "abc", "messages": U + A_BLUE, "score_chosen": 8.5}
    # read as a demonstration, the same row (H4 layout) gives its `messages`; the pair stays in meta
    _, demo = normalise(dict(row), "demonstration", "x")
    assert demo["messages"] == U + A_BLUE and demo["meta"]["original"]["chosen"] == U + A_BLUE
    assert "margin" not in demo and demo["meta"]["original"]["margin"] == 2


def test_canonical_rows_keep_extra_fields_and_ids():
    row = {"id": "t1", "prompt": "Q?", "responses": [{"text": "a"}], "meta": {"k": 1}}
    _, rec = normalise(dict(row), "prompt", "x")
    assert rec["responses"] == [{"text": "a"}] and rec["meta"] == {"k": 1} and rec["prompt"][0]["content"] == "Q?"


def test_implicit_text_prompt_cuts_at_words():
    assert implicit_text_prompt("The sky is blue", "The sky is bleak", "x") == ("The sky is", "blue", "bleak")
    # one completion extends the other: the cut moves back so both keep a word
    assert implicit_text_prompt("Say yes", "Say yes please", "x") == ("Say", "yes", "yes please")
    with pytest.raises(RecordError, match="share no leading words"):
        implicit_text_prompt("Blue", "Green", "x")
    with pytest.raises(RecordError, match=r"x: no 'prompt' column.*share no leading turn"):
        normalise({"chosen": A_BLUE, "rejected": A_GREEN}, "preference", "x")


def test_message_forms_and_errors():
    _, rec = normalise({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                   {"type": "text", "text": "b"}]},
                                     {"role": "assistant", "content": None, "tool_calls": [{"x": 1}]},
                                     {"role": "tool", "content": "3", "name": None}]}, "demonstration", "x")
    assert [m["content"] for m in rec["messages"]] == ["ab", "", "3"] and "name" not in rec["messages"][2]
    bad = [({"messages": "hello"}, r"x: 'messages' must be a list of \{role, content\} messages, got a string"),
           ({"messages": []}, "got an empty list"),
           ({"messages": [{"role": "assistant", "content": None}]}, r"messages\[0\].content is null"),
           ({"messages": [{"role": "robot", "content": "x"}]}, r"messages\[0\].role must be one of"),
           ({"messages": [{"role": "user", "content": [{"type": "image"}]}]}, "only text parts"),
           ({"messages": ["hi"]}, r"messages\[0\] must be an object"),
           ({"prompt": "p", "chosen": "a", "rejected": A_GREEN}, "must both be strings or both message lists"),
           ({"prompt": "p", "chosen": "a"}, "'rejected' is missing"),
           ({"foo": 1}, r"unknown record layout \(columns: foo\)")]
    for row, pattern in bad:
        with pytest.raises(RecordError, match=pattern):
            normalise(row, None, "x")


def test_kind_mismatches_are_refused_with_the_reason():
    cases = [({"text": "abc"}, "preference", "only sft trains on text rows"),
             ({"text": "abc"}, "prompt", "'text'.*has no prompt"),
             ({"prompt": "p", "completion": "c", "label": False}, "preference", "no stage here trains on unpaired"),
             ({"prompt": "p", "completion": "c", "label": False}, "demonstration", "unpaired"),
             ({"prompt": U, "chosen": A_BLUE, "rejected": A_GREEN}, "demonstration", "a preference row"),
             ({"prompt": "just a prompt"}, "demonstration", "a prompt-only row"),
             ({"messages": U + A_BLUE}, "preference", r"a conversation \('messages'\) where preference pairs")]
    for row, kind, pattern in cases:
        with pytest.raises(RecordError, match=pattern):
            normalise(row, kind, "x")
    with pytest.raises(RecordError, match="has no prompt"):
        to_chat_prompt({"id": "t", "text": "abc"})


def test_prompt_kind_drops_the_reply_of_a_demonstration():
    r = validate({"messages": U + A_BLUE}, "prompt")  # canonical path too (records.validate)
    assert r["prompt"] == U


# ---------------------------------------------------------------- containers

def _rows() -> list[dict]:
    return [{"prompt": f"Question {i}?", "completion": f"Answer {i}.", "extra": i} for i in range(5)]


def test_jsonl_json_parquet_and_datasets_folders(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _rows()
    (tmp_path / "a.jsonl").write_text("\ufeff" + "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:3]),
                          "test": datasets.Dataset.from_list(rows[3:])}).save_to_disk(str(tmp_path / "dd"))
    want = [[{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]
            for i in range(5)]
    for name in ("a.jsonl", "a.json", "a.parquet", "ds"):
        recs = read_records(tmp_path / name, "demonstration")
        assert [r["messages"] for r in recs] == want, name
        assert recs[2]["meta"]["original"] == {"extra": 2}
    assert [r["messages"] for r in read_records(tmp_path / "dd", "demonstration")] == want[:3]  # train by default
    assert [r["messages"] for r in read_records(tmp_path / "dd", "demonstration", split="test")] == want[3:]
    with pytest.raises(RecordError, match=r"dd: no split 'validation' \(splits: train, test\)"):
        read_records(tmp_path / "dd", "demonstration", split="validation")
    with pytest.raises(RecordError, match="split 'test' has no effect"):
        read_records(tmp_path / "a.jsonl", "demonstration", split="test")
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": "p"}, {"prompt": None}])}
                         ).save_to_disk(str(tmp_path / "dd2"))
    with pytest.raises(RecordError, match=r"dd2\[train\]:row 1: unknown record layout \(columns: prompt=null\)"):
        read_records(tmp_path / "dd2", "prompt")
    datasets.DatasetDict({"a": datasets.Dataset.from_list(rows), "b": datasets.Dataset.from_list(rows)}
                         ).save_to_disk(str(tmp_path / "ab"))
    with pytest.raises(RecordError, match="has splits a, b and none is 'train'"):
        read_records(tmp_path / "ab", "demonstration")


def test_folder_of_data_files_and_hub_reference(tmp_path, monkeypatch):
    """hf://ORG/NAME resolves from the local hub cache when the hub is unreachable; uncached: one line."""
    import datasets
    import huggingface_hub.constants as hc
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "dscache"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    base = tmp_path / "hub" / "datasets--org--prefs"
    snap = base / "snapshots" / ("ab" * 20)
    (snap / "data").mkdir(parents=True)
    prefs = [{"chosen": U + asst(f"blue {i}"), "rejected": U + asst(f"green {i}")} for i in range(4)]
    pq.write_table(pa.Table.from_pylist(prefs[:3]), snap / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(prefs[3:]), snap / "data" / "test-00000-of-00001.parquet")
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(snap.name)
    recs = read_records("hf://org/prefs", "preference")
    assert [r["chosen"][0]["content"] for r in recs] == ["blue 0", "blue 1", "blue 2"] and recs[0]["prompt"] == U
    assert read_records("hf://org/prefs", "preference", split="test")[0]["rejected"] == asst("green 3")
    assert len(read_records(snap, "preference")) == 3  # the same files as a plain folder
    with pytest.raises(RecordError) as e:
        read_records("hf://org/missing", "preference")
    assert str(e.value).startswith("hf://org/missing: cannot load the hub dataset") and "\n" not in str(e.value)
    with pytest.raises(RecordError, match="expected hf://ORG/NAME"):
        read_records("hf://just-a-name", "preference")


def test_text_rows_train_every_token_without_template(tiny_model_dir):
    from transformers import AutoTokenizer

    from posttrain.core.chat import training_template
    from posttrain.trainers.sft import prepare_rows

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    recs = [validate(normalise(row, "demonstration", "x")[1], "demonstration")
            for row in ({"text": "one two three"}, {"messages": U + A_BLUE})]
    rows, st = prepare_rows(recs, tok, training_template(tok), 256, "drop", True, "mem")
    ids = tok("one two three")["input_ids"] + [tok.eos_token_id]
    assert rows[0]["input_ids"] == ids and rows[0]["labels"] == ids  # raw text, every token, eos appended
    assert "<|im_start|>" not in tok.decode(rows[0]["input_ids"])
    assert -100 in rows[1]["labels"] and st["text_rows"] == 1 and st["rows"] == 2


# ---------------------------------------------------------------- one training step from each container

def _write(container: str, rows: list[dict], path: Path) -> str:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    if container == "jsonl":
        path = path.with_suffix(".jsonl")
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif container == "parquet":
        path = path.with_suffix(".parquet")
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif container == "dataset":
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    else:
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                              "test": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(path))
    return str(path)


def _sft_rows(container: str) -> list[dict]:
    return {"jsonl": [{"text": f"The sum of {i} and 2 is {i + 2}."} for i in range(6)],
            "parquet": [{"prompt": [{"role": "user", "content": f"{i}+2?"}],
                         "completion": [{"role": "assistant", "content": str(i + 2)}]} for i in range(6)],
            "dataset": [{"conversations": [{"from": "human", "value": f"{i}+2?"}, {"from": "gpt", "value": str(i + 2)}]}
                        for i in range(6)],
            "datasetdict": [{"prompt": f"{i}+2=", "completion": f" {i + 2}"} for i in range(6)]}[container]


def _pref_rows(container: str) -> list[dict]:
    def q(i):
        return [{"role": "user", "content": f"What is {i}+2?"}]

    return {"jsonl": [{"chosen": f"What is {i}+2? It is {i + 2}.", "rejected": f"What is {i}+2? No idea {i}."}
                      for i in range(6)],
            "parquet": [{"chosen": q(i) + asst(str(i + 2)), "rejected": q(i) + asst("no")} for i in range(6)],
            "dataset": [{"prompt": f"What is {i}+2?", "chosen": q(i) + asst(str(i + 2)),
                         "rejected": q(i) + asst(f"no {i}"), "score_chosen": 9.0} for i in range(6)],
            "datasetdict": [{"prompt": f"What is {i}+2?", "chosen": str(i + 2), "rejected": f"no {i}"}
                            for i in range(6)]}[container]


@pytest.mark.parametrize("container", ["jsonl", "parquet", "dataset", "datasetdict"])
def test_one_step_of_each_trainer_from_each_container(tiny_model_dir, tmp_path, container):
    from posttrain.stages import recipe_from_dict

    demos = _write(container, _sft_rows(container), tmp_path / "demos")
    prefs = _write(container, _pref_rows(container), tmp_path / "prefs")
    train = {"max_steps": 1, "per_device_train_batch_size": 2, "learning_rate": 1e-4, "min_learning_rate": 1e-5}
    stages = [{"kind": "sft", "input": demos, "max_length": 64, "train": dict(train)},
              {"kind": "dpo", "input": prefs, "max_length": 64, "train": dict(train)},
              {"kind": "reward", "input": prefs, "model": str(tiny_model_dir / "reward"), "max_length": 64,
               "eval_fraction": 0.0, "train_eval_limit": 0, "train": dict(train)}]
    recipe = {"output_dir": str(tmp_path / "run"), "model": {"path": str(tiny_model_dir)}, "stages": stages}
    res = recipe_from_dict(recipe, tmp_path / "recipe.yaml").run()
    assert [res[k]["summary"]["steps"] for k in ("sft", "dpo", "reward")] == [1, 1, 1]
    sft = res["sft"]["summary"]["data"]
    assert sft["rows"] == 6 and sft["text_rows"] == (6 if container == "jsonl" else 0)
    assert res["dpo"]["summary"]["data"]["rows"] == 6
    assert res["reward"]["summary"]["data"]["train_pairs"] == 6
    src = res["dpo"]["summary"]["data"]["input"]["sources"][prefs]
    assert src["read"] == 6 and src["checks"]["flagged"] == 0
    for k in ("sft", "dpo", "reward"):
        assert (tmp_path / "run" / k / "manifest.json").exists() and (tmp_path / "run" / k / "config.json").exists()
