"""Qwen2-MoE (the 57B-A14B architecture) on a tiny model: ZeRO-3 leaf blocks, the router loss, 2 ranks vs 1.

The model is a tiny Qwen2-MoE built by ``posttrain make-tiny-model OUT --moe`` (4 experts, top 2, a
shared expert, ``router_aux_loss_coef`` 0.001 like the published checkpoint). Fast tests: the sparse
blocks are registered as ZeRO-3 leaf modules whenever DeepSpeed is in use (from the accelerate
launcher, or from ``train.deepspeed`` alone as under torchrun), and the SFT trainer adds the weighted
router load-balancing loss to the LM loss. Slow test: the ``sft`` stage under ZeRO-3 with 2 CPU
processes (gloo; the shipped ``zero3.yaml`` and ``ds_zero3.json``) ends and its first-step loss
matches one process without DeepSpeed on the same global batch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from posttrain.core.records import write_records
from tests.conftest import free_port
from tests.test_sft import make_demos

ROOT = Path(__file__).resolve().parents[1]
DS_ZERO3 = ROOT / "recipes" / "accelerate" / "ds_zero3.json"
BLOCK = "Qwen2MoeSparseMoeBlock"


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> Path:
    """The tiny Qwen2-MoE (+ reward/), built through the CLI's ``--moe`` flag."""
    from posttrain.cli import build_parser

    out = tmp_path_factory.mktemp("moe") / "model"
    a = build_parser().parse_args(["make-tiny-model", str(out), "--moe"])
    assert a.fn(a) == 0
    return out


@pytest.fixture
def no_deepspeed(monkeypatch):
    """No launcher DeepSpeed flag and no transformers DeepSpeed config in this process."""
    import transformers.integrations.deepspeed as hfds

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.setattr(hfds, "_hf_deepspeed_config_weak_ref", None)


def _leaves(model) -> list[str]:
    return [n for n, m in model.named_modules() if getattr(m, "_z3_leaf", False)]


# ---------------------------------------------------------------- fast


def test_tiny_moe_model_has_sparse_blocks(moe_dir):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = AutoConfig.from_pretrained(moe_dir)
    assert cfg.model_type == "qwen2_moe"
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.num_hidden_layers) == (4, 2, 2)
    assert cfg.router_aux_loss_coef > 0
    model = AutoModelForCausalLM.from_pretrained(moe_dir)
    blocks = [m for m in model.modules() if type(m).__name__ == BLOCK]
    assert len(blocks) == cfg.num_hidden_layers  # decoder_sparse_step 1: every layer is sparse
    for b in blocks:
        assert hasattr(b, "gate") and hasattr(b, "experts") and hasattr(b, "shared_expert")
    rm = AutoModelForSequenceClassification.from_pretrained(moe_dir / "reward", num_labels=1)
    assert type(rm).__name__ == "Qwen2MoeForSequenceClassification"
    assert sum(type(m).__name__ == BLOCK for m in rm.modules()) == cfg.num_hidden_layers


def test_prepare_moe_marks_sparse_blocks_as_zero3_leaves(moe_dir, no_deepspeed, monkeypatch):
    import torch
    import transformers.integrations.deepspeed as hfds
    from deepspeed.utils import get_z3_leaf_modules, z3_leaf_module
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from posttrain.core.trainkit import load_causal_lm, prepare_moe
    from reward.train import load_reward_model

    # Without DeepSpeed: the blocks are named, nothing is marked.
    model = load_causal_lm(str(moe_dir), "auto", "sdpa")
    assert prepare_moe(model) == [BLOCK] and _leaves(model) == []

    # accelerate launch (zero3.yaml) sets ACCELERATE_USE_DEEPSPEED: the loaders mark every layer's block.
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    model = load_causal_lm(str(moe_dir), "auto", "sdpa")
    assert _leaves(model) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(z3_leaf_module(model.model.layers[i].mlp) for i in range(2))
    assert {type(m).__name__ for m in get_z3_leaf_modules(model)} == {BLOCK}
    rm = load_reward_model(str(moe_dir / "reward"), "auto", "sdpa", None, 0)
    assert _leaves(rm) == ["model.layers.0.mlp", "model.layers.1.mlp"]

    # torchrun + train.deepspeed: transformers only keeps its ZeRO-3 config (the env flag is gone
    # again after TrainingArguments); the blocks must still be leaves.
    # (Loaded first: with the config active, from_pretrained would build the model under zero.Init.)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    model = load_causal_lm(str(moe_dir), "auto", "sdpa")
    assert _leaves(model) == []
    # What TrainingArguments(deepspeed=ds_zero3.json) registers once its "auto" values are filled.
    ds = hfds.HfDeepSpeedConfig({**json.loads(DS_ZERO3.read_text()), "train_micro_batch_size_per_gpu": 1,
                                 "train_batch_size": 2, "gradient_accumulation_steps": 1})
    assert hfds.is_deepspeed_zero3_enabled()
    assert prepare_moe(model) == [BLOCK]
    del ds
    assert _leaves(model) == ["model.layers.0.mlp", "model.layers.1.mlp"]

    # Dense models are left alone.
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    torch.manual_seed(0)
    dense = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    assert prepare_moe(dense) == [] and _leaves(dense) == []


