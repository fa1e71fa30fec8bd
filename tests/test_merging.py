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

from posttrain.core.merging import (
    MergingConfig,
    check_model,
    merged_update,
    optimizer_class,
    sparsify,
    sparsify_all,
    tau_from_checkpoints,
    wrap_optimizer,
)

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
    # sum: [1.5, -1, -1, -1, -2, 0] -> elected signs [+, -, -, -, -, +] (the reference elects + on a tie)
    out = merged_update(delta, tau, method="onties", keep_rate=1.0, alpha=0.25)
    # tau' = [1, -2, 0, 0, -1, 2]; delta' = [0.5, 0, -1, -4, -1, 0] (on the tie the positive term survives)
    expect = torch.tensor([0.25 + 0.375, -0.5, -0.75, -3.0, -0.25 - 0.75, 0.5])
    torch.testing.assert_close(out, expect, rtol=0, atol=1e-7)


def test_onties_keep1_matches_rule_on_random_tensors():
    delta, tau = _rand(500, 2), _rand(500, 3)
    s = torch.where(tau + delta >= 0, 1.0, -1.0)
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


def test_onties_kept_count_is_the_references_int_p_n():
    # k = int(p * n); a tensor with k == 0 is kept whole (online_merging/optimizers.py, magnitude_mask_)
    for n, p, k in [(150, 0.01, 1), (99, 0.01, 99), (50, 0.01, 50), (100, 0.29, 28), (1000, 0.5, 500)]:
        delta = _rand(n, n) + 0.0
        out = merged_update(delta, torch.zeros(n), method="onties", keep_rate=p, alpha=0.0)
        assert int((out != 0).sum()) == k, (n, p)
        assert int(sparsify(delta, "onties", p).dense().ne(0).sum()) == k, (n, p)


def test_ondare_tau_is_clamped_after_rescale_and_onties_tau_is_not():
    tau = torch.tensor([0.3, -0.3, 0.9, -2.0, 0.05])
    d1 = sparsify(tau, "ondare", 1.0).dense()
    torch.testing.assert_close(d1, torch.tensor([0.3, -0.3, 0.9, -1.0, 0.05]))  # clamped even at p = 1
    d = sparsify(tau, "ondare", 0.5, torch.Generator().manual_seed(3))
    torch.testing.assert_close(d.values, (tau[d.indices.long()] / 0.5).clamp(-1, 1))
    assert d.values.abs().max() <= 1.0
    torch.testing.assert_close(sparsify(tau, "onties", 1.0).dense(), tau)


def test_sparsify_dare_and_ties_and_storage():
    tau = _rand(100_000, 6)
    p = 0.01
    d = sparsify(tau, "ondare", p, torch.Generator().manual_seed(1))
    k = d.indices.numel()
    assert abs(k / tau.numel() - p) < 5 * (p * (1 - p) / tau.numel()) ** 0.5
    # DARE rescales the kept entries by 1/p, then (as the reference) clamps them to [-1, 1]
    torch.testing.assert_close(d.values, (tau[d.indices.long()] / p).clamp(-1, 1))
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
    tau = (_rand(50, 7) + 3.0) * 0.02  # tau / p stays inside the clamp, so D(tau) is unbiased
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


def _groups(model, wd):
    """HF-style param groups: matrices decay, biases do not."""
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if p.dim() > 1], "weight_decay": wd},
            {"params": [p for n, p in named if p.dim() <= 1], "weight_decay": 0.0}]


