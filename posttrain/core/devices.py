"""Device and dtype resolution: the one meaning of ``device: auto`` and ``dtype: auto`` in the project.

Input: a device name (``auto``, ``cpu``, ``cuda``, ``cuda:1``) and a dtype name (``auto``,
``float32``, ``bfloat16``, ``float16``). Output: the concrete device string and torch dtype.
``auto`` dtype means bfloat16 on a CUDA device that supports it and float32 everywhere else
(CPUs here have no bf16 units: bf16 is 5-15x slower on them; fp16 is not chosen
automatically because training in fp16 needs loss scaling).
"""

from __future__ import annotations

from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(device: str = "auto") -> str:
    """'auto' -> ``cuda`` when a CUDA device is usable, else ``cpu``; other names pass through."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def dtype_name(name: str, device: str = "auto") -> str:
    """The concrete dtype name for ``name`` on ``device`` (``auto`` resolved as the module says)."""
    if name != "auto":
        return name
    import torch

    dev = resolve_device(device)
    return "bfloat16" if dev.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"


def torch_dtype(name: str, device: str = "auto") -> Any:
    """The torch dtype for ``name`` on ``device``."""
    import torch

    return getattr(torch, dtype_name(name, device))
