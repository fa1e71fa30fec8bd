"""Strict recipes: one-line errors naming file and key, overrides, resume, every shipped recipe validates."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.core.config import ConfigError
from posttrain.stages import load_recipe, recipe_from_dict
from posttrain.core.sampling.scripted import ScriptedSampler

ROOT = Path(__file__).resolve().parents[1]

GOOD = """\
output_dir: {out}
seed: 1
model:
  path: "@tiny"
stages:
  - kind: make_tiny_model
    name: tiny
  - kind: generate
    input: {data}
    sampling:
      n: 2
      temperature: 0.5
      max_tokens: 8
"""


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text("\n".join(json.dumps({"id": f"p{i}", "prompt": f"question {i}"}) for i in range(3)) + "\n")
    return p


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def good(tmp_path, data):
    return GOOD.format(out=tmp_path / "out", data=data)


def test_good_recipe_loads(tmp_path, data):
    r = load_recipe(write(tmp_path, good(tmp_path, data)))
    assert [s.name for s in r.stages] == ["tiny", "generate"]
    assert r.stages[1].config.sampling.n == 2 and r.stages[1].config.sampling.temperature == 0.5


@pytest.mark.parametrize("edit,key,expect", [
    (("      n: 2", "      m: 2"), "stages[1].sampling.m", "unknown key"),
    (("      temperature: 0.5", "      temperature: hot"), "stages[1].sampling.temperature", "expected a number"),
    (("      max_tokens: 8", "      max_tokens: 8.5"), "stages[1].sampling.max_tokens", "expected an integer"),
    (("seed: 1", "seed: [1]"), "seed", "expected an integer"),
    (("  - kind: generate", "  - kind: generat"), "stages[1].kind", "unknown stage kind"),
    (("    input: ", "    limit: 3\n    inpt: "), "stages[1].inpt", "unknown key"),
])
def test_bad_recipes_name_file_and_key(tmp_path, data, edit, key, expect):
    text = good(tmp_path, data).replace(*edit)
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert str(p) in msg and key in msg and expect in msg and "\n" not in msg


def test_missing_required_key(tmp_path, data):
    text = good(tmp_path, data).replace(f"    input: {data}\n", "")
    p = write(tmp_path, text)
    with pytest.raises(ConfigError, match=r"r.yaml: stages\[1\].input: missing required key"):
        load_recipe(p)
    p = write(tmp_path, "stages: []\n")
    with pytest.raises(ConfigError, match=r"r.yaml: output_dir: missing required key"):
        load_recipe(p)


def test_missing_input_file(tmp_path, data):
    p = write(tmp_path, good(tmp_path, tmp_path / "nope.jsonl"))
    with pytest.raises(ConfigError, match=r"r.yaml: stages\[1\].input: input file not found: .*nope.jsonl"):
        load_recipe(p)


def test_stage_reference_must_be_earlier(tmp_path, data):
    text = good(tmp_path, "'@later/records.jsonl'")
    with pytest.raises(ConfigError, match=r"stages\[1\].input: '@later/records.jsonl' must name an earlier stage"):
        load_recipe(write(tmp_path, text))


def test_yaml_syntax_error_gives_line(tmp_path, data):
    text = good(tmp_path, data).replace("      n: 2", "      n: [2")
    with pytest.raises(ConfigError, match=r"r.yaml:\d+: YAML syntax error"):
        load_recipe(write(tmp_path, text))


def test_overrides(tmp_path, data):
    p = write(tmp_path, good(tmp_path, data))
    r = load_recipe(p, ["stages[1].sampling.n=4", "stages.generate.sampling.temperature=7e-1", "seed=3"])
    assert r.stages[1].config.sampling.n == 4 and r.stages[1].config.sampling.temperature == 0.7
    assert r.file.seed == 3
    with pytest.raises(ConfigError, match=r"r.yaml: stages\[1\].sampling.n: expected an integer"):
        load_recipe(p, ["stages[1].sampling.n=many"])
    with pytest.raises(ConfigError, match=r"r.yaml: stages\[1\].sampling.nn: unknown key"):
        load_recipe(p, ["stages.generate.sampling.nn=1"])
    with pytest.raises(ConfigError, match="no stage named 'nope'"):
        load_recipe(p, ["stages.nope.x=1"])
    with pytest.raises(ConfigError, match="expected KEY.PATH=VALUE"):
        load_recipe(p, ["seed"])


def test_run_writes_resolved_recipe_and_resumes(tmp_path, data):
    p = write(tmp_path, good(tmp_path, data))
    calls = []
    sampler = ScriptedSampler(lambda prompt, j: calls.append(1) or f"answer {j}")
    r = load_recipe(p)
    res = r.run(sampler=sampler)
    out = tmp_path / "out"
    assert (out / "recipe.resolved.yaml").exists() and (out / "generate" / "manifest.json").exists()
    assert res["generate"]["summary"]["records"] == 6 and len(calls) == 6
    # re-run: both stages are complete and skipped, nothing sampled again
    load_recipe(p).run(sampler=sampler)
    assert len(calls) == 6
    # a killed stage (no manifest) resumes: written ids are not sampled again
    (out / "generate" / "manifest.json").unlink()
    lines = (out / "generate" / "records.jsonl").read_text().splitlines()
    (out / "generate" / "records.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])
    load_recipe(p).run(sampler=sampler)
    recs = [json.loads(x) for x in (out / "generate" / "records.jsonl").read_text().splitlines()]
    assert len(recs) == 6 and len({x["id"] for x in recs}) == 6
    # changed config: the old output is moved aside, never deleted
    load_recipe(p, ["stages.generate.limit=1"]).run(sampler=sampler)
    assert list(out.glob("generate.old-*/records.jsonl"))
    assert len((out / "generate" / "records.jsonl").read_text().splitlines()) == 2


def test_cli_validate_errors_are_one_line(tmp_path, data):
    p = write(tmp_path, good(tmp_path, data).replace("seed: 1", "sed: 1"))
    r = subprocess.run([sys.executable, "-m", "posttrain.cli", "validate", str(p)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "sed: unknown key (did you mean 'seed'?)" in r.stderr


RECIPES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "recipes").rglob("*.yaml")
                 if "accelerate" not in p.parts and "data" not in p.parts)  # recipes/data holds inputs, not recipes


def _hub_ids(path: Path) -> set[str]:
    """Every value of a recipe that names a hub model (org/name, not a local path)."""
    import yaml

    from posttrain.core.modelref import looks_like_hub_id

    found: set[str] = set()

    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, str) and looks_like_hub_id(x) and not (path.parent / x).exists():
            found.add(x)
    walk(yaml.safe_load(path.read_text()))
    return found


@pytest.mark.parametrize("path", RECIPES)
def test_every_shipped_recipe_validates(path, hub_cache):
    # model references included: hub ids resolve through the (here: local) Hugging Face cache
    hub_cache({repo: None for repo in _hub_ids(ROOT / path)})
    load_recipe(ROOT / path)


def test_unresolvable_model_reference_is_one_line_naming_the_key(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "empty"), PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "posttrain.cli", "validate", "recipes/qwen2/7b.yaml"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == "", r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert line.startswith("error: recipes/qwen2/7b.yaml: model.path: cannot resolve model reference: 'Qwen/Qwen2-7B'")


def test_cli_overrides_may_follow_options(tmp_path, data, capsys):
    from posttrain.cli import main

    p = write(tmp_path, good(tmp_path, data))
    assert main(["validate", str(p), "seed=5"]) == 0
    assert main(["validate", str(p), "stages.generate.limit=x"]) == 2
    assert "stages[1].limit: expected an integer" in capsys.readouterr().err
    sampler_calls = []
    import posttrain.core.recipe as rmod

    orig = rmod.Recipe.run
    rmod.Recipe.run = lambda self, only=None, force=False, sampler=None: sampler_calls.append((only, self.file.seed)) or {}
    try:
        assert main(["run", str(p), "--only", "tiny,generate", "seed=9"]) == 0
    finally:
        rmod.Recipe.run = orig
    assert sampler_calls == [(["tiny", "generate"], 9)]
