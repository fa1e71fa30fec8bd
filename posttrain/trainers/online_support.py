"""Helpers of the online DPO loop: where its checkpoint is, trimming its logs on resume, per-rank engines.

Input: the stage folder, the ``Dist`` of the run. Output: ``find_checkpoint`` (the newest complete
episode checkpoint and its state), ``truncate_jsonl`` (drop the lines of episodes that will run again),
``engine_per_rank`` (the environment in which each rank starts its own vLLM engine).
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
    (vLLM puts a one-GPU engine on the first visible device) while it starts. Both variables are
    restored afterwards (the engine's processes are started by then).
    """
    if dist.world == 1 or backend != "vllm":
        yield
        return
    saved = {k: os.environ.get(k) for k in ("VLLM_WORKER_MULTIPROC_METHOD", "CUDA_VISIBLE_DEVICES")}
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
    if dist.device.startswith("cuda"):
        idx = int(dist.device.partition(":")[2] or 0)
        visible = [d.strip() for d in (saved["CUDA_VISIBLE_DEVICES"] or "").split(",") if d.strip()]
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[idx] if idx < len(visible) else str(idx)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
