"""Record schemas and I/O: validation messages, formats, append-safe idempotent writer."""

import json

import pytest

from posttrain.core.records import (RecordError, RecordWriter, demonstration, iter_records, preference, read_records,
                               to_chat_prompt, write_records)

U = [{"role": "user", "content": "hi"}]


def _demo(i):
    return demonstration(U + [{"role": "assistant", "content": f"hello {i}"}], source="test", id=f"d{i}")


def test_builders_are_trl_conversational():
    d = _demo(0)
    assert set(d) == {"id", "messages", "source", "meta"}
    p = preference(U, "good", "bad", source="t", margin=1.5)
    assert p["chosen"] == [{"role": "assistant", "content": "good"}]
    assert p["rejected"][0]["content"] == "bad" and p["margin"] == 1.5
    assert to_chat_prompt(d) == U and to_chat_prompt(p) == U


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ""])
def test_roundtrip_all_formats(tmp_path, suffix):
    rows = [_demo(i) for i in range(3)] + [preference(U, "a", "b", source="t", meta={"k": [1, 2]})]
    path = tmp_path / f"data{suffix}"
    assert write_records(path, rows) == 4
    back = read_records(path)
    assert [r["id"] for r in back] == [r["id"] for r in rows]
    assert back[3]["meta"] == {"k": [1, 2]} and back[0]["messages"] == rows[0]["messages"]


def test_validation_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(_demo(0)) + "\n" + json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(RecordError, match=r"bad.jsonl:2: messages\[0\].role"):
        read_records(p)
    p.write_text("{not json}\n")
    with pytest.raises(RecordError, match=r"bad.jsonl:1: invalid JSON"):
        read_records(p)
    p.write_text(json.dumps({"chosen": [{"role": "assistant", "content": "x"}]}) + "\n")
    with pytest.raises(RecordError, match=r"bad.jsonl:1: 'prompt'"):
        read_records(p)
    with pytest.raises(RecordError, match="no such file"):
        read_records(tmp_path / "missing.jsonl")


def test_parquet_row_errors_name_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"id": "a", "messages": [{"role": "user", "content": "x"}]},
                                         {"id": "b", "messages": []}]), tmp_path / "x.parquet")
    with pytest.raises(RecordError, match=r"x.parquet:row 1"):
        read_records(tmp_path / "x.parquet")


def test_writer_is_idempotent_and_repairs_torn_line(tmp_path):
    p = tmp_path / "out.jsonl"
    with RecordWriter(p) as w:
        assert w.write(_demo(0)) and w.write(_demo(1))
        assert not w.write(_demo(1))  # same id: skipped
    # a crash mid-write leaves a torn line without newline
    with open(p, "a") as f:
        f.write('{"id": "d2", "messages": [{"role": "us')
    assert [r["id"] for r in read_records(p)] == ["d0", "d1"]  # readers drop it too
    with RecordWriter(p) as w:
        assert w.has("d0") and not w.has("d2")
        assert w.write_many([_demo(1), _demo(2), _demo(3)]) == 2
    ids = [r["id"] for r in read_records(p)]
    assert ids == ["d0", "d1", "d2", "d3"]


def test_writer_refuses_corrupt_middle_line(tmp_path):
    p = tmp_path / "out.jsonl"
    p.write_text(json.dumps(_demo(0)) + "\ngarbage\n" + json.dumps(_demo(1)) + "\n")
    with pytest.raises(RecordError, match=r"out.jsonl:2: corrupt"):
        RecordWriter(p)
    assert "garbage" in p.read_text()  # nothing written is lost


def test_prompt_records_accept_strings():
    from posttrain.core.records import validate

    r = validate({"prompt": "What is 2+2?"}, "prompt")
    assert r["prompt"] == [{"role": "user", "content": "What is 2+2?"}] and r["id"]
