"""Helpers of the online DPO loop: where its checkpoint is, trimming its logs on resume, per-rank engines.

Input: the stage folder, the ``Dist`` of the run. Output: ``find_checkpoint`` (the newest complete
episode checkpoint and its state), ``truncate_jsonl`` (drop the lines of episodes that will run again),
``engine_per_rank`` (the environment in which each rank starts its own vLLM engine, on CPUs bound to
``cpu_share``, the rank's own cores).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from posttrain.core.distributed import Dist

CKPT = "checkpoint"  # OUT/checkpoint while the stage runs (removed at the end)
DS_TAG = "engine"  # DeepSpeed's sub-folder in it


def find_checkpoint(ckpt: Path) -> tuple[Path, dict | None]:
    """The newest complete checkpoint folder and its state (``checkpoint``, or ``checkpoint.old`` when a kill
    fell between the two renames of ``OnlineDPOLoop.checkpoint``)."""
    for d in (ckpt, ckpt.with_name(CKPT + ".old")):
        if (d / "state.json").is_file():
            return d, json.loads((d / "state.json").read_text())
    return ckpt, None


def truncate_jsonl(path: Path, keep: Any) -> None:
    """On resume, drop lines of episodes that will run again (a torn last line goes too)."""
    if not path.exists():
        return
    rows = []
    for x in path.read_text().splitlines():
        try:
            if x.strip() and keep(json.loads(x)):
                rows.append(x)
        except json.JSONDecodeError:
            continue
    path.write_text("".join(x + "\n" for x in rows))


@contextlib.contextmanager
def engine_per_rank(dist: Dist, backend: str) -> Any:
    """Environment in which each rank starts its own colocated vLLM engine (no-op in one process / for hf).

    The engine's processes are spawned, not forked: a forked engine inherits the training process
    group and hangs in its own distributed set-up. On GPUs the engine is pointed at this rank's device
    (vLLM puts a one-GPU engine on the first visible device) while it starts. On CPUs each engine is
    bound to this rank's own share of the cores (``cpu_share``): every per-rank engine is a one-worker
    vLLM world, so vLLM's automatic binding put all of them on the same core (measured: two engines on
    core 0 of 2). The variables are restored afterwards (the engine's processes are started by then).
    """
    if dist.world == 1 or backend != "vllm":
        yield
        return
    keys = ("VLLM_WORKER_MULTIPROC_METHOD", "CUDA_VISIBLE_DEVICES", "VLLM_CPU_OMP_THREADS_BIND")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
    if dist.device.startswith("cuda"):
        idx = int(dist.device.partition(":")[2] or 0)
        visible = [d.strip() for d in (saved["CUDA_VISIBLE_DEVICES"] or "").split(",") if d.strip()]
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[idx] if idx < len(visible) else str(idx)
    elif saved["VLLM_CPU_OMP_THREADS_BIND"] is None:  # a binding the user set is kept
        local = int(os.environ.get("LOCAL_RANK", dist.rank))
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world))
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cpu_share(local, per_node)))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cpu_share(local_rank: int, local_world: int, cores: list[int] | None = None) -> list[int]:
    """The cores of ``local_rank`` when this process's cores are split evenly over ``local_world`` ranks
    (at least one each; with fewer cores than ranks, ranks share cores round-robin)."""
    cores = sorted(os.sched_getaffinity(0)) if cores is None else sorted(cores)
    per = max(1, len(cores) // max(1, local_world))
    mine = cores[local_rank * per:(local_rank + 1) * per]
    return mine or [cores[local_rank % len(cores)]]
