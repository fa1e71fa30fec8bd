"""Packed (padding-free) DPO: TRL's ``DPOTrainer`` fed one flat row per micro-batch.

Input: the keyword arguments of TRL's ``DPOTrainer`` (``build_dpo_trainer`` passes them when the
stage sets ``packing: true``); datasets are tokenized by TRL exactly as on the padded path.

Output: a trainer mixin (``PackedDPOMixin``) whose loss equals TRL's padded sigmoid DPO loss to
float rounding, with the same logged metrics (``rewards/chosen|rejected|accuracies|margins``,
``logps/*``, ``logits/*``, ``entropy``, ``mean_token_accuracy``, ``num_tokens``, MoE ``aux_loss``).

How: TRL 1.16 forces ``padding_free`` off for DPO, so a micro-batch of mixed-length pairs is padded
to its longest sequence. Here ``posttrain.core.packing.PreferencePacker`` packs all 2B sequences
of the micro-batch into one row with restarting position ids, the model's packed path
(``enable_packed_forward``) runs the trunk once per row with per-document attention and scores only
completion tokens, and the per-sequence log-probs go into ``posttrain.core.losses.dpo_loss``. The
reference is read the same way: a frozen copy, the policy with its adapter disabled (LoRA), or
log-probs precomputed once (TRL's own precompute loop, running this collator and
``compute_ref_log_probs``). Only the sigmoid loss is implemented; other loss types and the TRL
options that the packed loss does not read are refused (``check_packed_args``).
"""

from __future__ import annotations

import contextlib
from typing import Any

# TRL DPOConfig fields the packed loss does not read, with the value that keeps them inert.
INERT_ARGS: dict[str, Any] = {"padding_free": False, "pad_to_multiple_of": None, "ld_alpha": None,
                              "use_weighting": False, "f_divergence_type": "reverse_kl", "label_smoothing": 0.0}
PACKED_LOSS_TYPES = ("sigmoid",)


def check_packed_args(args: Any) -> None:
    """Refuse a DPOConfig that asks for something the packed path does not compute (one line, names the field)."""
    types_ = list(args.loss_type) if isinstance(args.loss_type, (list, tuple)) else [args.loss_type]
    bad = [t for t in types_ if t not in PACKED_LOSS_TYPES]
    if bad:
        raise ValueError(f"packed DPO implements loss_type {list(PACKED_LOSS_TYPES)} only, not {bad[0]!r}; "
                         "set packing: false to use TRL's other losses")
    for name, inert in INERT_ARGS.items():
        got = getattr(args, name, inert)
        if got != inert and not (name == "f_divergence_type" and str(got).endswith("reverse_kl")):
            raise ValueError(f"packed DPO: `{name}`={got!r} has no effect with packing (remove it or set packing: false)")


class PackedDPOMixin:
    """Put before TRL's ``DPOTrainer`` in the bases; construct with keyword arguments only."""

    def __init__(self, **kwargs: Any) -> None:
        from posttrain.core.packing import PreferencePacker

        args = kwargs["args"]
        check_packed_args(args)
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = PreferencePacker(args.max_length, args.truncation_mode)
        super().__init__(**kwargs)

    # ------------------------------------------------------------ forward passes

    def _packed(self, model: Any, inputs: dict, router: bool = False) -> dict:
        """Per-sequence sums of ``model`` on a packed batch (through the outer wrapper, so its hooks run)."""
        from posttrain.core.packing import enable_packed_forward

        enable_packed_forward(model)
        kw = {k: inputs[k] for k in ("input_ids", "position_ids", "cu_seq_lens", "completion_mask")}
        if router:
            kw["output_router_logits"] = True
        return model(**kw)

    def compute_ref_log_probs(self, model: Any, inputs: dict) -> tuple[Any, Any]:
        """Reference log-probs (chosen, rejected) of one packed batch; TRL's precompute loop calls this too."""
        import torch
        from accelerate.utils import is_peft_model
        from trl.models.utils import disable_gradient_checkpointing
        from trl.trainer.utils import use_adapter

        adapter: Any = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with (torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
              adapter, self.accelerator.autocast()):
            logps = self._packed(model, inputs)["logps"]
        return logps.chunk(2)

    # ------------------------------------------------------------ loss and metrics

    def _compute_loss(self, model: Any, inputs: dict, return_outputs: bool) -> Any:
        from posttrain.core.losses import dpo_loss

        mode = "train" if self.model.training else "eval"
        out = self._packed(model, inputs, router=self.aux_loss_enabled)
        chosen, rejected = out["logps"].chunk(2)
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self.compute_ref_log_probs(self.ref_model or self.model, inputs)
        terms = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=self.beta)
        loss = terms["loss"].mean() * self.loss_weights[0]
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * out["aux_loss"]
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(out["aux_loss"].detach()).mean().item())
        self._log_packed(mode, inputs, out, chosen.detach(), rejected.detach(), terms)
        return (loss, out) if return_outputs else loss

    def _log_packed(self, mode: str, inputs: dict, out: dict, chosen: Any, rejected: Any, terms: dict) -> None:
        """The metrics TRL's padded ``_compute_loss`` logs, from per-sequence sums."""
        acc, m = self.accelerator, self._metrics[mode]

        def total(x: Any) -> float:
            return acc.gather_for_metrics(x.sum()).sum().item()

        def ratio(num: Any, den: Any) -> float:
            d = total(den)
            return total(num) / d if d > 0 else 0.0

        tokens, (tok_c, _) = out["tokens"], out["tokens"].chunk(2)
        m["entropy"].append(ratio(out["entropy"], tokens))
        if mode == "train":
            self._total_train_tokens += int(total(inputs["input_ids"].new_tensor(inputs["input_ids"].numel()))
                                            ) // self._tp_size
        m["num_tokens"] = [self._total_train_tokens]
        logit_c, logit_r = out["mean_logits"].chunk(2)
        m["logits/chosen"].append(ratio(logit_c, tok_c))
        m["logits/rejected"].append(ratio(logit_r, tokens.chunk(2)[1]))
        m["mean_token_accuracy"].append(ratio(out["top1"].chunk(2)[0], tok_c))
        cr, rr = acc.gather(terms["chosen_reward"]), acc.gather(terms["rejected_reward"])
        m["rewards/chosen"].append(cr.mean().item())
        m["rewards/rejected"].append(rr.mean().item())
        m["rewards/accuracies"].append((cr > rr).float().mean().item())
        m["rewards/margins"].append((cr - rr).mean().item())
        m["logps/chosen"].append(acc.gather(chosen).mean().item())
        m["logps/rejected"].append(acc.gather(rejected).mean().item())

    def prediction_step(self, model: Any, inputs: dict, prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple:
        """Evaluation: the loss only (a packed row has no per-example logits to hand to ``compute_metrics``)."""
        import torch

        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