def _train_plain(method, keep_rate=1.0, alpha=0.3, steps=3, chunk_numel=1 << 27, merge=True):
    model = _toy()
    x, y = _data()
    opt = torch.optim.AdamW(_groups(model, 0.1), lr=1e-2)
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
def test_wrapper_one_step_equals_rule_then_decoupled_decay(method):
    """theta = (old + merged_update(bare Adam update)) * (1 - lr * wd), wd per param group."""
    model, twin = _toy(), _toy()
    x, y = _data()
    taus = _taus(model)
    opt = wrap_optimizer(torch.optim.AdamW(_groups(model, 0.5), lr=1e-2), model,
                         MergingConfig(method=method, keep_rate=1.0, alpha=0.3), tau=taus)
    ref = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.0)  # the bare Adam update
    assert isinstance(opt, torch.optim.Optimizer) and isinstance(opt, optimizer_class())
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)  # trainers build schedulers on it
    old = {n: p.detach().clone() for n, p in model.named_parameters()}
    for m, o in ((model, opt), (twin, ref)):
        torch.nn.functional.mse_loss(m(x), y).backward()
        o.step()
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]  # restored after the step
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        shrink = 1 - 1e-2 * 0.5 if p.dim() > 1 else 1.0
        tau = taus[n].clamp(-1, 1) if method == "ondare" else taus[n]
        expect = (old[n] + merged_update(q.detach() - old[n], tau, method=method, keep_rate=1.0, alpha=0.3)) * shrink
        torch.testing.assert_close(p.detach(), expect, rtol=0, atol=1e-7)


# ---------------------------------------------------------------- against the reference's equations

def _ref_topk(x, p):
    """Reference (OTAdamW.magnitude_mask_): keep the int(p*n) largest |x|; keep all when p >= 1 or that is 0."""
    k = int(p * x.numel())
    if p >= 1 or k < 1:
        return x.clone()
    flat = x.reshape(-1)
    keep = torch.zeros_like(flat)
    keep[torch.argsort(flat.abs(), descending=True)[:k]] = 1
    return (flat * keep).view_as(x)


def _pick(got, kept, dropped):
    """Which of the reference's two outcomes each entry took (a random DARE draw); and the reference value."""
    mask = (got - kept).abs() <= (got - dropped).abs()
    return mask, torch.where(mask, kept, dropped)


