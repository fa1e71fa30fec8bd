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
