"""Evaluation: math answers, instruction-following verifiers and code tests scored through real verifiers."""

import json

import pytest

from posttrain.core.config import build
from posttrain.evaluation.evaluate import EvalConfig, evaluate, format_table, label_of
from posttrain.core.records import write_records
from posttrain.core.sampling.scripted import ScriptedSampler
from reward.answers import answer_ok, final_answer, format_ok

RECORDS = [
    {"id": "m1", "prompt": "Tom has 2 pens and gets 3 more. How many pens?", "meta": {"answer": 5}},
    {"id": "m2", "prompt": "Ana has 9 cups and gives away 4. How many are left?", "meta": {"answer": 5}},
    {"id": "i1", "prompt": "Reply in lower case only.",
     "meta": {"verifiers": ["def evaluate(response):\n    return response == response.lower()",
                            "def evaluate(response):\n    return len(response) > 0"]}},
    {"id": "c1", "prompt": "Write add(a, b).",
     "meta": {"tests": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]}},
]
ANSWERS = {
    "Tom has": "2 + 3 = 5. The answer is 5.",  # right
    "Ana has": "9 - 4 = 6. The answer is 6.",  # wrong
    "Reply in": "SHOUTING",  # fails one of two verifiers
    "Write add": "```python\ndef add(a, b):\n    return a + b\n```",  # passes both tests
}


def _answer(prompt, j):
    text = prompt[-1]["content"]
    return next(v for k, v in ANSWERS.items() if text.startswith(k))


def test_task_checks():
    assert final_answer("1 + 2 = 3. The answer is 3.") == 3 and final_answer("3") is None
    assert format_ok("x. The answer is -4.") and not format_ok("The answer is 4 because")
    assert answer_ok("The answer is 12.", "12") and not answer_ok("The answer is 12.", 13)


def test_evaluate_scores_every_verifier_kind(tmp_path, tiny_model_dir):
    data = tmp_path / "heldout.jsonl"
    write_records(data, RECORDS, "prompt")
    cfg = build(EvalConfig, {"input": str(data), "checkpoints": [str(tiny_model_dir)], "labels": ["tiny"]}, "", "t")
    rows = evaluate(cfg, tmp_path / "out", sampler=ScriptedSampler(_answer))
    (row,) = rows
    assert row["accuracy"] == 0.5 and row["format_rate"] == 1.0
    assert row["if_pass_rate"] == 0.5
    assert row["code_pass_rate"] == 1.0 and row["code_solved"] == 1.0
    assert "| tiny |" in format_table(rows)
    # resumable: a finished checkpoint is not evaluated again
    again = evaluate(cfg, tmp_path / "out", sampler=ScriptedSampler(lambda p, j: pytest.fail("re-evaluated")))
    assert again == rows
    assert [json.loads(x)["checkpoint"] for x in (tmp_path / "out" / "eval.jsonl").read_text().splitlines()] == ["tiny"]


def test_eval_config_is_strict(tmp_path):
    from posttrain.core.config import ConfigError

    with pytest.raises(ConfigError, match="labels has 2 entries for 1 checkpoints"):
        build(EvalConfig, {"input": "x", "checkpoints": ["a"], "labels": ["a", "b"]}, "", "r.yaml")
    assert label_of("@online_dpo/sub") == "online_dpo" and label_of("/m/sft") == "sft"
