"""The online DPO loop (stage ``online_dpo``): set-up, sample, score, pair, update, sync, checkpoint.

Input: an ``OnlineDPOConfig`` and the stage context. Output: what the stage docstring
(``posttrain.trainers.online_dpo``) lists. One ``OnlineDPOLoop`` runs the episodes; each
phase is a method, timed into the episode's metrics (``time_generate``, ``time_score``,
``time_train``, ``time_gather``, ``time_sync``).

The loop is hand-written rather than TRL's ``OnlineDPOTrainer`` because the report's online
stage needs best/worst of N by a reward model (TRL samples exactly 2), the merging optimizer,
and a weight push that is verified: after every push the sampler's log-probs of a probe
sequence must equal the policy's, or the run stops with ``SyncError`` (a silently skipped
push would make the run sample from a stale policy).

Several ranks (``Dist``): each rank samples and scores its share of the prompts with its own sampler
(the policy itself through hf; its own vLLM engine started by ``engine_per_rank``; its shard of an
engine spanning a block of ``tensor_parallel_size`` ranks, through ``GroupSampler``; or the one
vLLM server all ranks share, ``ServerSampler``), ``gather`` gives every rank all samples, and
``sync`` pushes into every engine (ZeRO-3: chunk by chunk, each gathered on all ranks; a server:
rank 0 writes, the server loads) and checks every rank's probe, stopping all ranks together. The
episode metrics carry ``samples_per_rank``, ``sync_logprob_diff_per_rank`` and ``sync_chunks``.
Episode checkpoints (``checkpoint``) hold the policy, the optimizer and merging state (DeepSpeed:
every rank's shards) and the next episode; a relaunch after a kill continues there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.core.devices import dtype_name, resolve_device, torch_dtype
from posttrain.core.distributed import Dist
from posttrain.core.losses import dpo_loss, response_logprobs
from posttrain.core.records import RecordWriter, preference, record_id, to_chat_prompt
from posttrain.core.sampling.base import Completion, SamplingParams, stable_seed
from posttrain.core.sampling.server_weights import ServerSampler
from posttrain.core.tracking import open_tracker
from posttrain.core.trainkit import lora_config, lr_at, set_lr
from posttrain.core.weight_sync import (SyncError, check_sync, export_weights, probe_diff, push_weights, set_asleep,
                                       verify_sync)
from posttrain.trainers.online_dpo import OnlineDPOConfig, multi_rank_refusal, pick_pairs
from posttrain.trainers.online_support import CKPT, DS_TAG, engine_per_rank, find_checkpoint, truncate_jsonl
from reward.sources import reward_sources, total_rewards

log = logging.getLogger("posttrain")


@dataclass
class Episode:
    """One episode's samples (after gathering, the same on every rank)."""

    index: int
    prompt_idx: list[int]  # record indices of this episode's prompts
    completions: list[list[Completion]]  # N per prompt
    rewards: list[list[float]] = field(default_factory=list)  # per prompt, per completion
    source_means: dict[str, float] = field(default_factory=dict)  # unweighted mean of each reward source
    skipped: int = 0  # prompts without a pair (tie or gap below min_gap)
    per_rank: list[int] = field(default_factory=list)  # completions each rank sampled (after gathering)


