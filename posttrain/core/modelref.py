"""Model references: a local folder or a Hugging Face hub id, resolved to a local folder.

Input: a reference string from a recipe (``model.path``, ``model.base``, a stage's ``model`` /
``ref_model`` / ``reward_model`` ...), already stripped of ``@stage`` forms by the recipe.
Output: ``resolve(ref)`` -> a local folder (hub ids go through the Hugging Face cache under
``HF_HOME``, and are downloaded only where a hub is reachable and ``HF_HUB_OFFLINE`` is unset);
``check(ref)`` -> None when the reference can be resolved, else why not (``posttrain validate``
reports it before anything runs). The revision of a cached hub model is the snapshot commit.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ModelRefError(ValueError):
    """A model reference is neither a local folder nor an available hub model."""


def looks_like_hub_id(ref: str) -> bool:
    """``org/name`` with no path separators beyond the one slash (and not an existing path)."""
    return bool(_HUB_ID.match(ref)) and not Path(ref).exists()


def offline() -> bool:
    """True when the environment forbids hub access (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def cached_snapshot(repo_id: str) -> str | None:
    """The local snapshot folder of ``repo_id`` in the Hugging Face cache (None when not cached)."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure means "not usable from the cache"
        return None


def check(ref: str, hub_timeout_s: float = 10.0) -> str | None:
    """None when ``ref`` resolves (local folder, cached hub model, or a hub that answers), else the reason."""
    if Path(ref).is_dir():
        return None
    if Path(ref).exists():
        return f"{ref!r} is a file, not a model folder"
    if not looks_like_hub_id(ref):
        return f"{ref!r} is not a folder (and not a hub id of the form org/name)"
    if cached_snapshot(ref):
        return None
    from huggingface_hub import constants

    home = f"HF_HUB_CACHE={constants.HF_HUB_CACHE}"  # the folder actually searched, whichever variable set it
    if offline():
        return (f"{ref!r} is not a local folder and not in the Hugging Face cache ({home}), and the hub is "
                "off (HF_HUB_OFFLINE=1): download it on a machine with hub access or point at a local folder")
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(ref, timeout=hub_timeout_s)
    except Exception as e:  # noqa: BLE001 - unreachable hub, unknown repo, gated repo...
        return (f"{ref!r} is not a local folder, not in the Hugging Face cache ({home}), and the hub "
                f"cannot provide it ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
    return None


def resolve(ref: str) -> str:
    """A local folder for ``ref``: the folder itself, or the hub model's cached (or downloaded) snapshot."""
    if Path(ref).is_dir():
        return ref
    if not looks_like_hub_id(ref):
        raise ModelRefError(f"{ref!r}: no such model folder")
    snap = cached_snapshot(ref)
    if snap:
        return snap
    why = check(ref)
    if why:
        raise ModelRefError(why)
    from huggingface_hub import snapshot_download

    return snapshot_download(ref)


def revision(path: str) -> str | None:
    """The snapshot commit of a folder inside the Hugging Face cache (``.../snapshots/<commit>``), else None."""
    parts = Path(path).resolve().parts
    if "snapshots" in parts:
        i = parts.index("snapshots")
        return parts[i + 1] if i + 1 < len(parts) else None
    return None
