"""Packed (padding-free) reward-model training: TRL's ``RewardTrainer`` fed one flat row per micro-batch.

Input: the keyword arguments of TRL's ``RewardTrainer`` (``reward.train.build_reward_trainer`` passes
them when the stage sets ``packing: true``), on rows ``{chosen_ids, rejected_ids[, margin]}``.

Output: a trainer mixin (``PackedRewardMixin``) whose Bradley-Terry loss (with the optional margin
and reward-centring terms) and logged metrics (``accuracy``, ``margin``, ``min/mean/max_reward``,
``num_tokens``) equal TRL's padded ``RewardTrainer`` to float rounding.

How: TRL pads each micro-batch to its longest conversation. Here
``posttrain.core.packing.PairPacker`` packs every chosen then every rejected conversation of the
micro-batch into one row with restarting position ids; the model's packed path runs the trunk once
(per-document attention) and reads the score head at each conversation's last token, the token
``reward.scorer.RewardScorer`` and TRL's padded batch read, so a model trained packed scores the
same way everywhere.
"""

from __future__ import annotations

from typing import Any

# RewardConfig fields that only shape padding: they have no effect on a packed row.
INERT_ARGS: dict[str, Any] = {"pad_to_multiple_of": None}


def check_packed_args(args: Any) -> None:
    """Refuse a RewardConfig field that the packed path would ignore (one line, names the field)."""
    for name, inert in INERT_ARGS.items():
        got = getattr(args, name, inert)
        if got != inert:
            raise ValueError(f"packed reward training: `{name}`={got!r} has no effect with packing "
                             "(remove it or set packing: false)")


class PackedRewardMixin:
    """Put before TRL's ``RewardTrainer`` in the bases; construct with keyword arguments only."""

    def __init__(self, **kwargs: Any) -> None:
        from posttrain.core.packing import PairPacker

        check_packed_args(kwargs["args"])
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = PairPacker()
        super().__init__(**kwargs)

    def packed_scores(self, model: Any, inputs: dict) -> Any:
        """One score per packed sequence (chosen ones first), through the outer wrapper so its hooks run."""
        from posttrain.core.packing import enable_packed_forward

        enable_packed_forward(model)
        return model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                     cu_seq_lens=inputs["cu_seq_lens"])["scores"]

    def compute_loss(self, model: Any, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """``-log sigmoid(r_chosen - r_rejected - margin)`` (+ centring), TRL's loss on packed scores."""
        import torch
        import torch.nn.functional as F

        mode = "train" if self.model.training else "eval"
        scores = self.packed_scores(model, inputs)
        chosen, rejected = scores.chunk(2)
        diff = chosen - rejected
        if "margin" in inputs:
            diff = diff - inputs["margin"]
        loss = -F.logsigmoid(diff).mean()
        if self.args.center_rewards_coefficient is not None:
            loss = loss + self.args.center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
        acc, m = self.accelerator, self._metrics[mode]
        if mode == "train":
            n = inputs["input_ids"].new_tensor(inputs["input_ids"].numel())
            self._total_train_tokens += int(acc.gather_for_metrics(n).sum().item()) // self._tp_size
        m["num_tokens"] = [self._total_train_tokens]
        with torch.no_grad():
            every = acc.gather(scores.detach())
            m["min_reward"].append(every.min().item())
            m["mean_reward"].append(every.mean().item())
            m["max_reward"].append(every.max().item())
            m["accuracy"].append(acc.gather_for_metrics((chosen > rejected).float().mean()).mean().item())
            m["margin"].append(acc.gather_for_metrics((chosen - rejected).detach().mean()).mean().item())
        return (loss, {"logits": scores.detach().unsqueeze(-1)}) if return_outputs else loss