def test_sft_trainer_adds_router_aux_loss(moe_dir, no_deepspeed, tmp_path):
    import torch
    from transformers import AutoTokenizer

    from posttrain.core.chat import training_template
    from posttrain.core.losses import full_logits_lm_loss
    from posttrain.core.trainkit import TrainArgs
    from posttrain.trainers.sft import SFTStageConfig, build_sft_trainer, prepare_rows

    tok = AutoTokenizer.from_pretrained(moe_dir)
    rows, _ = prepare_rows(make_demos(4), tok, training_template(tok), 128, "drop", True, "m")
    cfg = SFTStageConfig(input="x", max_length=128, train=TrainArgs(max_steps=1, report_to=[], seed=0))
    tr = build_sft_trainer(cfg, str(moe_dir), tok, rows, None, tmp_path, seed=0)
    model = tr.model
    coef = model.config.router_aux_loss_coef
    assert model.config.output_router_logits is True and coef == pytest.approx(0.001)
    assert tr.aux_loss_enabled and tr.router_aux_loss_coef == coef
    batch = next(iter(tr.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "position_ids" in batch  # packed, padding-free
    model.train()
    loss = tr.compute_loss(model, dict(batch))
    total = float(loss.detach())
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)  # config: router on
        ce = full_logits_lm_loss(model, dict(batch), None)
    assert out.aux_loss is not None and out.router_logits is not None
    aux = float(out.aux_loss)
    assert 1.0 < aux < 4.0  # Switch-style balance loss: about top_k (2) for a near-uniform router
    assert total == pytest.approx(float(ce) + coef * aux, abs=2e-5)
    assert total - float(ce) > 50 * 2e-5  # the aux term is really in the training loss
    loss.backward()
    assert all(b.gate.weight.grad is not None and b.gate.weight.grad.abs().sum() > 0
               for b in model.modules() if type(b).__name__ == BLOCK)


# ---------------------------------------------------------------- slow: 2 ranks under ZeRO-3 vs 1 process


def _recipe(tmp: Path, model: Path, per_device: int, name: str, deepspeed: Path | None) -> Path:
    train = {"learning_rate": 1e-3, "min_learning_rate": 1e-4, "max_steps": 2,
             "per_device_train_batch_size": per_device, "seed": 0, "report_to": []}
    if deepspeed:
        train["deepspeed"] = str(deepspeed)  # as the shipped recipes do (57b-a14b.yaml: ../accelerate/ds_zero3.json)
    d = {"output_dir": str(tmp / name), "model": {"path": str(model)},
         "stages": [{"kind": "sft", "input": str(tmp / "demos.jsonl"), "max_length": 128, "train": train}]}
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "sft" / "loss_log.jsonl").read_text().splitlines()]


def _run_group(cmd: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on timeout kill the whole group (the launcher and its ranks)."""
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"2-rank ZeRO-3 MoE run hung (> {timeout} s):\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


@pytest.mark.slow
def test_moe_sft_zero3_two_processes_match_single(moe_dir, no_deepspeed, tmp_path):
    from posttrain.stages import load_recipe

    # 8 demonstrations of ~47 tokens pack two per 128-token row: 4 rows = 2 steps of 2 rows.
    write_records(tmp_path / "demos.jsonl", make_demos(8))
    single = load_recipe(_recipe(tmp_path, moe_dir, 2, "single", None)).run()["sft"]["summary"]
    assert (single["distributed"]["world_size"], single["distributed"]["deepspeed"]) == (1, False)
    assert single["moe"] == {"leaf_modules": [BLOCK], "router_aux_loss_coef": pytest.approx(0.001)}

    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="",
               TORCH_EXTENSIONS_DIR=str(ROOT / ".torch_extensions"), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.pop("ACCELERATE_USE_DEEPSPEED", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes" / "accelerate" / "zero3.yaml"), "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--main_process_port", str(free_port()),
           "-m", "posttrain.cli", "run", str(_recipe(tmp_path, moe_dir, 1, "zero3", DS_ZERO3))]
    p = _run_group(cmd, env, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "'aux_loss'" in p.stdout + p.stderr  # TRL logged the router loss on the ranks
    man = json.loads((tmp_path / "zero3" / "sft" / "manifest.json").read_text())
    info = man["summary"]["distributed"]
    assert (info["world_size"], info["deepspeed"], info["zero_stage"]) == (2, True, 3)
    assert man["summary"]["steps"] == 2
    assert man["summary"]["moe"] == {"leaf_modules": [BLOCK], "router_aux_loss_coef": pytest.approx(0.001)}

    ref, got = _losses(tmp_path / "single"), _losses(tmp_path / "zero3")
    print(f"MoE SFT losses: single process {ref}, 2 ranks ZeRO-3 {got}")
    assert len(ref) == len(got) == 2
    # Same weights, same tokens: the LM loss agrees to float32 reduction order. The router loss is a
    # per-micro-batch statistic (each rank's own row vs both rows together), which shifts the total by
    # 0.001 x (difference of the balance losses): measured ~1e-6 (6.8370476 vs 6.8370490, then
    # 6.4021306 vs 6.4021311), the same tolerance as the dense test_distributed.py.
    assert got == pytest.approx(ref, rel=1e-4, abs=1e-5), (got, ref)
