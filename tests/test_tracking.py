"""Tracking (``train.report_to``): W&B runs read back offline, the missing-package error, the liger key.

The W&B test runs a two-stage recipe (sft through the HF Trainer path, online_dpo through its own
loop) with ``WANDB_MODE=offline`` and parses each stage's offline run file
(``OUT/<stage>/wandb/offline-run-*/run-*.wandb``: a LevelDB-style log of protobuf records; offline
runs have no ``wandb.Api`` and, in current wandb, no ``files/config.yaml``).
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from posttrain.core.config import ConfigError
from posttrain.core.records import write_records
from tests.test_sft import make_demos

PROMPTS = ["What is 12 + 7?", "Name three colors.", "Say hello.", "Count to five."]


def e_reward(prompts, responses, records):
    """How many letters 'e' a response has: spread even for a random model."""
    return [float(r.count("e")) for r in responses]


# ---------------------------------------------------------------- reading an offline W&B run

def read_wandb_records(path: Path) -> list:
    """The protobuf ``Record``s of an offline run file (W&B's LevelDB-style log: 7-byte file header, 32 KiB
    blocks, each chunk ``crc32 u32, length u16, type u8``; type 1 = whole record, 2/3/4 = first/middle/last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    buf = path.read_bytes()
    assert buf[:4] == b":W&B", f"{path}: not a W&B run file"
    block, pos, cur, out = 32768, 7, b"", []
    while pos + 7 <= len(buf):
        left = block - pos % block
        if left < 7:  # a block tail too short for a header is padding
            pos += left
            continue
        _, n, typ = struct.unpack("<IHB", buf[pos:pos + 7])
        if n == 0 and typ == 0:
            pos += left
            continue
        cur += buf[pos + 7:pos + 7 + n]
        pos += 7 + n
        if typ in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(cur)
            out.append(rec)
            cur = b""
    return out


def offline_run(stage_dir: Path) -> dict:
    """Name, group, job type, config and logged history keys of the one offline run in ``stage_dir/wandb``."""
    files = sorted(stage_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, f"expected one offline run in {stage_dir}/wandb, found {files}"
    run: dict = {"config": {}, "history": []}
    for rec in read_wandb_records(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run.update(name=rec.run.display_name, group=rec.run.run_group, job_type=rec.run.job_type,
                       project=rec.run.project)
            run["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update if i.key})
        elif kind == "config":
            run["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update if i.key})
        elif kind == "history":
            run["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                   for i in rec.history.item})
    return run


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B offline, quiet, with its config/cache folders in tmp_path (never the user's home)."""
    pytest.importorskip("wandb")
    for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                 "WANDB_DISABLE_GIT": "true", "WANDB_CONFIG_DIR": str(tmp_path / "wb" / "config"),
                 "WANDB_CACHE_DIR": str(tmp_path / "wb" / "cache"), "WANDB_DATA_DIR": str(tmp_path / "wb" / "data")
                 }.items():
        monkeypatch.setenv(k, v)
    for k in ("WANDB_NAME", "WANDB_PROJECT", "WANDB_RUN_GROUP", "WANDB_DIR", "WANDB_RUN_ID"):
        monkeypatch.delenv(k, raising=False)


# ---------------------------------------------------------------- W&B end to end

def test_wandb_runs_of_one_recipe_run_share_a_name_and_group_by_stage(tiny_model_dir, tmp_path, wandb_offline):
    from posttrain.stages import recipe_from_dict

    demos = tmp_path / "demos.jsonl"
    write_records(demos, make_demos(6))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": [{"role": "user", "content": t}]}) + "\n"
                               for i, t in enumerate(PROMPTS)))
    trackers = ["tensorboard", "wandb"]
    recipe = recipe_from_dict({
        "output_dir": str(tmp_path / "run"), "seed": 0, "model": {"path": str(tiny_model_dir)},
        "stages": [
            {"kind": "sft", "input": str(demos), "max_length": 128,
             "train": {"learning_rate": 1e-3, "max_steps": 2, "seed": 0, "report_to": trackers}},
            {"kind": "online_dpo", "name": "online", "input": str(prompts), "model": "@sft",
             "reward_functions": {f"{__name__}:e_reward": 1.0}, "episodes": 1, "prompts_per_episode": 2,
             "batch_size": 2, "kl_samples": 0, "sampling": {"n": 2, "temperature": 1.0, "max_tokens": 8},
             "train": {"learning_rate": 1e-3, "lr_schedule": "constant", "report_to": trackers}},
        ]}, tmp_path / "r.yaml")
    recipe.run()
    out = tmp_path / "run"
    sft, online = offline_run(out / "sft"), offline_run(out / "online")

    # one name for the recipe run, the stage as group, the kind as job type, our project
    assert sft["name"] == online["name"] and sft["name"].startswith("run-")
    assert (sft["group"], sft["job_type"]) == ("sft", "sft")
    assert (online["group"], online["job_type"]) == ("online", "online_dpo")
    assert sft["project"] == online["project"] == "qwen2-posttrain"
    # the config holds the whole resolved recipe (both stages), plus which stage this is
    resolved = json.loads(json.dumps(recipe.resolved_dict()))
    for run, stage in ((sft, "sft"), (online, "online")):
        assert run["config"]["recipe"] == resolved
        assert (run["config"]["stage"], run["config"]["run"]) == (stage, sft["name"])
    assert [s["name"] for s in sft["config"]["recipe"]["stages"]] == ["sft", "online"]
    # metrics: the HF Trainer's train/loss per step, the online loop's per-episode scalars
    losses = [h["train/loss"] for h in sft["history"] if "train/loss" in h]
    assert len(losses) == 2 and all(v == v for v in losses)
    assert any("online_dpo/reward_mean" in h for h in online["history"])
    # files: W&B and TensorBoard in the stage folder, nothing under checkpoints/
    for stage in ("sft", "online"):
        assert list((out / stage / "tensorboard").glob("events.out.tfevents.*"))
        assert not list((out / stage).glob("checkpoints/**/wandb"))
    import wandb

    assert wandb.run is None  # every stage finished its run


def test_recipe_run_name_is_shared_by_stages_and_env_overrides(monkeypatch):
    from posttrain.core import tracking

    monkeypatch.delenv("WANDB_NAME", raising=False)

    class File:
        output_dir = "runs/exp1"

    class Recipe:
        file = File()

    a, b = Recipe(), Recipe()
    name = tracking.recipe_run_name(a)
    assert name.startswith("exp1-") and tracking.recipe_run_name(a) == name
    tracking._RUN_STARTS[b] = "19990101-000000"
    assert tracking.recipe_run_name(b) == "exp1-19990101-000000"
    monkeypatch.setenv("WANDB_NAME", "mine")
    assert tracking.recipe_run_name(a) == "mine"


# ---------------------------------------------------------------- wandb not installed

def _wandb_recipe(tmp_path: Path) -> dict:
    demos = tmp_path / "demos.jsonl"
    write_records(demos, make_demos(2))
    return {"output_dir": str(tmp_path / "run"), "model": {"path": str(tmp_path)},
            "stages": [{"kind": "sft", "input": str(demos), "train": {"report_to": ["tensorboard", "wandb"]}}]}


def test_report_to_wandb_without_wandb_is_one_line(tmp_path, monkeypatch):
    from posttrain.core import tracking
    from posttrain.stages import recipe_from_dict

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    assert not tracking.wandb_available()
    with pytest.raises(ConfigError) as ei:
        recipe_from_dict(_wandb_recipe(tmp_path), tmp_path / "r.yaml", check_models=False)
    msg = str(ei.value)
    assert "\n" not in msg and "stages[0].train" in msg and "pip install 'qwen2-posttrain[wandb]'" in msg
    with pytest.raises(ConfigError, match=r"pip install 'qwen2-posttrain\[wandb\]'"):
        tracking.import_wandb()
    # the online DPO section (OptimArgs) is checked the same way; tensorboard alone needs nothing
    from posttrain.core.config import build
    from posttrain.core.trainkit import OptimArgs

    with pytest.raises(ConfigError, match=r"qwen2-posttrain\[wandb\]"):
        build(OptimArgs, {"report_to": ["wandb"]}, "stages[1].train", "r.yaml")
    assert build(OptimArgs, {"report_to": ["tensorboard"]}, "train", "r.yaml").report_to == ["tensorboard"]


# ---------------------------------------------------------------- use_liger_kernel and what trl_args passes

def _capture(**kw):
    return kw


@pytest.fixture
def trainkit_env(monkeypatch):
    """``set(gpu, liger)``: pretend a CUDA GPU and/or liger-kernel are (not) there."""
    from posttrain.core import trainkit

    def set_env(gpu: bool, liger: bool) -> None:
        monkeypatch.setattr(trainkit, "on_gpu", lambda: gpu)
        monkeypatch.setattr(trainkit, "liger_available", lambda: liger)

    return set_env


def test_use_liger_kernel_validates_and_resolves(trainkit_env, tmp_path):
    from posttrain.core.config import build
    from posttrain.core.trainkit import TrainArgs, trl_args, use_liger

    def args(data: dict) -> TrainArgs:
        return build(TrainArgs, {"bf16": False, **data}, "stages[0].train", "r.yaml")

    def err(data: dict) -> str:
        with pytest.raises(ConfigError) as ei:
            args(data)
        assert "\n" not in str(ei.value)
        return str(ei.value)

    trainkit_env(gpu=False, liger=False)  # this machine: CPU
    assert "needs a CUDA GPU" in err({"use_liger_kernel": True})
    assert use_liger(args({})) is False and use_liger(args({"use_liger_kernel": False})) is False
    a = trl_args(_capture, args({}), tmp_path, 0)
    assert a["use_liger_kernel"] is False and "liger_kernel_config" not in a and a["report_to"] == "none"
    assert "use train.use_liger_kernel" in err({"extra": {"use_liger_kernel": True}})
    assert "use train.report_to" in err({"extra": {"report_to": ["wandb"]}})
    assert "no effect" in err({"use_liger_kernel": False, "extra": {"liger_kernel_config": {"rope": False}}})

    trainkit_env(gpu=True, liger=False)  # a GPU without liger-kernel
    assert "pip install 'qwen2-posttrain[gpu]'" in err({"use_liger_kernel": True})
    assert use_liger(args({})) is False

    trainkit_env(gpu=True, liger=True)  # a GPU host with the gpu extra: null turns it on
    assert use_liger(args({})) is True and use_liger(args({"use_liger_kernel": False})) is False
    a = trl_args(_capture, args({"use_liger_kernel": True, "extra": {"liger_kernel_config": {"rope": False}}}),
                 tmp_path, 0)
    # Liger's layer kernels only: its fused linear cross-entropy would replace TRL's chunked LM head
    assert a["use_liger_kernel"] is True
    assert a["liger_kernel_config"] == {"rope": False, "fused_linear_cross_entropy": False}


def test_liger_key_in_a_recipe_on_cpu_is_one_line(tmp_path):
    import torch

    from posttrain.stages import recipe_from_dict

    if torch.cuda.is_available():
        pytest.skip("checks the CPU refusal")
    d = _wandb_recipe(tmp_path)
    d["stages"][0]["train"] = {"use_liger_kernel": True}
    with pytest.raises(ConfigError, match=r"stages\[0\]\.train: use_liger_kernel: true needs a CUDA GPU") as ei:
        recipe_from_dict(d, tmp_path / "r.yaml", check_models=False)
    assert "\n" not in str(ei.value)
