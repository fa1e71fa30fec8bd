"""GPU-only checks (marker ``gpu``; skipped on machines without CUDA, as in CI here).

Not run on the CPU-only machines this project was built on: they exist so that a GPU host
(`pip install -e ".[gpu,test]"`, `pytest -m gpu`) checks the CUDA paths the CPU suite cannot.
"""

from __future__ import annotations

import json

import pytest

from tests.test_sft import make_demos, run_recipe, sft_recipe

pytestmark = pytest.mark.gpu

PROMPTS = [[{"role": "user", "content": "What is 12 + 7?"}], [{"role": "user", "content": "Name three colors."}]]


def test_vllm_on_cuda_greedy_equals_hf(tiny_model_dir):
    from posttrain.core.sampling import SamplerConfig, SamplingParams
    from posttrain.core.sampling.hf import HFSampler
    from posttrain.core.sampling.vllm_backend import VLLMSampler

    params = SamplingParams(temperature=0.0, max_tokens=12)
    hf = HFSampler(str(tiny_model_dir), cfg=SamplerConfig(device="cuda", dtype="float32"))
    h = hf.generate(PROMPTS, params)
    v = VLLMSampler(str(tiny_model_dir), cfg=SamplerConfig(backend="vllm", dtype="float32", max_model_len=1024,
                                                           gpu_memory_utilization=0.3))
    try:
        assert [x[0].text for x in v.generate(PROMPTS, params)] == [x[0].text for x in h]
    finally:
        v.close()


def test_packed_sft_with_flash_attention_matches_per_sequence(tiny_model_dir, tmp_path):
    pytest.importorskip("flash_attn")
    import torch
    from transformers import AutoTokenizer

    from posttrain.trainers.sft import SFTStageConfig, build_sft_trainer, prepare_rows
    from posttrain.core.trainkit import TrainArgs
    from posttrain.core.chat import training_template

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows, _ = prepare_rows(make_demos(12, seed=3, long_every=4), tok, training_template(tok), 512, "drop", True, "m")
    cfg = SFTStageConfig(input="x", max_length=512, train=TrainArgs(max_steps=1))
    tr = build_sft_trainer(cfg, str(tiny_model_dir), tok, rows, None, tmp_path, seed=0)
    model = tr.model.eval()
    assert model.config._attn_implementation == "flash_attention_2"
    batch = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in next(iter(tr.get_train_dataloader())).items()}
    pos = batch["position_ids"][0]
    starts = (pos == 0).nonzero().flatten().tolist() + [pos.numel()]
    varlen = {k: batch[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k") if k in batch}
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, **varlen).logits[0]
        for a, b in zip(starts, starts[1:]):
            single = model(input_ids=batch["input_ids"][:, a:b], use_cache=False).logits[0]
            torch.testing.assert_close(packed[a:b].float(), single.float(), atol=5e-2, rtol=5e-2)  # bf16


def test_sft_stage_trains_on_gpu(tiny_model_dir, tmp_path):
    from posttrain.core.records import write_records

    data = tmp_path / "demos.jsonl"
    write_records(data, make_demos(40))
    run_recipe(sft_recipe(tmp_path, tiny_model_dir, data, max_length=128, train={"num_train_epochs": 2}), tmp_path)
    log = [json.loads(x) for x in (tmp_path / "run" / "sft" / "loss_log.jsonl").read_text().splitlines()]
    assert sum(r["loss"] for r in log[-3:]) < sum(r["loss"] for r in log[:3]) - 1.0


# ---------------------------------------------------------------- Liger kernels (train.use_liger_kernel)

@pytest.fixture
def liger(monkeypatch):
    """liger-kernel present; the Qwen2 module globals it replaces (RoPE, RMSNorm, MLP classes) restored afterwards,
    so models built later in the session (and the liger-off run of the next test) are plain again."""
    pytest.importorskip("liger_kernel")
    from transformers.models.qwen2 import modeling_qwen2 as mq

    for name in ("apply_rotary_pos_emb", "Qwen2RMSNorm", "Qwen2MLP"):
        monkeypatch.setattr(mq, name, getattr(mq, name))


def _train_losses(tr) -> list[float]:
    tr.train()
    return [h["loss"] for h in tr.state.log_history if "loss" in h]


def _assert_liger(tr, on: bool) -> None:
    """Liger's layer kernels are in the model exactly when asked; its fused linear cross-entropy never is."""
    assert tr.args.use_liger_kernel is on
    if on:
        assert tr.args.liger_kernel_config["fused_linear_cross_entropy"] is False
    assert (tr.model.model.layers[0].mlp._get_name() == "LigerSwiGLUMLP") is on


def _assert_losses_match(on: list[float], off: list[float]) -> None:
    import torch

    assert len(on) == len(off) >= 3
    # the first step runs the same weights: only the kernels' rounding differs (fp32)
    assert on[0] == pytest.approx(off[0], rel=1e-4, abs=1e-5)
    # later steps drift with AdamW's sign-like first updates of tiny gradients, but stay close
    torch.testing.assert_close(torch.tensor(on), torch.tensor(off), rtol=2e-2, atol=1e-3)


def test_liger_null_resolves_on_with_a_gpu_and_liger(liger):
    from posttrain.core.trainkit import TrainArgs, use_liger

    assert use_liger(TrainArgs()) is True and use_liger(TrainArgs(use_liger_kernel=False)) is False


def test_sft_with_liger_matches_liger_off(tiny_model_dir, tmp_path, liger):
    from transformers import AutoTokenizer

    from posttrain.core.chat import training_template
    from posttrain.core.trainkit import TrainArgs
    from posttrain.trainers.sft import SFTStageConfig, build_sft_trainer, prepare_rows

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows, _ = prepare_rows(make_demos(16, seed=1), tok, training_template(tok), 256, "drop", True, "m")
    losses = {}
    for on in (False, True):  # off first: liger patches module globals (restored by the fixture)
        t = TrainArgs(max_steps=4, learning_rate=1e-4, min_learning_rate=1e-5, per_device_train_batch_size=2,
                      bf16=False, report_to=[], seed=0, use_liger_kernel=on)
        cfg = SFTStageConfig(input="x", max_length=256, packing=False, train=t)  # loss: chunked (TRL's LM head)
        out = tmp_path / f"liger-{on}"
        out.mkdir()
        tr = build_sft_trainer(cfg, str(tiny_model_dir), tok, rows, None, out, seed=0, dtype="float32", attn="sdpa")
        losses[on] = _train_losses(tr)
        _assert_liger(tr, on)
    _assert_losses_match(losses[True], losses[False])


def test_dpo_with_liger_matches_liger_off(tiny_model_dir, tmp_path, liger):
    from transformers import AutoTokenizer

    from posttrain.trainers.dpo import DPOStageConfig, DPOTrainArgs, build_dpo_trainer, pair_rows
    from tests.test_dpo import make_prefs

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows, _ = pair_rows(make_prefs(16, seed=2), "m")
    losses = {}
    for on in (False, True):
        t = DPOTrainArgs(max_steps=3, learning_rate=1e-4, min_learning_rate=1e-5, per_device_train_batch_size=4,
                         bf16=False, report_to=[], seed=0, use_liger_kernel=on)
        cfg = DPOStageConfig(input="x", max_length=128, train=t)
        out = tmp_path / f"liger-{on}"
        out.mkdir()
        tr = build_dpo_trainer(cfg, str(tiny_model_dir), tok, rows, None, out, 0, "float32", "sdpa")
        losses[on] = _train_losses(tr)
        _assert_liger(tr, on)
    _assert_losses_match(losses[True], losses[False])
