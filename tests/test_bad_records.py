"""Bad input, record side: each malformed file gives ONE stderr line naming the file and line/row, a non-zero
exit, no traceback and no output, through `posttrain validate` and `posttrain run` (a recipe with sft and dpo
stages on the tiny model), and the same one-line RecordError when a stage reads it at run time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from posttrain.core.errors import RecordError
from posttrain.core.inputs import read_input

ROOT = Path(__file__).resolve().parent.parent
U = [{"role": "user", "content": "What is 2+2?"}]


def demo(i: int, **kw) -> dict:
    return {"id": f"d{i}", "messages": U + [{"role": "assistant", "content": f"4 ({i})"}], **kw}


def pref(i: int, **kw) -> dict:
    return {"id": f"p{i}", "prompt": U, "chosen": [{"role": "assistant", "content": f"4 ({i})"}],
            "rejected": [{"role": "assistant", "content": "5"}], **kw}


def lines(*rows: object) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


BIG = b'{"messages": [{"role": "user", "content": "' + b"x" * (17 * 1024 * 1024) + b'"}]}'

# (name, the stage whose input it is, file content, what the one line says after the file name)
CASES = [
    ("non_utf8", "sft", lines(demo(0), b'{"messages": [{"role": "user", "content": "caf\xe9"}]}'),
     ":2: not UTF-8 text (byte 0xe9 at column 47)"),
    ("empty", "sft", b"", ": no records (the input is empty"),
    ("whitespace_only", "dpo", b"  \n\t\n\n", ": no records (the input is empty"),
    ("json_array", "sft", json.dumps([demo(0), demo(1)]).encode(), ":1: the file is a JSON array"),
    ("messages_string", "sft", lines(demo(0), {"messages": "hello"}), ":2: 'messages' must be a list"),
    ("null_content", "sft", lines(demo(0), {"messages": U + [{"role": "assistant", "content": None}]}),
     ":2: messages[1].content is null"),
    ("line_over_limit", "sft", lines(demo(0), BIG), ":2: line longer than 16 MB"),
    ("unknown_role", "sft", lines({"messages": [{"role": "robot", "content": "x"}]}), ":1: messages[0].role must be"),
    ("non_dict_row", "dpo", lines(pref(0), 42), ":2: a record must be a JSON object, got int"),
    ("list_row", "sft", lines(demo(0), [1, 2]), ":2: a record must be a JSON object, got list"),
    ("invalid_json", "dpo", lines(pref(0), b'{"prompt": [}', pref(1)), ":2: invalid JSON"),
    ("missing_rejected", "dpo", lines(pref(0), {"prompt": U, "chosen": pref(1)["chosen"]}), ":2: 'rejected' is missing"),
    ("text_for_dpo", "dpo", lines({"text": "The sky is blue."}), ":1: a language-modelling row ('text') where preference"),
    ("unpaired_preference", "dpo", lines({"prompt": "Sky?", "completion": "Blue", "label": True}),
     ":1: an unpaired preference row"),
    ("chosen_equals_rejected", "dpo", lines(*[pref(i, rejected=pref(i)["chosen"]) for i in range(3)]),
     ": 3 of 3 rows are unusable (chosen_equals_rejected: 3; first: {path}:1"),
    ("chosen_not_assistant", "dpo", lines(pref(0), pref(1, chosen=[{"role": "user", "content": "4"}])),
     ": 1 of 2 rows are unusable (completion_not_assistant: 1; first: {path}:2"),
    ("no_assistant_turn", "sft", lines(*[{"messages": U, "id": f"q{i}"} for i in range(3)]),
     ": 3 of 3 rows are unusable (no_assistant_turn: 3; first: {path}:1"),
    ("conflicting_ids", "sft", lines(demo(0), demo(1), dict(demo(2), id="d0")),
     ": 1 of 3 rows are unusable (conflicting_id: 1; first: {path}:3"),
]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("good")
    (d / "demos.jsonl").write_bytes(lines(*[demo(i) for i in range(4)]))
    (d / "prefs.jsonl").write_bytes(lines(*[pref(i) for i in range(4)]))
    return {"sft": d / "demos.jsonl", "dpo": d / "prefs.jsonl"}


def recipe(tmp: Path, model: Path, sft_input: Path, dpo_input: Path) -> Path:
    train = {"max_steps": 1, "per_device_train_batch_size": 2}
    data = {"output_dir": str(tmp / "run"), "model": {"path": str(model)},
            "stages": [{"kind": "sft", "input": str(sft_input), "max_length": 64, "train": train},
                       {"kind": "dpo", "input": str(dpo_input), "model": "@sft", "max_length": 64, "train": train}]}
    p = tmp / "recipe.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "posttrain.cli", *args], capture_output=True, text=True, env=env, check=False,
                          cwd=ROOT, timeout=300)


@pytest.mark.parametrize("name,stage,content,says", CASES, ids=[c[0] for c in CASES])
def test_bad_file_is_one_line_everywhere(tiny_model_dir, tmp_path, good, name, stage, content, says):
    bad = tmp_path / f"{name}.jsonl"
    bad.write_bytes(content)
    expected = f"{bad}{says.format(path=bad)}"
    inputs = dict(good)
    inputs[stage] = bad
    r = recipe(tmp_path, tiny_model_dir, inputs["sft"], inputs["dpo"])
    for command in ("validate", "run"):
        res = cli(command, str(r))
        err = res.stderr.strip().splitlines()
        assert res.returncode != 0, (command, res.stdout, res.stderr)
        assert "Traceback" not in res.stderr, (command, res.stderr)
        assert len(err) == 1, (command, res.stderr)
        assert expected in err[0], (command, err[0])
    # nothing half-written: no output folder, so no manifest and no model
    assert not (tmp_path / "run").exists()
    # a stage reading the same file at run time (an @stage input is only there then): the same one line
    with pytest.raises(RecordError) as e:
        read_input(str(bad), "demonstration" if stage == "sft" else "preference", lambda p: p)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_good_files_pass_validate(tiny_model_dir, tmp_path, good):
    res = cli("validate", str(recipe(tmp_path, tiny_model_dir, good["sft"], good["dpo"])))
    assert res.returncode == 0, res.stderr
    assert "ok (2 stages: sft, dpo)" in res.stdout


def test_line_limit_is_configurable(tmp_path):
    from posttrain.core.inputs import DataSection

    p = tmp_path / "d.jsonl"
    p.write_bytes(lines(demo(0), {"messages": U + [{"role": "assistant", "content": "y" * 3000}]}))
    read_input(str(p), "demonstration", lambda x: x)  # under the default 16 MB
    with pytest.raises(RecordError, match=r"d.jsonl:2: line longer than 0.001 MB"):
        read_input(str(p), "demonstration", lambda x: x, data=DataSection(max_line_mb=0.001))


def test_torn_last_line_is_skipped_not_an_error(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(lines(demo(0), demo(1)) + b'{"id": "d2", "messages": [{"role": "us')
    recs, st = read_input(str(p), "demonstration", lambda x: x)
    assert [r["id"] for r in recs] == ["d0", "d1"] and st["sources"][str(p)]["read"] == 2