@pytest.mark.parametrize("method", ["ondare", "onties"])
@pytest.mark.parametrize("p", [1.0, 0.5, 1e-2])
def test_several_steps_match_the_reference_equations(method, p):
    """Plain re-implementation of ODAdamW / OTAdamW (QwenLM/online_merging_optimizers, optimizers.py).

    Per step, per parameter: delta = bare Adam update (torch AdamW's form, no decay);
    OnDARE: theta += alpha * clamp(D(tau), -1, 1) + (1 - alpha) * D(delta), D = drop w.p. 1-p, kept / p;
    OnTIES: tau', delta' = top int(p*n) by magnitude (all if 0); s = +1 where tau' + delta' >= 0 else -1;
            theta += alpha * tau' [sign(tau') == s] + (1 - alpha) * delta' [sign(delta') == s];
    then theta -= lr * wd * theta (decoupled decay of every weight of a decaying group, after the merge).
    OnDARE's draws are random: each entry must equal one of the reference's two outcomes, the drawn
    fractions must fit p, and the reference trajectory goes on from its own values.
    """
    lr, wd, alpha, b1, b2, eps = 1e-2, 0.5, 0.3, 0.9, 0.999, 1e-3  # large eps: |delta| spread for top-k
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 50), torch.nn.Tanh(), torch.nn.Linear(50, 20)).double()
    twin = torch.nn.Sequential(torch.nn.Linear(40, 50), torch.nn.Tanh(), torch.nn.Linear(50, 20)).double()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(16, 40, generator=g, dtype=torch.float64), torch.randn(16, 20, generator=g, dtype=torch.float64)
    taus = {}
    for i, (n, q) in enumerate(model.named_parameters()):
        t = _rand(q.numel(), 300 + i, 0.02)
        t[::20] *= 100  # some entries beyond the clamp even at p = 1
        taus[n] = t.view_as(q).double()
    opt = wrap_optimizer(torch.optim.AdamW(_groups(model, wd), lr=lr, betas=(b1, b2), eps=eps), model,
                         MergingConfig(method=method, keep_rate=p, alpha=alpha, seed=1), tau=taus)
    names = [n for n, _ in model.named_parameters()]
    theta = {n: q.detach().clone() for n, q in model.named_parameters()}
    m = {n: torch.zeros_like(v) for n, v in theta.items()}
    v2 = {n: torch.zeros_like(v) for n, v in theta.items()}
    shrink = {n: (1 - lr * wd) if theta[n].dim() > 1 else 1.0 for n in names}
    tau_s: dict = {}
    tau_kept, delta_kept, delta_masks, total = 0, 0, [], sum(v.numel() for v in theta.values())
    for step in range(1, 5):
        probe = step == 1  # a zero-gradient step: delta = 0, so theta moves by alpha * tau' only
        loss = torch.nn.functional.mse_loss(model(x), y) * (0.0 if probe else 1.0)
        loss.backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            twin.load_state_dict({n: theta[n] for n in names})
        twin.zero_grad()
        (torch.nn.functional.mse_loss(twin(x), y) * (0.0 if probe else 1.0)).backward()
        grads = {n: q.grad.detach() for n, q in twin.named_parameters()}
        step_mask = []
        for n, q in model.named_parameters():
            got = q.detach()
            m[n] = b1 * m[n] + (1 - b1) * grads[n]
            v2[n] = b2 * v2[n] + (1 - b2) * grads[n] ** 2
            delta = -lr * (m[n] / (1 - b1 ** step)) / ((v2[n] / (1 - b2 ** step)).sqrt() + eps)
            if method == "onties":
                if n not in tau_s:
                    tau_s[n] = _ref_topk(taus[n], p)
                d = _ref_topk(delta, p)
                s = torch.where(tau_s[n] + d >= 0, 1.0, -1.0).double()
                merged = alpha * tau_s[n] * (torch.sign(tau_s[n]) == s) + (1 - alpha) * d * (torch.sign(d) == s)
                new = (theta[n] + merged) * shrink[n]
            elif p >= 1:
                tau_s[n] = taus[n].clamp(-1, 1)
                new = (theta[n] + alpha * tau_s[n] + (1 - alpha) * delta) * shrink[n]
            else:
                if probe:  # the once-drawn tau mask shows here
                    full = (taus[n] / p).clamp(-1, 1)
                    keep, new = _pick(got, (theta[n] + alpha * full) * shrink[n], theta[n] * shrink[n])
                    tau_s[n] = full * keep
                    tau_kept += int(keep.sum())
                else:
                    base = theta[n] + alpha * tau_s[n]
                    keep, new = _pick(got, (base + (1 - alpha) * delta / p) * shrink[n], base * shrink[n])
                    delta_kept += int(keep.sum())
                    step_mask.append(keep.reshape(-1))
            torch.testing.assert_close(got, new, rtol=1e-6, atol=1e-7, msg=lambda e, n=n, step=step: f"step {step} {n}: {e}")
            theta[n] = new
        if step_mask:
            delta_masks.append(torch.cat(step_mask))
    if method == "ondare" and p < 1:
        for kept, draws in ((tau_kept, total), (delta_kept, 3 * total)):
            sd = (draws * p * (1 - p)) ** 0.5
            assert abs(kept - draws * p) < 5 * sd + 2, (kept, draws, p)
        assert not torch.equal(delta_masks[0], delta_masks[1])  # a fresh mask on delta every step


def test_coupled_weight_decay_stays_in_the_gradient_and_unknown_decay_is_refused():
    from posttrain.core.errors import ConfigError

    # SGD's weight_decay is an L2 term in the gradient: with keep 1 and alpha 0 the wrapper is plain SGD
    a, b = _toy(), _toy()
    x, y = _data()
    oa = wrap_optimizer(torch.optim.SGD(a.parameters(), lr=0.1, weight_decay=0.3), a,
                        MergingConfig(keep_rate=1.0, alpha=0.0), tau=_taus(a, 0.0))
    ob = torch.optim.SGD(b.parameters(), lr=0.1, weight_decay=0.3)
    for mdl, o in ((a, oa), (b, ob)):
        for _ in range(2):
            torch.nn.functional.mse_loss(mdl(x), y).backward()
            o.step()
            o.zero_grad()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-7)

    class OwnDecay(torch.optim.Optimizer):  # a decay this wrapper cannot classify
        def __init__(self, params, weight_decay):
            super().__init__(params, {"lr": 0.1, "weight_decay": weight_decay})

        def step(self, closure=None):
            return None

    with pytest.raises(ConfigError, match="OwnDecay"):
        wrap_optimizer(OwnDecay(a.parameters(), 0.1), a, MergingConfig(), tau=_taus(a))
    wrap_optimizer(OwnDecay(a.parameters(), 0.0), a, MergingConfig(), tau=_taus(a))  # no decay: fine


