"""Stage ``repurpose``: chunking and cleaning (pure), literary and role-play logic with a scripted
sampler (malformed JSON included), kill-and-resume, and one real run on the tiny model through vLLM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_synthesis.repurpose import (answer_prompt, chunk_text, clean_instruction, load_character, parse_queries,
                                      parse_work, role_system)
from posttrain.stages import load_recipe, recipe_from_dict
from posttrain.core.records import read_records
from posttrain.core.sampling.scripted import ScriptedSampler

ROOT = Path(__file__).resolve().parents[1]
LIT = ROOT / "recipes/data/literary"
CHARS = ROOT / "recipes/data/characters"


def run_recipe(tmp_path: Path, stages: list[dict], sampler, out: str = "out") -> dict:
    """Run stages through Recipe (with an injected sampler); return the manifests."""
    data = {"output_dir": str(tmp_path / out), "seed": 0, "stages": stages}
    return recipe_from_dict(data, tmp_path / "recipe.yaml").run(sampler=sampler)


# ---------------------------------------------------------------- pure parts

def test_chunk_text_packs_paragraphs_and_splits_long_ones():
    body = "one two three.\n\nfour five six seven.\n\n" + " ".join(f"w{i}." for i in range(25)) + "\n\nend here now."
    chunks = chunk_text(body, max_words=10, min_words=4)
    assert chunks[0] == "one two three.\n\nfour five six seven."  # two paragraphs packed (7 words)
    assert all(len(c.split()) <= 10 for c in chunks[:-1])
    # the 25-word paragraph was cut at sentence ends; nothing lost or reordered
    assert " ".join(" ".join(c.split()) for c in chunks).split() == body.split()
    # a short tail (3 words < min_words) is merged into the previous chunk
    assert chunks[-1].endswith("end here now.") and len(chunks[-1].split()) > 3


def test_parse_work_header_and_no_header():
    meta, body = parse_work("Title: T\nAuthor: A\n\nBody text.", "file")
    assert meta["title"] == "T" and meta["author"] == "A" and body == "Body text."
    meta, body = parse_work("Title: not a header\nbecause no blank line follows", "file")
    assert meta["title"] == "file" and body.startswith("Title: not a header")


@pytest.mark.parametrize("text,why", [
    ("   ", "empty"),
    ("Rewrite the passage in modern English.", "refers_to_passage"),
    ("word " * 30, "too_long"),
    ("Write: a single man in possession of a good fortune must be in want of a wife today", "copies_text"),
])
def test_clean_instruction_drops(text, why):
    chunk = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife."
    assert clean_instruction(text, chunk, max_words=20, leak_ngram=8) == (None, why)


def test_clean_instruction_strips_labels_and_quotes():
    assert clean_instruction('Instruction: "Write a fable about a fox."', "x", 50, 8) == ("Write a fable about a fox.", "ok")


def test_load_characters_both_formats_and_errors(tmp_path):
    m = load_character(CHARS / "mira_quell.json")
    t = load_character(CHARS / "tomas_verdan.txt")
    assert m["name"] == "Mira Quell" and "lighthouse" in m["profile"] and m["setting"]
    assert t["name"] == "Tomas Verdan" and "glassblower" in t["profile"]
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "X"}')
    with pytest.raises(ValueError, match=r"bad.json: 'profile' must be a non-empty string"):
        load_character(bad)


def test_parse_queries_malformed_and_variants():
    assert parse_queries("not json at all", 3) is None
    assert parse_queries('["a", "b", ', 3) is None  # truncated
    assert parse_queries('Sure!\n```json\n["Q1?", "q1?", {"query": "Q2?"}, 5]\n```', 3) == ["Q1?", "Q2?"]
    assert parse_queries('{"queries": ["a", "b", "c", "d"]}', 2) == ["a", "b"]


# ---------------------------------------------------------------- literary, scripted

def literary_reply(prompt, j):
    text = prompt[-1]["content"]
    if "very short" in text:
        return "Write a short fable." if j == 0 else "Write a short fable."  # j=1 duplicate -> dropped
    if "two or three sentences" in text:
        return f"Instruction: Tell a story in a calm voice about choice number {j}."
    return "Summarise the passage above."  # detailed level: leans on the passage -> dropped


def test_literary_stage_scripted(tmp_path):
    src = tmp_path / "works"
    src.mkdir()
    (src / "a.txt").write_text("Title: Work A\nAuthor: Someone\n\n" + "\n\n".join(["alpha " * 30] * 3))
    (src / "b.txt").write_text("beta " * 50)
    (src / "ignored.md").write_text("not a .txt work")
    m = run_recipe(tmp_path, [{"kind": "repurpose", "mode": "literary", "inputs": [str(src)], "chunk_words": 60,
                               "min_chunk_words": 10, "instructions_per_level": 2}], ScriptedSampler(literary_reply))
    s = m["repurpose"]["summary"]
    # a.txt: 3 paragraphs of 30 words -> chunks of 60 + 30 words; b.txt: one chunk -> 3 chunks x 3 levels x 2
    assert s["works"] == 2 and s["chunks"] == 3 and s["instructions_sampled"] == 18
    assert s["dropped"] == {"duplicate": 3, "refers_to_passage": 6}
    recs = read_records(tmp_path / "out/repurpose/records.jsonl", "demonstration")
    assert len(recs) == s["records"] == 3 + 6  # brief: 1 per chunk (2nd is a duplicate); moderate: 2 per chunk
    by_level = {}
    for r in recs:
        by_level.setdefault(r["meta"]["level"], []).append(r)
        assert r["messages"][0]["role"] == "user" and r["messages"][1]["role"] == "assistant"
        assert r["source"] == "repurpose:literary"
    assert set(by_level) == {"brief", "moderate"}
    a = [r for r in recs if r["meta"]["file"] == "a.txt"]
    assert a[0]["meta"]["work"] == "Work A" and a[0]["meta"]["author"] == "Someone"
    # the response is the original human text, not model output
    assert {r["messages"][1]["content"] for r in recs if r["meta"]["file"] == "b.txt"} == {("beta " * 50).strip()}
    assert {r["messages"][0]["content"] for r in by_level["moderate"]} == {
        "Tell a story in a calm voice about choice number 0.", "Tell a story in a calm voice about choice number 1."}


def test_shipped_works_chunk_and_prompt_fit():
    files = sorted(LIT.glob("*.txt"))
    assert len(files) >= 3
    for f in files:
        meta, body = parse_work(f.read_text(), f.stem)
        assert meta["author"] != "unknown" and "public domain" in meta.get("source", "")
        assert chunk_text(body, 300, 40)


# ---------------------------------------------------------------- role-play, scripted

def roleplay_reply(prompt, j):
    text = prompt[-1]["content"]
    if "Does the reply decline" in text:  # the refusal check
        if "lens clean" in text:
            return "yes it does"  # unreadable verdict -> dropped
        return json.dumps({"declines": "no notion" in text})
    if prompt[0]["role"] == "user":  # query generation
        if "could not know" in text:
            if "Tomas" in text:
                return '["What do you think of the printing press?", '  # malformed: truncated JSON
            return '```json\n["Did you ride the railway to London in 1950?", "What is a radio?"]\n```'
        return json.dumps(["How do you trim the wicks?", "How do you keep the lens clean?"] if "Mira" in text
                          else ["What colour is your best glass?", "Who taught you?", "Who taught you?"])
    if "Who taught you" in text:
        return "As an AI language model, I cannot say."  # breaks character -> dropped
    if "cannot know" in prompt[0]["content"]:
        return "A radio? I've no notion what that is, friend."
    return "With patience and a soft cloth, every morning."


def test_roleplay_stage_scripted(tmp_path):
    m = run_recipe(tmp_path, [{"kind": "repurpose", "mode": "roleplay", "inputs": [str(CHARS)]}],
                   ScriptedSampler(roleplay_reply))
    s = m["repurpose"]["summary"]
    assert s["characters"] == 2 and s["query_prompts"] == 4
    assert s["queries"] == 2 + 2 + 2  # Mira: 2 grounded + 2 unknowable; Tomas: 2 distinct grounded, unknowable malformed
    assert s["dropped"] == {"malformed_queries": 1, "breaks_character": 1, "check_unreadable": 1}
    recs = read_records(tmp_path / "out/repurpose/records.jsonl", "demonstration")
    assert len(recs) == 4 and s["kept_by_kind"] == {"grounded": 2, "unknowable": 2}
    chars = {c["name"]: c for c in (load_character(CHARS / "mira_quell.json"), load_character(CHARS / "tomas_verdan.txt"))}
    for r in recs:
        sys_msg = r["messages"][0]
        assert sys_msg["role"] == "system" and sys_msg["content"] == role_system(chars[r["meta"]["character"]])
        assert "Guidance" not in sys_msg["content"]  # synthesis guidance is not training data
    refusals = [r for r in recs if r["meta"]["query_kind"] == "unknowable"]
    assert all(r["meta"]["character"] == "Mira Quell" for r in refusals)
    assert {r["messages"][1]["content"] for r in refusals} == {"Did you ride the railway to London in 1950?", "What is a radio?"}


def test_answer_prompt_guides_refusal_but_keeps_role():
    ch = load_character(CHARS / "mira_quell.json")
    p = answer_prompt(ch, "unknowable", "What is a radio?")
    assert p[0]["content"].startswith(role_system(ch)) and "decline" in p[0]["content"]


# ---------------------------------------------------------------- kill and resume

class Crashing:
    """Wraps a sampler; raises on generate call number ``crash_at`` (1-based), counts calls."""

    name = "crashing"

    def __init__(self, inner, crash_at: int | None):
        self.inner, self.crash_at, self.calls, self.prompts = inner, crash_at, 0, 0

    def generate(self, prompts, params, seeds=None):
        self.calls += 1
        if self.crash_at is not None and self.calls == self.crash_at:
            raise RuntimeError("killed")
        self.prompts += len(prompts)
        return self.inner.generate(prompts, params, seeds)

    def close(self):
        pass


def test_roleplay_kill_and_resume_no_duplicates_nothing_lost(tmp_path):
    stages = [{"kind": "repurpose", "mode": "roleplay", "inputs": [str(CHARS)], "answers_per_query": 2}]
    ref = Crashing(ScriptedSampler(roleplay_reply), None)
    run_recipe(tmp_path, stages, ref, out="clean")
    crashing = Crashing(ScriptedSampler(roleplay_reply), crash_at=2)  # dies in the answers step
    with pytest.raises(RuntimeError, match="killed"):
        run_recipe(tmp_path, stages, crashing, out="resumed")
    out, clean_out = tmp_path / "resumed/repurpose", tmp_path / "clean/repurpose"
    steps = lambda d: {p.name: [json.loads(x) for x in p.read_text().splitlines()]  # noqa: E731
                       for p in (d / "steps").glob("*.jsonl")}
    assert not (out / "manifest.json").exists() and not (out / "records.jsonl").exists()
    # the queries step is committed as the uninterrupted run has it; nothing of the answers step
    assert {n: rows for n, rows in steps(out).items() if rows} == {"queries.jsonl": steps(clean_out)["queries.jsonl"]}
    again = Crashing(ScriptedSampler(roleplay_reply), None)
    run_recipe(tmp_path, stages, again, out="resumed")
    assert again.calls == 2 and again.prompts == ref.prompts - 4  # cached queries were not asked again
    # every step cache holds each item once, the same as the uninterrupted run's: nothing lost, no duplicates
    got_steps, want_steps = steps(out), steps(clean_out)
    assert sorted(got_steps) == sorted(want_steps) == ["answers.jsonl", "queries.jsonl", "refusal_check.jsonl"]
    for n, want in want_steps.items():
        got = got_steps[n]
        assert len({r["k"] for r in got}) == len(got) and want
        assert sorted(got, key=lambda r: r["k"]) == sorted(want, key=lambda r: r["k"]), n
    got = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    clean = read_records(clean_out / "records.jsonl")
    assert len({r["id"] for r in got}) == len(got) == 4  # 2nd answers: duplicates
    assert sorted(got, key=lambda r: r["id"]) == sorted(clean, key=lambda r: r["id"])


def test_literary_resume_after_torn_record_line(tmp_path):
    src = tmp_path / "w.txt"
    src.write_text("gamma " * 40)
    stages = [{"kind": "repurpose", "mode": "literary", "inputs": [str(src)], "levels": ["moderate"]}]
    run_recipe(tmp_path, stages, ScriptedSampler(literary_reply))
    out = tmp_path / "out/repurpose"
    full = (out / "records.jsonl").read_text()
    (out / "manifest.json").unlink()  # as if killed before the manifest
    (out / "records.jsonl").write_text(full[: len(full) // 2])  # ... in the middle of a record line
    run_recipe(tmp_path, stages, ScriptedSampler(lambda p, j: pytest.fail("cached step re-sampled")))
    assert (out / "records.jsonl").read_text() == full


# ---------------------------------------------------------------- real tiny model through vLLM

def test_repurpose_real_vllm(tmp_path, vllm_sampler):
    stages = [
        {"kind": "repurpose", "name": "lit", "mode": "literary", "inputs": [str(LIT / "grimm_golden_key.txt")],
         "chunk_words": 60, "min_chunk_words": 20, "require_stop": False,
         "sampling": {"temperature": 0.8, "max_tokens": 24, "seed": 0}},
        {"kind": "repurpose", "name": "rp", "mode": "roleplay", "inputs": [str(CHARS)], "require_stop": False,
         "min_success_rate": 0,  # the random tiny model rarely writes a JSON list of queries
         "grounded_queries": 2, "unknowable_queries": 1, "sampling": {"temperature": 0.8, "max_tokens": 24, "seed": 0}},
    ]
    m = run_recipe(tmp_path, stages, vllm_sampler)
    lit = m["lit"]["summary"]
    assert lit["works"] == 1 and lit["instructions_sampled"] == lit["chunks"] * 3 > 0
    assert lit["records"] + sum(lit["dropped"].values()) == lit["instructions_sampled"]
    for r in read_records(tmp_path / "out/lit/records.jsonl", "demonstration"):
        assert r["messages"][1]["content"] in (LIT / "grimm_golden_key.txt").read_text().replace("\n\n", "\x00").replace("\n", " ").replace("\x00", "\n\n")
    rp = m["rp"]["summary"]
    assert rp["characters"] == 2 and rp["query_prompts"] == 4
    # nonsense output is rarely a JSON list: every query prompt is either parsed or counted malformed
    assert rp["dropped"].get("malformed_queries", 0) + (rp["queries"] > 0) >= 1
    assert (tmp_path / "out/rp/records.jsonl").exists() and (tmp_path / "out/rp/stats.json").exists()
