"""Process-group helpers shared by every trainer: who writes, waiting for rank 0, DeepSpeed on CPU.

Input: the environment a launcher sets (``RANK``, ``WORLD_SIZE``, ``ACCELERATE_USE_DEEPSPEED``...)
and, for ``Dist``, a batch size and dtype. Output: ``is_main_process`` / ``barrier`` for the
stages and the recipe runner, ``setup_distributed`` (a gloo group before a ZeRO-3 model is
built on CPU), ``distributed_info`` for manifests, and ``Dist``: the hand-written online loop's
view of one process or of ranks started by ``accelerate launch`` (DeepSpeed ZeRO-2/3 or DDP).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any


def on_gpu() -> bool:
    """True when a CUDA device is usable."""
    import torch

    return torch.cuda.is_available()


def world_size() -> int:
    """Number of processes of this launch (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 of a distributed launch (or a plain process)."""
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process): rank 0 writes outputs the next stage reads."""
    import sys

    if "torch" not in sys.modules:  # nothing distributed can have started without torch
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def plain_loading() -> Any:
    """Context in which ``from_pretrained`` builds a whole, local model even while a ZeRO-3 trainer lives.

    Under ZeRO-3, transformers partitions every model built while the trainer's DeepSpeed config
    exists, which broadcasts from rank 0: a model loaded by one rank only (the reward model's
    held-out evaluation, a LoRA merge, a scorer, a sampler) would wait forever for the other
    ranks. Models that are never wrapped in an engine must be loaded inside this context.
    """
    import sys

    hfds = sys.modules.get("transformers.integrations.deepspeed")
    saved = getattr(hfds, "_hf_deepspeed_config_weak_ref", None)
    if hfds is not None:
        hfds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        if hfds is not None:
            hfds._hf_deepspeed_config_weak_ref = saved


def deepspeed_requested(deepspeed_config: str | None = None) -> bool:
    """True when a DeepSpeed json is set or the launcher (accelerate) asked for DeepSpeed."""
    return bool(deepspeed_config) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")


def setup_distributed(deepspeed_config: str | None = None) -> None:
    """Prepare DeepSpeed on CPU: pick its CPU accelerator and a gloo group before models are built.

    ZeRO-3 partitions parameters while ``from_pretrained`` runs, so the process group must exist
    first; on GPUs accelerate does this itself with NCCL.
    """
    if on_gpu():
        return
    ds = deepspeed_requested(deepspeed_config)
    if world_size() > 1 or ds:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if ds and world_size() > 1:
        import deepspeed
        import torch.distributed as dist

        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="gloo")


def distributed_info(trainer: Any) -> dict:
    """World size and DeepSpeed ZeRO stage an HF trainer actually ran with (for the manifest)."""
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None) if trainer.is_deepspeed_enabled else None
    return {"world_size": trainer.args.world_size, "deepspeed": bool(plugin),
            "zero_stage": plugin.zero_stage if plugin else None,
            "backend": str(getattr(trainer.args, "ddp_backend", None) or trainer.accelerator.state.backend)}


class Dist:
    """One process, or ranks started by ``accelerate launch`` (DeepSpeed ZeRO-2/3 or DDP), for a hand-written loop.

    ``micro_batch`` is what each rank feeds per optimizer step (DeepSpeed's "auto" batch keys are
    filled from it, since no dataloader is prepared); ``dtype`` fills DeepSpeed's "auto" bf16/fp16.
    Only the main rank writes files.
    """

    def __init__(self, device: str, micro_batch: int, max_grad_norm: float, dtype: str):
        self.world = world_size()
        self.acc = None
        self.engine: Any = None  # the DeepSpeed engine, once prepared
        self.rank, self.device, self.deepspeed, self.zero_stage = 0, device, False, None
        if self.world == 1:
            return
        from accelerate import Accelerator

        # accelerate ignores its DeepSpeed config when asked for cpu=True; DS_ACCELERATOR=cpu runs it on CPUs.
        use_ds = deepspeed_requested()
        if use_ds and device == "cpu":
            from accelerate import PartialState

            # On CPUs accelerate starts no process group for DeepSpeed (each rank would train alone):
            # a CPU (gloo) state first, then the DeepSpeed accelerator on top of it.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            PartialState(cpu=True)
        self.acc = Accelerator(cpu=device == "cpu" and not use_ds)
        self.rank, self.device = self.acc.process_index, str(self.acc.device)
        if self.acc.num_processes != self.world:
            raise RuntimeError(f"WORLD_SIZE is {self.world} but accelerate sees {self.acc.num_processes} "
                               "process(es); the process group did not start")
        plugin = self.acc.state.deepspeed_plugin
        if plugin is not None:
            self.deepspeed, self.zero_stage = True, plugin.zero_stage
            ds = plugin.deepspeed_config
            ds.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=1,
                      train_batch_size=micro_batch * self.world, gradient_clipping=max_grad_norm,
                      zero_allow_untested_optimizer=True)
            for key in ("bf16", "fp16"):
                if isinstance(ds.get(key), dict) and ds[key].get("enabled") == "auto":
                    ds[key]["enabled"] = dtype == ("bfloat16" if key == "bf16" else "float16")

    @property
    def main(self) -> bool:
        """True on the rank that writes files."""
        return self.rank == 0

    def prepare(self, model: Any, optimizer: Any) -> tuple[Any, Any]:
        """(training module, optimizer): DeepSpeed engine / DDP wrapper under accelerate, else unchanged."""
        if self.acc is None:
            return model, optimizer
        wrapped, optimizer = self.acc.prepare(model, optimizer)
        self.engine = wrapped if self.deepspeed else None
        return wrapped, optimizer

    def settle(self) -> None:
        """ZeRO-3: wait for every parameter fetch still in flight and release them all.

        A forward through the bare module (a probe, outside the engine's step) leaves ZeRO-3's prefetch of
        the next layers in flight; gathering the whole model then fails on exit ("Cannot partition a param
        in flight"). Call on every rank before such a gather."""
        if self.zero_stage == 3 and getattr(self, "engine", None) is not None:
            self.engine.empty_partition_cache()

    def gather(self, obj: Any) -> list:
        """Every rank's ``obj``, in rank order (``[obj]`` in one process)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as td

        out: list = [None] * self.world
        td.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as td

        box = [obj]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def block_gather(self, size: int) -> tuple[Callable[[Any], list], int]:
        """(gather within this rank's block of ``size`` consecutive ranks, this rank's index in it).

        Every rank must call this together (it creates the blocks' process groups)."""
        if size == self.world:
            return self.gather, self.rank
        import torch.distributed as td

        groups = [td.new_group(list(range(s, s + size))) for s in range(0, self.world, size)]
        mine = groups[self.rank // size]

        def gather(obj: Any) -> list:
            out: list = [None] * size
            td.all_gather_object(out, obj, group=mine)
            return out

        return gather, self.rank % size

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.world > 1:
            import torch.distributed as td

            td.barrier()

    def backward_step(self, loss: Any, model: Any, optimizer: Any, max_grad_norm: float) -> None:
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

    def plain_loading(self) -> Any:
        """Context in which ``from_pretrained`` builds whole models even under ZeRO-3 (the frozen reference
        and the reward model are never wrapped in an engine, so they must not be partitioned)."""
        return plain_loading()

    def gathered(self, model: Any) -> Any:
        """Context in which ``model``'s parameters are whole (ZeRO-3 gathers its shards; call on every rank)."""
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