def test_hf_trainer_groups_are_respected(tiny_model_dir, tmp_path):
    """A real transformers Trainer: patch_trainer wraps its AdamW; no-decay groups (biases, norms) are not decayed."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from posttrain.core.merging import patch_trainer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), learning_rate=1e-2, weight_decay=0.1, report_to=[],
                             use_cpu=True)
    trainer = Trainer(model=model, args=args)
    patch_trainer(trainer, MergingConfig(keep_rate=1.0, alpha=0.0), reference=str(tiny_model_dir),
                  base=str(tiny_model_dir))  # tau = 0
    opt = trainer.create_optimizer()
    assert isinstance(opt, optimizer_class()) and trainer.optimizer is opt
    decay = set(trainer.get_decay_parameter_names(model))
    named = dict(model.named_parameters())
    assert decay and set(named) - decay  # both kinds exist
    old = {n: q.detach().clone() for n, q in named.items()}
    for q in named.values():
        q.grad = torch.zeros_like(q)  # bare Adam update 0: only the decay moves the weights
    opt.step()
    for n, q in named.items():
        factor = (1 - 1e-2 * 0.1) if n in decay else 1.0
        torch.testing.assert_close(q.detach(), old[n] * factor, rtol=0, atol=1e-7, msg=lambda e, n=n: f"{n}: {e}")


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
        inner = torch.optim.AdamW(_groups(model, 0.1), lr=1e-2)
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
        # the wrapper stepped every time: ZeRO calls it once per param group (sub-group) per engine step
        assert opt.steps >= 3 and opt.steps % 3 == 0, opt.steps
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
    r = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    got = torch.load(out)
    plain = _train_plain("ondare", merge=False)
    for stage, method in ZERO_CASES:
        ref = _train_plain(method)
        for n, v in ref.items():
            torch.testing.assert_close(got[f"{stage}-{method}"][n], v, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, n=n, stage=stage, method=method: f"ZeRO-{stage} {method} {n}: {m}")
        # and the merge really happened under ZeRO (not just plain AdamW)
        assert max((got[f"{stage}-{method}"][n] - plain[n]).abs().max().item() for n in ref) > 1e-3
    for stage, method in SPARSE_CASES:  # runs, stays finite, and the sparse tau moved the weights
        res = got[f"{stage}-{method}-sparse"]
        assert all(torch.isfinite(v).all() for v in res.values())
        assert max((res[n] - plain[n]).abs().max().item() for n in plain) > 1e-4


if __name__ == "__main__":
    _zero_worker(sys.argv[1])


def test_resume_from_state_dict_continues_the_same_dare_masks():
    """A wrapper rebuilt from a state_dict (what a resumed run does) takes the same steps as one that never
    stopped: the inner optimizer's state and the OnDARE mask generator's state both come back (without the
    generator state the resumed run would draw the first steps' masks again)."""
    import copy

    x, y = _data()

    def build(model):
        return wrap_optimizer(torch.optim.AdamW(_groups(model, 0.1), lr=1e-2), model,
                              MergingConfig(method="ondare", keep_rate=0.5, alpha=0.3), tau=_taus(model))

    def step(model, opt):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()

    straight = _toy()
    opt = build(straight)
    for _ in range(2):
        step(straight, opt)
    saved_model, saved_opt = copy.deepcopy(straight.state_dict()), copy.deepcopy(opt.state_dict())
    assert saved_opt["merging_steps"] == 2 and saved_opt["merging_rng"]
    for _ in range(2):
        step(straight, opt)

    resumed = _toy(seed=5)
    resumed.load_state_dict(saved_model)
    ropt = build(resumed)
    ropt.load_state_dict(saved_opt)
    for _ in range(2):
        step(resumed, ropt)
    for (n, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)

    fresh = _toy(seed=5)  # without the generator state: different masks, different weights
    fresh.load_state_dict(saved_model)
    fopt = build(fresh)
    fopt.load_state_dict({"inner": saved_opt["inner"], "merging_steps": 2})
    for _ in range(2):
        step(fresh, fopt)
    assert any(not torch.equal(p, q) for p, q in zip(straight.parameters(), fresh.parameters()))