class OnlineDPOLoop:
    """Online DPO over ``cfg.episodes`` episodes (see the module docstring)."""

    def __init__(self, cfg: OnlineDPOConfig, ctx: Any):
        import torch

        self.cfg, self.ctx = cfg, ctx
        self.out = Path(ctx.out_dir)
        self.start_path = ctx.model_path(cfg.model)
        self.tok = ctx.tokenizer(self.start_path)
        self.dist = Dist(resolve_device(cfg.device), cfg.batch_size, cfg.train.max_grad_norm,
                         dtype_name(cfg.dtype, cfg.device))
        self.device = self.dist.device
        self.dtype = torch_dtype(cfg.dtype, self.device)
        self.tol = cfg.sync_tolerance if cfg.sync_tolerance is not None else (
            1e-3 if self.dtype == torch.float32 else 5e-2)
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        self.seed = cfg.train.seed if cfg.train.seed is not None else ctx.seed
        self.records = ctx.read_input(cfg.input, None, cfg.limit)
        if not self.records:
            raise ValueError(f"stage {ctx.spec.name}: {cfg.input}: no prompts")
        self.prompts = [to_chat_prompt(r) for r in self.records]
        self.order = list(range(len(self.records)))
        random.Random(self.seed).shuffle(self.order)
        self.ckpt, self.state = find_checkpoint(self.out / "checkpoint")
        # a checkpoint in Hugging Face format (one process / DDP); a DeepSpeed one holds the weights in the
        # engine's own format and is loaded into the engine after prepare (_make_optimizer)
        self.hf_ckpt = self.state is not None and not self.state.get("deepspeed")
        self.first = self.state["episode"] if self.state else 0
        self._check_resume_world()
        # the schedule runs over planned optimizer steps (an episode with fewer pairs takes fewer steps)
        self.steps_per_episode = cfg.epochs_per_episode * math.ceil(cfg.prompts_per_episode /
                                                                    (cfg.batch_size * self.dist.world))
        self.total_steps = cfg.episodes * self.steps_per_episode
        torch.manual_seed(self.seed)
        self._load_models()
        self._make_optimizer()
        self._make_sampler()
        self.probe_ids = (list(self.tok.apply_chat_template(self.prompts[self.order[0]], add_generation_prompt=True,
                                                            tokenize=True, return_dict=True)["input_ids"])
                          + self.tok(cfg.probe_text, add_special_tokens=False)["input_ids"])[: cfg.max_length]
        with self.dist.plain_loading():  # the reward model is never partitioned
            self.sources = reward_sources(ctx.resolve_model(cfg.reward_model, "reward_model") if cfg.reward_model
                                          else None, cfg.reward_model_weight, cfg.reward_functions,
                                          device=self.device, batch_size=cfg.reward_batch_size,
                                          max_length=cfg.max_length, where=f"stages[{ctx.spec.index}].reward_functions")
        self.tb = open_tracker(cfg.train.report_to, ctx) if self.dist.main else None  # TensorBoard and/or W&B
        self.metrics_path = self.out / "metrics.jsonl"
        if self.dist.main:
            truncate_jsonl(self.metrics_path, lambda r: r["episode"] < self.first)
            truncate_jsonl(self.out / "pairs.jsonl", lambda r: r["meta"]["episode"] < self.first)
        self.totals: dict[str, float] = {}
        self.history: list[dict] = []

    # ---------------------------------------------------------------- set-up

    def _load_models(self) -> None:
        from transformers import AutoModelForCausalLM

        cfg, load_from = self.cfg, str(self.ckpt) if self.hf_ckpt else self.start_path
        if cfg.lora is not None:
            from peft import PeftModel, get_peft_model

            base = AutoModelForCausalLM.from_pretrained(self.start_path, dtype=self.dtype).to(self.device)
            self.policy = (PeftModel.from_pretrained(base, load_from, is_trainable=True) if self.hf_ckpt
                           else get_peft_model(base, lora_config(cfg.lora)))
            self.ref_model = None  # the reference is the policy with its adapter disabled
        else:
            self.policy = AutoModelForCausalLM.from_pretrained(load_from, dtype=self.dtype).to(self.device)
            with self.dist.plain_loading():
                self.ref_model = AutoModelForCausalLM.from_pretrained(self.start_path, dtype=self.dtype
                                                                      ).to(self.device).eval()
            self.ref_model.requires_grad_(False)

    def _make_optimizer(self) -> None:
        import torch

        t = self.cfg.train
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay,
                                      betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)
        if self.cfg.merging is not None:
            from posttrain.core import merging

            reference, base = merging.resolve_paths(self.cfg.merging, self.ctx, self.start_path)
            optimizer = merging.wrap_optimizer(optimizer, self.policy, self.cfg.merging, reference=reference,
                                               base=base)
        self.merger = optimizer if self.cfg.merging is not None else None
        if self.state and (self.ckpt / "optimizer.pt").is_file():
            optimizer.load_state_dict(torch.load(self.ckpt / "optimizer.pt", map_location=self.device,
                                                 weights_only=False))
        self.optimizer = optimizer
        self.train_model, self.optimizer = self.dist.prepare(self.policy, optimizer)
        if self.state and self.state.get("deepspeed"):
            # every rank reads back its own shards of the weights and of the optimizer state
            self.train_model.load_checkpoint(str(self.ckpt), tag=DS_TAG, load_optimizer_states=True,
                                             load_lr_scheduler_states=False,
                                             load_module_strict=self.cfg.lora is None)
            if self.merger is not None:
                self.merger.load_extra_state(torch.load(self.ckpt / f"merging.rank{self.dist.rank}.pt",
                                                        weights_only=False))

    def _make_sampler(self) -> None:
        from posttrain.core.sampling.base import make_sampler
        from posttrain.core.sampling.group import GroupSampler
        from posttrain.core.sampling.hf import HFSampler
        from posttrain.core.sampling.vllm_backend import VLLMSampler

        cfg, ctx = self.cfg, self.ctx
        self.injected = ctx.samplers.injected
        scfg = cfg.sampler or ctx.recipe.file.sampler
        self.own_sampler = False
        why = multi_rank_refusal(scfg, cfg.share_weights, self.dist.world, own=cfg.sampler is not None)
        if why or (self.dist.world > 1 and self.injected is not None):
            raise ValueError(f"stage {ctx.spec.name}: {why or 'an injected sampler cannot serve several ranks'}")
        if self.injected is not None:
            self.sampler = self.injected
        elif scfg.backend == "hf" and cfg.share_weights:
            self.sampler = HFSampler(self.policy, self.tok, scfg, chat_template=ctx.chat_template)
        else:
            ctx.samplers.release("vllm")  # one engine at a time: free the memory of any shared one
            # resumed from a DeepSpeed checkpoint: start on the first weights; the push before the first
            # episode (run) brings the engine to the restored policy
            start = str(self.ckpt) if self.hf_ckpt and cfg.lora is None else self.start_path
            tp = scfg.tensor_parallel_size if scfg.backend == "vllm" else 1
            if self.dist.world > 1 and tp > 1:
                # one engine per block of tp consecutive ranks, each rank running one shard in-process
                gather, index = self.dist.block_gather(tp)
                self.sampler = GroupSampler(VLLMSampler(start, ctx.tokenizer_path(self.start_path), scfg,
                                                        chat_template=ctx.chat_template, external_launcher=True),
                                            gather, index)
            else:
                with engine_per_rank(self.dist, scfg.backend):
                    self.sampler = make_sampler(scfg, model=start, tokenizer=ctx.tokenizer_path(self.start_path),
                                                chat_template=ctx.chat_template)
            self.own_sampler = True
            if scfg.backend == "openai" and cfg.sync_weights:
                # a separately launched vLLM server (shared by all ranks): rank 0 writes the weights where the
                # server can read them and has it load them (posttrain.core.sampling.server_weights)
                where = cfg.server_weights_dir or str(self.out / "server_weights")
                self.sampler = ServerSampler(self.sampler, ctx.resolve(where) if cfg.server_weights_dir else where,
                                             writer=self.dist.main)
                self.sampler.check_receiver()
        self.shares_policy = isinstance(self.sampler, HFSampler) and self.sampler.model is self.policy
        can_sync = hasattr(self.sampler, "update_weights") and hasattr(self.sampler, "probe_logprobs")
        if cfg.sync_weights and not can_sync:
            raise ValueError(f"stage {ctx.spec.name}: sampler {self.sampler.name!r} cannot take new weights; "
                             "set sync_weights: false to sample from a fixed model")
        self.injected_start = None
        self.sync_chunks = 0  # chunks of the last weight push (0: nothing pushed, the sampler is the policy)

    # ---------------------------------------------------------------- phases

    def sample(self, ep: int) -> Episode:
        """This rank's share of the episode's prompts, N completions each, from the current policy."""
        cfg = self.cfg
        all_idx = [self.order[(ep * cfg.prompts_per_episode + i) % len(self.order)]
                   for i in range(cfg.prompts_per_episode)]
        idx = all_idx[self.dist.rank::self.dist.world]
        seeds = [stable_seed(self.seed, ep, i) for i in idx]
        self.policy.eval()
        set_asleep(self.sampler, False)
        with self._whole_policy():  # ZeRO-3 with the policy as sampler: generate on whole weights
            comps = self.sampler.generate([self.prompts[i] for i in idx], cfg.sampling, seeds=seeds)
        set_asleep(self.sampler, True)  # colocated vLLM on GPU: free its memory for the update
        return Episode(ep, idx, comps, per_rank=[sum(len(cs) for cs in comps)])

    def _whole_policy(self) -> Any:
        """ZeRO-3 gathers the policy only when it generates itself (a vLLM engine holds its own copy)."""
        return self.dist.gathered(self.policy) if self.shares_policy else contextlib.nullcontext()

    def score(self, e: Episode) -> None:
        """Total reward of every completion (weighted sources minus the unterminated penalty)."""
        flat_p = [self.prompts[i] for i, cs in zip(e.prompt_idx, e.completions) for _ in cs]
        flat_r = [self.records[i] for i, cs in zip(e.prompt_idx, e.completions) for _ in cs]
        texts = [c.text for cs in e.completions for c in cs]
        term = [c.terminated for cs in e.completions for c in cs]
        flat, e.source_means = total_rewards(self.sources, flat_p, texts, flat_r, term,
                                             self.cfg.unterminated_penalty)
        e.rewards, k = [], 0
        for cs in e.completions:
            e.rewards.append(flat[k:k + len(cs)])
            k += len(cs)

    def gather(self, e: Episode) -> Episode:
        """Every rank's samples and rewards, so all ranks pick the same pairs (no-op in one process)."""
        if self.dist.world == 1:
            return e
        mine = (e.prompt_idx, [[(c.text, list(c.token_ids), c.finish_reason) for c in cs] for cs in e.completions],
                e.rewards, e.source_means)
        parts = self.dist.gather(mine)
        comps = [[Completion(text=t, token_ids=ids, finish_reason=f) for t, ids, f in cs]
                 for p in parts for cs in p[1]]
        means = {k: sum(p[3][k] for p in parts) / len(parts) for k in e.source_means}
        return Episode(e.index, [i for p in parts for i in p[0]], comps, [r for p in parts for r in p[2]], means,
                       per_rank=[sum(len(cs) for cs in p[1]) for p in parts])

    def pair(self, e: Episode, writer: RecordWriter | None) -> list[tuple[tuple[list[int], int], tuple[list[int], int]]]:
        """Best vs worst of each prompt as token sequences ``((ids, prompt_len), (ids, prompt_len))``."""
        pairs, e.skipped = pick_pairs(e.rewards, self.cfg.min_gap)
        data = []
        for i, b, w in pairs:
            p, rec_idx = self.prompts[e.prompt_idx[i]], e.prompt_idx[i]
            best, worst = e.completions[i][b], e.completions[i][w]
            data.append((self._ids(p, best), self._ids(p, worst)))
            if writer is not None:
                writer.write(preference(p, best.text, worst.text, source=f"online_dpo:{self.sampler.name}",
                                        id=record_id("online_dpo", e.index, rec_idx),
                                        meta={"episode": e.index, "reward_chosen": e.rewards[i][b],
                                              "reward_rejected": e.rewards[i][w]}))
        return data

    def _ids(self, prompt: list[dict], c: Completion) -> tuple[list[int], int]:
        pid = list(self.tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"])
        rid = list(c.token_ids) or (self.tok(c.text, add_special_tokens=False)["input_ids"]
                                    + ([self.tok.eos_token_id] if c.terminated else []))
        return (pid + rid)[: self.cfg.max_length], len(pid)

    def kl(self, e: Episode) -> float | None:
        """k1 estimate of KL(policy || reference) on fresh samples of the current policy (this rank's prompts).

        The episode's own samples are used when they were drawn at temperature 1 without top-p (then
        they are samples of the policy); otherwise ``kl_samples`` new ones are drawn at temperature 1.
        """
        import torch

        cfg = self.cfg
        if cfg.kl_samples == 0:
            return None
        if cfg.sampling.temperature == 1.0 and cfg.sampling.top_p == 1.0 and cfg.kl_samples <= cfg.sampling.n:
            comps = [cs[: cfg.kl_samples] for cs in e.completions]
        else:
            sp = SamplingParams(n=cfg.kl_samples, temperature=1.0, max_tokens=cfg.sampling.max_tokens)
            set_asleep(self.sampler, False)
            with self._whole_policy():
                comps = self.sampler.generate([self.prompts[i] for i in e.prompt_idx], sp,
                                              seeds=[stable_seed(self.seed, "kl", e.index, i) for i in e.prompt_idx])
            set_asleep(self.sampler, True)
        seqs = [self._ids(self.prompts[i], c) for i, cs in zip(e.prompt_idx, comps) for c in cs]
        with torch.no_grad():
            pol = response_logprobs(self.train_model, seqs, self.pad, self.device, cfg.batch_size * 2)
            ref = self._ref_logprobs(seqs)
        vals = self.dist.gather([float(x) for x in (pol - ref)])
        flat = [v for part in vals for v in part]
        return sum(flat) / max(1, len(flat))

    def _ref_logprobs(self, seqs: list[tuple[list[int], int]]) -> Any:
        if self.ref_model is not None:
            return response_logprobs(self.ref_model, seqs, self.pad, self.device, self.cfg.batch_size * 2)
        with self.policy.disable_adapter():
            return response_logprobs(self.policy, seqs, self.pad, self.device, self.cfg.batch_size * 2)

    def update(self, e: Episode, data: list) -> dict:
        """DPO on the episode's pairs (``epochs_per_episode`` passes, ``batch_size`` pairs per rank per step)."""
        import torch

        cfg, dist = self.cfg, self.dist
        if not data:
            return {}
        seqs_c, seqs_r = [d[0] for d in data], [d[1] for d in data]
        with torch.no_grad():
            ref_c, ref_r = self._ref_logprobs(seqs_c), self._ref_logprobs(seqs_r)
        self.policy.train()
        logs: dict[str, list[float]] = {k: [] for k in ("loss", "chosen_reward", "rejected_reward", "margin",
                                                        "accuracy", "logp_chosen", "logp_rejected")}
        gen = random.Random(self.seed * 7 + e.index)  # same on every rank: same permutation
        step_pairs = cfg.batch_size * dist.world  # pairs per optimizer step over all ranks
        step = e.index * self.steps_per_episode
        for _ in range(cfg.epochs_per_episode):
            perm = list(range(len(data)))
            gen.shuffle(perm)
            if len(perm) % dist.world:  # every rank must take part in every step: pad by repeating pairs
                perm += perm[: dist.world - len(perm) % dist.world]
            for s in range(0, len(perm), step_pairs):
                b = perm[s:s + step_pairs][dist.rank::dist.world]
                set_lr(self.optimizer, lr_at(cfg.train, min(step, self.total_steps - 1), self.total_steps))
                step += 1
                lp = response_logprobs(self.train_model, [seqs_c[j] for j in b] + [seqs_r[j] for j in b],
                                       self.pad, self.device)
                out = dpo_loss(lp[: len(b)], lp[len(b):], ref_c[b], ref_r[b], cfg.beta, cfg.label_smoothing)
                loss = out["loss"].mean()
                dist.backward_step(loss, self.policy, self.optimizer, cfg.train.max_grad_norm)
                logs["loss"].append(float(loss.detach()))
                for k, v in (("chosen_reward", out["chosen_reward"]), ("rejected_reward", out["rejected_reward"]),
                             ("margin", out["margin"])):
                    logs[k].append(float(v.mean()))
                logs["accuracy"].append(float((out["margin"] > 0).float().mean()))
                logs["logp_chosen"].append(float(lp[: len(b)].detach().mean()))
                logs["logp_rejected"].append(float(lp[len(b):].detach().mean()))
        logs = {k: [x for part in dist.gather(v) for x in part] for k, v in logs.items()}
        m = {k: sum(v) / len(v) for k, v in logs.items()}
        m["logp_margin"] = m["logp_chosen"] - m["logp_rejected"]
        m["lr"] = float(self.optimizer.param_groups[0]["lr"])
        self.policy.eval()
        return m

    def sync(self, where: str) -> tuple[list[float], float, float]:
        """Push the policy's weights to the sampler and verify them on every rank.

        Returns (max log-prob diff of each rank's sampler, push s, verify s). Each rank pushes into its
        own engine, chunk by chunk (ZeRO-3: every chunk gathered on all ranks, ``sync_chunk_mb``); each
        rank measures its engine against the policy, and all ranks raise ``SyncError`` together when any
        rank is off (one rank stopping alone would leave the others waiting in a collective).
        """
        t0 = time.time()
        set_asleep(self.sampler, False)
        if not self.shares_policy:
            self.dist.settle()  # the last probe's forward may have left ZeRO-3 fetches in flight
            self.sync_chunks = push_weights(self.sampler, self.policy, self.cfg.sync_chunk_mb << 20, self.dist.gathered)
            if isinstance(self.sampler, ServerSampler):
                self.dist.barrier()  # one server for all ranks: probe it only once rank 0's reload is done
        t1 = time.time()
        self.policy.eval()
        with self._whole_policy():  # else ZeRO-3's forward gathers one layer at a time
            diff = probe_diff(self.sampler, self.policy, self.probe_ids, self.device)
        diffs = self.dist.gather(diff)
        for r, d in enumerate(diffs):
            check_sync(d, self.tol, where if self.dist.world == 1 else f"{where}, rank {r}", self.sampler.name)
        return diffs, t1 - t0, time.time() - t1

    def checkpoint(self, next_episode: int) -> None:
        """Policy, optimizer state (merging state included) and the next episode, written aside then swapped in.

        One process or DDP: the main rank writes the policy (the adapter for LoRA) in Hugging Face format
        and the optimizer state. DeepSpeed: every rank writes its shards of weights and optimizer state
        through the engine (DeepSpeed's format, ZeRO-2 and ZeRO-3 alike) and the merging wrapper's own
        state; the main rank then writes ``state.json`` (the next episode and the world that wrote it) and
        swaps the folder in. A kill at any point leaves the previous complete checkpoint.
        The sampling and update randomness needs no saving: it is seeded from the episode index.
        """
        import torch

        dist = self.dist
        tmp = self.ckpt.with_name(CKPT + ".tmp")
        if dist.main and tmp.exists():
            shutil.rmtree(tmp)
        dist.barrier()
        if dist.deepspeed:
            self.train_model.save_checkpoint(str(tmp), tag=DS_TAG, exclude_frozen_parameters=self.cfg.lora is not None)
            if self.merger is not None:
                torch.save(self.merger.extra_state(), tmp / f"merging.rank{dist.rank}.pt")
        elif dist.main:
            self.policy.save_pretrained(tmp)
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        dist.barrier()
        if dist.main:
            (tmp / "state.json").write_text(json.dumps({"episode": next_episode, "world_size": dist.world,
                                                         "deepspeed": dist.deepspeed, "zero_stage": dist.zero_stage}))
            final, old = self.out / CKPT, self.out / (CKPT + ".old")
            if old.exists():
                shutil.rmtree(old)
            if final.exists():
                final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def _check_resume_world(self) -> None:
        """A checkpoint resumes only in the world that wrote it (DeepSpeed shards are per rank)."""
        if not self.state:
            return
        d = self.dist
        had = (self.state.get("world_size", 1), bool(self.state.get("deepspeed")), self.state.get("zero_stage"))
        now = (d.world, d.deepspeed, d.zero_stage)
        if had[1] != now[1] or (had[1] and had != now):
            def say(w):
                return f"{w[0]} rank(s)" + (f", DeepSpeed ZeRO-{w[2]}" if w[1] else "")
            raise ValueError(f"stage {self.ctx.spec.name}: {self.ckpt} was written by {say(had)}, this launch has "
                             f"{say(now)}: relaunch as before, or delete that folder to start the stage over")

    # ---------------------------------------------------------------- the loop

    def episode(self, ep: int, writer: RecordWriter | None) -> dict:
        """sample -> score -> gather -> pair -> KL -> update -> sync; return the episode's metrics."""
        t = [time.time()]
        e = self.sample(ep)
        t.append(time.time())
        self.score(e)
        t.append(time.time())
        mine = e
        e = self.gather(e)
        t.append(time.time())
        data = self.pair(e, writer)
        flat = [r for rs in e.rewards for r in rs]
        term = [c.terminated for cs in e.completions for c in cs]
        m: dict[str, Any] = {"episode": ep, "prompts": len(e.prompt_idx), "samples": len(flat), "pairs": len(data),
                             "skipped": e.skipped, "reward_mean": sum(flat) / len(flat), "reward_min": min(flat),
                             "reward_max": max(flat), "gap_mean": sum(max(r) - min(r) for r in e.rewards) / len(e.rewards),
                             "terminated_frac": sum(term) / len(term),
                             "response_len": sum(len(c.token_ids) or len(self.tok(c.text)["input_ids"])
                                                 for cs in e.completions for c in cs) / len(flat)}
        if len(self.sources) > 1:
            m.update({f"reward_{name}": v for name, v in e.source_means.items()})
        kl = self.kl(mine)  # on this rank's fresh samples, before the update changes the policy
        if kl is not None:
            m["kl_ref"] = kl
        t.append(time.time())
        m.update(self.update(e, data))
        t.append(time.time())
        m.update(time_generate=t[1] - t[0], time_score=t[2] - t[1], time_gather=t[3] - t[2], time_kl=t[4] - t[3],
                 time_train=t[5] - t[4])
        m["samples_per_rank"] = e.per_rank
        if self.cfg.sync_weights:
            diffs, m["time_push"], m["time_verify"] = self.sync(f"stage {self.ctx.spec.name}: after episode {ep}")
            m["sync_logprob_diff"], m["sync_logprob_diff_per_rank"] = max(diffs), diffs
            m["sync_chunks"] = self.sync_chunks
        else:
            m["time_push"] = m["time_verify"] = 0.0
        m["time_sync"] = m["time_push"] + m["time_verify"]
        return m

    def run(self) -> dict:
        """All episodes (resuming at ``self.first``), then the final model; returns the stage summary."""
        cfg, ctx, dist = self.cfg, self.ctx, self.dist
        if self.injected is not None and cfg.sync_weights:
            # Hand an injected engine back as we found it, when we can tell what it held (the starting policy).
            try:
                verify_sync(self.injected, self.policy, self.probe_ids, self.tol, "injected sampler", self.device)
                if not self.state:
                    self.injected_start = [(n, t.detach().clone()) for n, t in export_weights(self.policy)]
            except SyncError:
                log.warning("stage %s: the injected sampler holds other weights than the policy; they are replaced "
                            "and not restored", ctx.spec.name)
        if cfg.sync_weights and (self.state or not self.shares_policy):
            self.sync(f"stage {ctx.spec.name}: before episode {self.first}")  # catches a sampler on other weights
        bar = ctx.progress(total=cfg.episodes, initial=self.first, desc=f"{ctx.spec.name} episodes")
        try:
            name = f"pairs{'' if dist.main else f'.rank{dist.rank}'}.jsonl"
            with RecordWriter(self.out / name, "preference") as pw:
                for ep in range(self.first, cfg.episodes):
                    m = self.episode(ep, pw if dist.main else None)
                    self._log(m)
                    bar.update(1)
                    bar.set_postfix(reward=f"{m['reward_mean']:.3f}", loss=f"{m.get('loss', float('nan')):.3f}")
                    if cfg.checkpoint_every and (ep + 1) % cfg.checkpoint_every == 0 and ep + 1 < cfg.episodes:
                        self.checkpoint(ep + 1)
        finally:
            bar.close()
        return self._finish()

    def _log(self, m: dict) -> None:
        for k, v in m.items():
            if k.startswith("time_"):
                self.totals[k[5:]] = self.totals.get(k[5:], 0.0) + v
        self.history.append(m)
        if not self.dist.main:
            return
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(m) + "\n")
        if self.tb is not None:
            self.tb.log_scalars({k: v for k, v in m.items() if k != "episode"}, m["episode"], prefix="online_dpo/")

    def _finish(self) -> dict:
        self.dist.settle()
        with self.dist.gathered(self.policy):  # every rank takes part (ZeRO-3 gathers the shards)
            if self.dist.main:
                final = self.policy.merge_and_unload() if self.cfg.lora is not None else self.policy
                final.save_pretrained(self.out)
                self.tok.save_pretrained(self.out)
                for d in (CKPT, CKPT + ".old"):
                    shutil.rmtree(self.out / d, ignore_errors=True)
        rows = self.history
        summary = {"model": str(self.out), "episodes": len(rows), "pairs": sum(r["pairs"] for r in rows),
                   "skipped_prompts": sum(r["skipped"] for r in rows),
                   "reward_mean_first": rows[0]["reward_mean"] if rows else None,
                   "reward_mean_last": rows[-1]["reward_mean"] if rows else None,
                   "seconds": {k: round(v, 2) for k, v in self.totals.items()}, "sampler": self.sampler.name,
                   "samples_per_rank": [sum(r["samples_per_rank"][k] for r in rows) for k in range(self.dist.world)],
                   "syncs_verified": sum(1 for r in rows if "sync_logprob_diff" in r),
                   "merging": None if self.cfg.merging is None else self.cfg.merging.method,
                   "schedule": {"planned_steps": self.total_steps, "lr_schedule": self.cfg.train.lr_schedule},
                   "distributed": {"world_size": self.dist.world, "deepspeed": self.dist.deepspeed,
                                   "zero_stage": self.dist.zero_stage}}
        if self.dist.main:
            self.ctx.write_json("stats.json", summary)
        return summary

    def close(self) -> None:
        """Give an injected sampler back its starting weights; close our own sampler and the trackers."""
        if self.tb is not None:
            self.tb.close()
        if self.injected_start is not None:
            try:
                self.injected.update_weights(self.injected_start)
            except Exception as e:  # noqa: BLE001 - must not hide the real error
                log.warning("could not restore the injected sampler's weights: %s", e)
        if self.own_sampler:
            self.sampler.close()
