"""Shared parts of the training benchmarks (``bench_train.py``, ``bench_pairs.py``).

Importing this module puts the repository root on ``sys.path`` and sets the offline / tokenizer
environment the benchmarks run under. It provides the generated data (``WORDS``, ``fit_messages``,
``mixed_conversations``), the model shapes (``MODELS``, ``model_dir``), a per-step timer callback,
the process's resident memory, and the one-line machine description printed with every table.
The scripts are run as ``python scripts/NAME.py``, so ``scripts/`` is on the path and
``import bench_common`` works from them.
"""

from __future__ import annotations

import os
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ("alpha beta gamma delta number river stone light paper water green table garden window music "
         "seven eleven forty answer question simple careful quick brown").split()

# ~25M parameters with the tiny 1024-entry tokenizer: hidden 512, 8 layers, 8 heads / 2 KV heads, MLP 1536.
MODELS = {"tiny": {}, "medium": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8,
                                 "num_attention_heads": 8, "num_key_value_heads": 2}}


def model_dir(root: Path, name: str, reward: bool = True) -> Path:
    """The ``MODELS[name]`` test model (tiny tokenizer) in ``root/name``, built once."""
    from posttrain.core.tiny import TinySpec, make_tiny_model

    d = root / name
    if not (d / "config.json").exists():
        make_tiny_model(d, TinySpec(**MODELS[name]), reward=reward)
    return d


# ---------------------------------------------------------------- data

def fit_messages(tok, msgs: list[dict], target: int) -> list[dict]:
    """Shorten the last message until the templated conversation has at most ``target`` tokens."""
    def n() -> int:
        return len(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])

    while n() > target:
        words = msgs[-1]["content"].split()
        if len(words) <= 1:
            break
        cut = max(1, min(len(words) - 1, int(len(words) * min(0.95, target / n()))))
        msgs[-1]["content"] = " ".join(words[:cut])
    return msgs


def mixed_conversations(tok, n: int, lo: int = 20, hi: int = 1000, seed: int = 0) -> list[list[dict]]:
    """``n`` user/assistant conversations; each templated length is drawn uniformly from [lo, hi] tokens
    (about 30% prompt, 70% reply before the reply is trimmed to fit)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        target = rng.randint(lo, hi)
        q_words, a_words = max(1, int(target * 0.3 / 1.5)), max(1, int(target * 0.7 / 1.5))
        msgs = [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(q_words))},
                {"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(a_words))}]
        out.append(fit_messages(tok, msgs, target))
    return out


# ---------------------------------------------------------------- measuring

def rss_mib() -> float:
    """Resident memory of this process now (MiB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def step_timer():
    """A Trainer callback whose ``t`` lists the wall time of every optimizer step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t, self.t0 = [], 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.t.append(time.perf_counter() - self.t0)

    return StepTimer()


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the architecture where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """``x86_64, 2 CPU cores, no GPU, Python ..., torch ..., transformers ..., trl ...``."""
    import torch
    import transformers
    import trl

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, Python {platform.python_version()}, "
            f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")
