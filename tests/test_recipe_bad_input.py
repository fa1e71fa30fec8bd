"""Bad recipes and overrides get one clear line naming the file and key, exit 2, no traceback (issue 15)."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.cli import main

OK = """output_dir: {out}
model: {{path: {model}}}
stages:
  - kind: sft
    input: {data}
    train: {{max_steps: 1}}
"""

BOMB = ("description: &a [x, x, x, x, x, x, x, x, x]\noutput_dir: x\nstages:\n - &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
        " - &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n - &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n - &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
        " - &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n - &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n - [*g,*g,*g,*g,*g,*g,*g,*g,*g]\n")


@pytest.fixture
def recipe(tmp_path, tiny_model_dir) -> Path:
    data = Path(__file__).resolve().parents[1] / "recipes" / "data" / "sft_sample.jsonl"
    p = tmp_path / "r.yaml"
    p.write_text(OK.format(out=tmp_path / "out", model=tiny_model_dir, data=data))
    return p


def _one_line_error(capsys, argv: list[str], *needles: str) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


@pytest.mark.parametrize("override, needles", [
    ("seed", ("override 'seed'", "KEY.PATH=VALUE")),
    ("stages.sft.train.max_steps=99999999999999999999999", ("stages[0].train.max_steps", "out of range")),
    ("stages.sft.train.learning_rate=.nan", ("stages[0].train.learning_rate", "finite")),
    ("stages.sft.train.learning_rate=1e400", ("stages[0].train.learning_rate", "finite")),
    ("stages.sft.train.learning_rate=nan", ("stages[0].train.learning_rate", "expected a number")),
    ("stages.sft.train.per_device_train_batch_size=0", ("stages[0].train", ">= 1")),
    ("stages.sft.nonsense=1", ("stages[0]", "nonsense")),
    ("stages=[]", ("no stages",)),
])
def test_bad_override_is_one_line(capsys, recipe, override, needles):
    _one_line_error(capsys, ["validate", str(recipe), override], str(recipe.name), *needles)


def test_the_good_recipe_validates(capsys, recipe):
    assert main(["validate", str(recipe)]) == 0


@pytest.mark.parametrize("content, needles", [
    (b"output_dir: x\xff\xfe\nstages: []\n", ("r.yaml:1", "not UTF-8")),
    (b"output_dir: x\nstages: []\n", ("no stages",)),
    (b"output_dir: x\nstages:\n", ("stages: expected a list",)),
    (BOMB.encode(), ("more than 200,000 values",)),
    (b"output_dir: x\nstages: [\n", ("YAML syntax error",)),
    (b"- just\n- a list\n", ("must be a mapping",)),
])
def test_bad_recipe_file_is_one_line(capsys, tmp_path, content, needles):
    p = tmp_path / "r.yaml"
    p.write_bytes(content)
    _one_line_error(capsys, ["validate", str(p)], "r.yaml", *needles)
    _one_line_error(capsys, ["run", str(p)], "r.yaml", *needles)


@pytest.mark.parametrize("stage, needle", [
    ({"label_smoothing": 0.1}, "label_smoothing has no effect with loss_type ['sigmoid']"),
    ({"loss_type": ["nonsense"]}, "loss_type: unknown 'nonsense'"),
])
def test_dpo_keys_without_effect_or_unknown_to_trl_are_refused(capsys, tmp_path, tiny_model_dir, stage, needle):
    import yaml

    data = Path(__file__).resolve().parents[1] / "recipes" / "data" / "preference_sample.jsonl"
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "model": {"path": str(tiny_model_dir)},
                                 "stages": [{"kind": "dpo", "input": str(data), **stage}]}))
    _one_line_error(capsys, ["validate", str(p)], "r.yaml: stages[0]", needle)


DATA = Path(__file__).resolve().parents[1] / "recipes" / "data"


@pytest.mark.parametrize("stage, needle", [
    ({"kind": "if_feedback", "seeds": str(DATA / "if_seed_constraints.jsonl"), "queries": str(DATA / "prompts.jsonl"),
      "quality_filter": False, "quality_min_score": 6}, "quality_min_score has no effect with quality_filter: false"),
    ({"kind": "if_feedback", "seeds": str(DATA / "if_seed_constraints.jsonl"), "queries": str(DATA / "prompts.jsonl"),
      "back_translate": False, "back_translate_functions": 2},
     "back_translate_functions has no effect with back_translate: false"),
    ({"kind": "repurpose", "mode": "literary", "inputs": [str(DATA / "literary")], "grounded_queries": 3},
     "grounded_queries has no effect with mode: literary"),
    ({"kind": "repurpose", "mode": "roleplay", "inputs": [str(DATA / "characters")], "chunk_words": 100},
     "chunk_words has no effect with mode: roleplay"),
    ({"kind": "repurpose", "mode": "roleplay", "inputs": [str(DATA / "characters")], "check_refusals": False,
      "judge_sampling": {"temperature": 0.0}}, "judge_sampling has no effect with mode: roleplay and check_refusals"),
])
def test_synthesis_keys_without_effect_are_refused(capsys, tmp_path, tiny_model_dir, stage, needle):
    import yaml

    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "model": {"path": str(tiny_model_dir)},
                                 "stages": [stage]}))
    _one_line_error(capsys, ["validate", str(p)], "r.yaml: stages[0]", needle)
    switch = {k: v for k, v in stage.items() if k not in ("quality_min_score", "back_translate_functions",
                                                            "grounded_queries", "chunk_words", "judge_sampling")}
    p.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "model": {"path": str(tiny_model_dir)},
                                 "stages": [switch]}))
    assert main(["validate", str(p)]) == 0, capsys.readouterr().err  # without the key it validates
