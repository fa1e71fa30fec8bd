"""A shortened main job: the demo recipe with fewer steps, same stages, end to end on the real backends."""

import json
from pathlib import Path

import pytest

from posttrain.stages import load_recipe, recipe_from_dict
from posttrain.core.records import read_records

ROOT = Path(__file__).resolve().parents[1]

SHORT = [
    "stages.task.n_sft=600", "stages.task.n_prompts=24", "stages.task.n_eval=32",
    "stages.sft.train.num_train_epochs=2",
    "stages.rejection_sampling.k=4",
    "stages.reward.train.num_train_epochs=1",
    "stages.online_dpo_merge.episodes=2", "stages.online_dpo_merge.prompts_per_episode=8",
    "stages.online_dpo_merge.sampling.n=4",
    "stages.online_dpo_plain.episodes=2", "stages.online_dpo_plain.prompts_per_episode=8",
    "stages.online_dpo_plain.sampling.n=4",
]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    pytest.importorskip("vllm")
    out = tmp_path_factory.mktemp("demo") / "run"
    recipe = load_recipe(ROOT / "recipes" / "demo" / "tiny.yaml", [f"output_dir={out}", *SHORT])
    results = recipe.run()
    return out, results


def test_every_stage_completes_and_writes_records(demo_run):
    out, results = demo_run
    names = ["tiny", "task", "sft", "rejection_sampling", "reward", "dpo", "online_dpo_merge", "online_dpo_plain",
             "eval", "report"]
    assert list(results) == names
    for n in names:
        assert (out / n / "manifest.json").exists(), n
    assert len(read_records(out / "task" / "sft.jsonl", "demonstration")) == 600
    assert read_records(out / "rejection_sampling" / "demonstrations.jsonl", "demonstration")
    prefs = read_records(out / "rejection_sampling" / "preferences.jsonl", "preference")
    assert prefs and all(p["chosen"] != p["rejected"] for p in prefs)
    for n in ("sft", "reward", "dpo"):
        assert (out / n / "loss_log.jsonl").read_text().strip(), n
    for n in ("online_dpo_merge", "online_dpo_plain"):
        eps = [json.loads(x) for x in (out / n / "metrics.jsonl").read_text().splitlines()]
        assert len(eps) == 2 and all("reward_mean" in e for e in eps)


def test_sft_beats_the_untrained_model(demo_run):
    out, _ = demo_run
    rows = {r["checkpoint"]: r for r in map(json.loads, (out / "eval" / "eval.jsonl").read_text().splitlines())}
    assert set(rows) == {"untrained", "sft", "dpo", "online_dpo+merging", "online_dpo"}
    assert rows["sft"]["accuracy"] > rows["untrained"]["accuracy"]
    assert rows["sft"]["format_rate"] >= 0.9 > rows["untrained"]["format_rate"]
    assert rows["sft"]["kl_to_ref"] == pytest.approx(0.0, abs=1e-4)  # the SFT model is the KL reference
    for r in rows.values():
        assert "reward_mean" in r and "length_mean" in r


def test_report_and_plots(demo_run):
    out, _ = demo_run
    report = (out / "report.md").read_text()
    assert "| checkpoint |" in report and "## Findings" in report and "## Sample responses" in report
    assert "held-out accuracy" in report and "Online DPO" in report
    for png in ("loss.png", "reward.png", "accuracy.png"):
        assert (out / png).stat().st_size > 1000, png


def test_rerun_skips_everything(demo_run):
    out, _ = demo_run
    before = (out / "sft" / "model.safetensors").stat().st_mtime
    recipe = load_recipe(ROOT / "recipes" / "demo" / "tiny.yaml", [f"output_dir={out}", *SHORT])
    results = recipe.run()
    assert all(m["seconds"] >= 0 for m in results.values())
    assert (out / "sft" / "model.safetensors").stat().st_mtime == before


def _table(run_dir: Path) -> list[dict]:
    """Eval rows without the machine-specific model paths."""
    rows = [json.loads(x) for x in (run_dir / "eval" / "eval.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "path"} for r in rows]


@pytest.mark.slow
def test_a_second_run_gives_the_same_table(demo_run, tmp_path):
    """The README's numbers must reproduce: same recipe, same seed, fresh folder -> identical rows and report."""
    out, _ = demo_run
    again = tmp_path / "again"
    load_recipe(ROOT / "recipes" / "demo" / "tiny.yaml", [f"output_dir={again}", *SHORT]).run()
    assert _table(again) == _table(out)
    strip = lambda p: [x for x in p.read_text().splitlines() if "Run folder" not in x]  # noqa: E731
    assert strip(again / "report.md") == strip(out / "report.md")
    assert "## Findings" in (again / "report.md").read_text()

