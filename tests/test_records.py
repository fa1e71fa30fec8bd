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
    with pytest.raises(RecordError, match=r"bad.jsonl:1: 'rejected' is missing"):
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


def test_record_errors_are_user_errors():
    """The CLI prints BadInput as one line; a RecordError of any reader must be one."""
    from posttrain.core.errors import USER_ERRORS, BadInput

    assert issubclass(RecordError, BadInput) and issubclass(RecordError, USER_ERRORS)


def test_text_demonstrations_roundtrip_and_keep_ids(tmp_path):
    rows = [{"text": "plain text one"}, _demo(1)]
    for suffix in (".jsonl", ".parquet"):
        path = tmp_path / f"t{suffix}"
        write_records(path, rows, "demonstration")
        back = read_records(path, "demonstration")
        assert back[0]["text"] == "plain text one" and "messages" not in back[0] and back[1]["id"] == "d1"
    # ids of records without one are what earlier versions computed (resumed stages keep matching them)
    from posttrain.core.records import record_id, validate

    msgs = U + [{"role": "assistant", "content": "x"}]
    assert validate({"messages": msgs})["id"] == record_id("demonstration", {"messages": msgs, "prompt": None,
                                                                             "chosen": None, "rejected": None})


def test_check_input_counts_and_audits(tmp_path):
    from posttrain.core.records import check_input

    p = tmp_path / "d.jsonl"
    write_records(p, [_demo(i) for i in range(10)])
    assert check_input(p, "demonstration") == 10
    with open(p, "a") as f:  # 1 of 11 without an assistant turn: under the default share (0.1)...
        f.write(json.dumps({"messages": U}) + "\n")
    assert check_input(p, "demonstration") == 11
    with pytest.raises(RecordError, match=r"d.jsonl: 1 of 11 rows are unusable \(no_assistant_turn: 1; first: "
                                          r".*d.jsonl:11: no_assistant_turn\)"):
        check_input(p, "demonstration", max_flagged_share=0.05)
    assert check_input(p, "prompt") == 11  # as prompts the same rows are fine
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(RecordError, match="e.jsonl: no records"):
        check_input(tmp_path / "e.jsonl", "demonstration")
    assert read_records(tmp_path / "e.jsonl") == []  # plain reading of an empty file is not an error


def test_bom_and_crlf_are_read(tmp_path):
    p = tmp_path / "win.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(_demo(0)).encode() + b"\r\n" + json.dumps(_demo(1)).encode() + b"\r\n")
    assert [r["id"] for r in read_records(p)] == ["d0", "d1"]


def test_pretty_printed_json_gets_a_hint(tmp_path):
    p = tmp_path / "pretty.jsonl"
    p.write_text(json.dumps(_demo(0), indent=2))
    with pytest.raises(RecordError, match=r"pretty.jsonl:1: invalid JSON .*one whole record per line"):
        read_records(p)
