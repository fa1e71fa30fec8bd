"""Online merging optimizer: exact rules, statistics of the sparse cases, storage, the wrapper, and ZeRO-2/3.

Run as a script (``torchrun --nproc_per_node 2 tests/test_merging.py OUT``) it is the DeepSpeed worker
of ``test_zero_matches_single_process``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain.core.merging import (MergingConfig, check_model, merged_update, optimizer_class, sparsify,
                               sparsify_all, tau_from_checkpoints, wrap_optimizer)

ROOT = Path(__file__).resolve().parents[1]


def _rand(n, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * scale


# ---------------------------------------------------------------- deterministic cases (keep_rate = 1)

def test_ondare_keep1_is_exact_interpolation():
    delta, tau = _rand(1000, 0), _rand(1000, 1)
    out = merged_update(delta, tau, method="ondare", keep_rate=1.0, alpha=0.3)
    torch.testing.assert_close(out, 0.3 * tau + 0.7 * delta, rtol=0, atol=0)
    # alpha = 0 gives the base update back unchanged
    assert torch.equal(merged_update(delta, tau, method="ondare", keep_rate=1.0, alpha=0.0), delta)


def test_onties_sign_election_hand_made():
    tau = torch.tensor([1.0, -2.0, 0.0, 3.0, -1.0, 2.0])
    delta = torch.tensor([0.5, 1.0, -1.0, -4.0, -1.0, -2.0])
    # sum: [1.5, -1, -1, -1, -2, 0] -> elected signs [+, -, -, -, -, 0]
    out = merged_update(delta, tau, method="onties", keep_rate=1.0, alpha=0.25)
    # tau' = [1, -2, 0, 0, -1, 0]; delta' = [0.5, 0, -1, -4, -1, 0] (a tie cancels both terms)
    expect = torch.tensor([0.25 + 0.375, -0.5, -0.75, -3.0, -0.25 - 0.75, 0.0])
    torch.testing.assert_close(out, expect, rtol=0, atol=1e-7)


def test_onties_keep1_matches_rule_on_random_tensors():
    delta, tau = _rand(500, 2), _rand(500, 3)
    s = torch.sign(tau + delta)
    expect = 0.1 * tau * (torch.sign(tau) == s) + 0.9 * delta * (torch.sign(delta) == s)
    torch.testing.assert_close(merged_update(delta, tau, method="onties", keep_rate=1.0, alpha=0.1), expect)


def test_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        merged_update(torch.zeros(3), torch.zeros(3), method="dare", keep_rate=1, alpha=0)
    with pytest.raises(ValueError, match="shape"):
        merged_update(torch.zeros(3), torch.zeros(4), method="ondare", keep_rate=1, alpha=0)
    with pytest.raises(ValueError, match="keep_rate"):
        MergingConfig(keep_rate=0).check()


@pytest.mark.parametrize("method", ["ondare", "onties"])
@pytest.mark.parametrize("keep", [1.0, 0.1])
def test_sparse_tau_path_equals_dense(method, keep):
    delta = _rand(3000, 8).view(30, 100)
    st = sparsify(_rand(3000, 9), method, 0.05, torch.Generator().manual_seed(0))
    dense = st.dense().view(30, 100)
    a = merged_update(delta, st, method=method, keep_rate=keep, alpha=0.2, generator=torch.Generator().manual_seed(1))
    b = merged_update(delta, dense, method=method, keep_rate=keep, alpha=0.2, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- keep_rate < 1

def test_ondare_kept_fraction_and_unbiased():
    n, p, draws = 200, 0.1, 3000
    delta = _rand(n, 4) + 2.0  # non-zero entries so kept entries are visible
    g = torch.Generator().manual_seed(0)
    zero = torch.zeros(n)
    acc, kept = torch.zeros(n), 0
    for _ in range(draws):
        out = merged_update(delta, zero, method="ondare", keep_rate=p, alpha=0.0, generator=g)
        nz = out != 0
        kept += int(nz.sum())
        torch.testing.assert_close(out[nz], delta[nz] / p)  # kept entries are rescaled by 1/p
        acc += out
    frac = kept / (n * draws)
    sd = (p * (1 - p) / (n * draws)) ** 0.5
    assert abs(frac - p) < 5 * sd, frac
    mean = acc / draws
    sd_mean = delta.abs() * ((1 - p) / p / draws) ** 0.5
    z = ((mean - delta) / sd_mean).abs()
    assert z.max() < 5.0 and z.mean() < 1.2, (z.max(), z.mean())  # unbiased: E[D(delta)] = delta


def test_onties_keeps_top_fraction_by_magnitude():
    delta = _rand(1000, 5)
    out = merged_update(delta, torch.zeros(1000), method="onties", keep_rate=0.05, alpha=0.0)
    kept = out != 0
    assert int(kept.sum()) == 50
    assert delta[kept].abs().min() >= delta[~kept].abs().max()
    torch.testing.assert_close(out[kept], delta[kept])


def test_sparsify_dare_and_ties_and_storage():
    tau = _rand(100_000, 6)
    p = 0.01
    d = sparsify(tau, "ondare", p, torch.Generator().manual_seed(1))
    k = d.indices.numel()
    assert abs(k / tau.numel() - p) < 5 * (p * (1 - p) / tau.numel()) ** 0.5
    torch.testing.assert_close(d.values, tau[d.indices.long()] / p)  # DARE rescales the kept entries
    t = sparsify(tau, "onties", p)
    assert t.indices.numel() == 1000
    assert tau[t.indices.long()].abs().min() >= tau.abs().topk(1000).values.min()
    dense_bytes = tau.numel() * 4
    # int32 index + fp32 value per kept entry: ~2 * keep_rate of the fp32 parameter memory
    assert t.nbytes() == 1000 * 8 and d.nbytes() <= 2.2 * p * dense_bytes
    # dense round trip and slicing (a rank's slice of a parameter)
    torch.testing.assert_close(t.dense()[t.indices.long()], t.values)
    sl = t.slice(40_000, 20_000)
    torch.testing.assert_close(sl.dense(), t.dense()[40_000:60_000])
    assert sparsify(tau, "ondare", 1.0).indices is None  # keep_rate 1 stays dense


def test_tau_mask_unbiased_over_seeds_and_same_on_every_rank():
    tau = _rand(50, 7) + 3.0
    acc = torch.zeros(50)
    for s in range(2000):
        acc += sparsify_all([("w", tau)], "ondare", 0.2, seed=s)["w"].dense()
    z = (acc / 2000 - tau).abs() / (tau.abs() * (0.8 / 0.2 / 2000) ** 0.5)
    assert z.max() < 5.0
    a = sparsify_all([("w", tau)], "ondare", 0.2, seed=3)["w"]
    b = sparsify_all([("w", tau)], "ondare", 0.2, seed=3)["w"]
    assert torch.equal(a.indices, b.indices)  # seeded by (seed, name): every rank draws the same mask


# ---------------------------------------------------------------- the optimizer wrapper

def _toy(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 5))


def _data():
    g = torch.Generator().manual_seed(11)
    return torch.randn(8, 7, generator=g), torch.randn(8, 5, generator=g)


def _taus(model, scale=1e-2):
    return {n: _rand(p.numel(), 100 + i, scale).view_as(p) for i, (n, p) in enumerate(model.named_parameters())}


def _train_plain(method, keep_rate=1.0, alpha=0.3, steps=3, chunk_numel=1 << 27, merge=True):
    model = _toy()
    x, y = _data()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    if merge:
        opt = wrap_optimizer(opt, model, MergingConfig(method=method, keep_rate=keep_rate, alpha=alpha,
                                                       chunk_numel=chunk_numel), tau=_taus(model))
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", ["ondare", "onties"])
def test_wrapper_one_step_equals_rule(method):
    model, twin = _toy(), _toy()
    x, y = _data()
    taus = _taus(model)
    opt = wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model,
                         MergingConfig(method=method, keep_rate=1.0, alpha=0.3), tau=taus)
    ref = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    assert isinstance(opt, torch.optim.Optimizer) and isinstance(opt, optimizer_class())
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)  # trainers build schedulers on it
    old = {n: p.detach().clone() for n, p in model.named_parameters()}
    for m, o in ((model, opt), (twin, ref)):
        torch.nn.functional.mse_loss(m(x), y).backward()
        o.step()
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        expect = old[n] + merged_update(q.detach() - old[n], taus[n], method=method, keep_rate=1.0, alpha=0.3)
        torch.testing.assert_close(p.detach(), expect, rtol=0, atol=1e-7)


def test_chunked_step_equals_single_chunk_and_merge_changes_training():
    a = _train_plain("ondare")
    b = _train_plain("ondare", chunk_numel=20)  # several chunks, each stepped on its own
    c = _train_plain("ondare", merge=False)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=1e-7)
    assert max((a[n] - c[n]).abs().max().item() for n in a) > 1e-3


def test_tau_from_checkpoints_and_lora_error(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for i, p in enumerate(base.parameters()):
            p.add_(_rand(p.numel(), 200 + i, 1e-2).view_as(p))
    base.save_pretrained(tmp_path / "base")
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    names = [n for n, _ in policy.named_parameters()]
    taus = tau_from_checkpoints(tiny_model_dir, tmp_path / "base", names, "onties", 1.0)
    bp = dict(base.named_parameters())
    for n, p in policy.named_parameters():
        torch.testing.assert_close(taus[n].dense().view_as(p), (p - bp[n]).detach())
    opt = wrap_optimizer(torch.optim.AdamW(policy.parameters()), policy, MergingConfig(keep_rate=0.01),
                         reference=str(tiny_model_dir), base=str(tmp_path / "base"))
    total = sum(p.numel() for p in policy.parameters()) * 4
    assert opt.tau_nbytes() <= 2.2 * 0.01 * total
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(policy, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="LoRA"):
        check_model(lora)


# ---------------------------------------------------------------- DeepSpeed ZeRO-2 / ZeRO-3, 2 CPU processes

ZERO_CASES = [(2, "ondare"), (2, "onties"), (3, "ondare"), (3, "onties")]
SPARSE_CASES = [(2, "onties"), (3, "ondare")]  # keep_rate < 1: sparse tau sliced per rank; random/top-k per slice


def _zero_worker(out: str) -> None:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    x, y = _data()
    per = x.shape[0] // world
    xs, ys = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
    results = {}
    for stage, method, keep in [(s, m, 1.0) for s, m in ZERO_CASES] + [(s, m, 0.3) for s, m in SPARSE_CASES]:
        model = _toy()
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        opt = wrap_optimizer(inner, model, MergingConfig(method=method, keep_rate=keep, alpha=0.3), tau=_taus(model))
        cfg = {"train_batch_size": x.shape[0], "train_micro_batch_size_per_gpu": per,
               "gradient_accumulation_steps": 1, "zero_optimization": {"stage": stage},
               "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        for _ in range(3):
            loss = torch.nn.functional.mse_loss(engine(xs), ys)
            engine.backward(loss)
            engine.step()
        results[f"{stage}-{method}" + ("" if keep == 1.0 else "-sparse")] = {n: safe_get_full_fp32_param(p).detach().clone()
                                        for n, p in engine.module.named_parameters()}
        assert opt.steps == 3
    if rank == 0:
        torch.save(results, out)


@pytest.mark.slow
def test_zero_matches_single_process(tmp_path):
    pytest.importorskip("deepspeed")
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "zero.pt"
    env = dict(os.environ, DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(ROOT / ".torch_extensions"),
               OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(Path(__file__)), str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    got = torch.load(out)
    plain = _train_plain("ondare", merge=False)
    for stage, method in ZERO_CASES:
        ref = _train_plain(method)
        for n, v in ref.items():
            torch.testing.assert_close(got[f"{stage}-{method}"][n], v, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, n=n: f"ZeRO-{stage} {method} {n}: {m}")
        # and the merge really happened under ZeRO (not just plain AdamW)
        assert max((got[f"{stage}-{method}"][n] - plain[n]).abs().max().item() for n in ref) > 1e-3
    for stage, method in SPARSE_CASES:  # runs, stays finite, and the sparse tau moved the weights
        res = got[f"{stage}-{method}-sparse"]
        assert all(torch.isfinite(v).all() for v in res.values())
        assert max((res[n] - plain[n]).abs().max().item() for n in plain) > 1e-4


if __name__ == "__main__":
    _zero_worker(sys.argv[1])
