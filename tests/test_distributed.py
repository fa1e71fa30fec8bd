"""SFT then DPO as 2 CPU processes (gloo) under DeepSpeed ZeRO-2 and ZeRO-3 vs one process.

The 2-process runs use the shipped accelerate configs (recipes/accelerate/zero{2,3}.yaml) with
``--num_processes 2 --mixed_precision no`` and one row/pair per device; the single-process run uses
two per device, so every optimizer step sees the same global batch and the per-step losses
(token-weighted for SFT, pair mean for DPO) must agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from posttrain.core.records import write_records
from tests.conftest import free_port
from tests.test_dpo import make_prefs
from tests.test_sft import make_demos

ROOT = Path(__file__).resolve().parents[1]


def _recipe(tmp: Path, model: Path, per_device: int, name: str) -> Path:
    train = {"learning_rate": 1e-3, "min_learning_rate": 1e-4, "max_steps": 3,
             "per_device_train_batch_size": per_device, "seed": 0}
    d = {"output_dir": str(tmp / name), "model": {"path": str(model)}, "stages": [
        {"kind": "sft", "input": str(tmp / "demos.jsonl"), "max_length": 96, "train": train},
        {"kind": "dpo", "input": str(tmp / "prefs.jsonl"), "model": "@sft", "max_length": 64,
         "train": {**train, "learning_rate": 5e-4, "min_learning_rate": 5e-5}}]}
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _losses(run: Path, stage: str) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / stage / "loss_log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_zero2_zero3_two_processes_match_single(tiny_model_dir, tmp_path):
    from posttrain.stages import load_recipe, recipe_from_dict

    write_records(tmp_path / "demos.jsonl", make_demos(16))
    write_records(tmp_path / "prefs.jsonl", make_prefs(12))
    single = load_recipe(_recipe(tmp_path, tiny_model_dir, 2, "single")).run()
    assert single["sft"]["summary"]["distributed"]["world_size"] == 1
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="",
               TORCH_EXTENSIONS_DIR=str(ROOT / ".torch_extensions"), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    for stage in (2, 3):
        name = f"zero{stage}"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "recipes" / "accelerate" / f"{name}.yaml"), "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--main_process_port", str(free_port()),
               "-m", "posttrain.cli", "run", str(_recipe(tmp_path, tiny_model_dir, 1, name))]
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert p.returncode == 0, p.stderr[-4000:]
        for kind in ("sft", "dpo"):
            man = json.loads((tmp_path / name / kind / "manifest.json").read_text())
            info = man["summary"]["distributed"]
            assert (info["world_size"], info["deepspeed"], info["zero_stage"]) == (2, True, stage)
            ref, got = _losses(tmp_path / "single", kind), _losses(tmp_path / name, kind)
            assert len(got) == len(ref) == 3
            assert got == pytest.approx(ref, rel=1e-4, abs=1e-5), (name, kind, got, ref)
