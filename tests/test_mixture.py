"""Stage inputs as mixtures of sources: proportions, row counts, filters, splits, determinism, stats."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from posttrain.core.config import ConfigError, build
from posttrain.core.errors import RecordError
from posttrain.core.inputs import DataSection, Source, largest_remainder, read_input


def write_demos(path: Path, n: int, tag: str, **meta) -> str:
    rows = [{"id": f"{tag}{i}", "messages": [{"role": "user", "content": f"{tag} q{i}"},
                                             {"role": "assistant", "content": f"{tag} a{i}"}],
             "source": tag, "meta": {"i": i, **meta}} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def src(**kw) -> Source:
    return build(Source, kw, "input[0]", "recipe.yaml")


def origin(recs: list[dict]) -> Counter:
    return Counter(r["source"] for r in recs)


def ident(p):
    return p


@pytest.fixture
def three(tmp_path):
    return (write_demos(tmp_path / "a.jsonl", 100, "a"), write_demos(tmp_path / "b.jsonl", 100, "b"),
            write_demos(tmp_path / "c.jsonl", 100, "c"))


def test_weights_give_the_configured_proportions(three):
    a, b, c = three
    spec = [src(path=a, weight=0.5), src(path=b, weight=0.3), src(path=c, weight=0.2)]
    recs, st = read_input(spec, "demonstration", ident, seed=3)
    # the largest mixture with these shares and no repeated row: c limits it (100 / 0.2 = 500 > 100 / 0.5 = 200)
    assert origin(recs) == {"a": 100, "b": 60, "c": 40} and st["rows"] == 200
    shares = {k.split()[1]: v["share"] for k, v in st["sources"].items()}
    assert shares == {a: 0.5, b: 0.3, c: 0.2}
    assert len({r["id"] for r in recs}) == 200  # without replacement
    # a limit scales the whole mixture and keeps the proportions
    recs, st = read_input(spec, "demonstration", ident, seed=3, limit=50)
    assert origin(recs) == {"a": 25, "b": 15, "c": 10}
    # weights need not add up to 1; scarce sources bound the total
    small = [src(path=a, weight=2), src(path=b, weight=1)]
    recs, _ = read_input(small, "demonstration", ident, seed=0)
    assert origin(recs) == {"a": 100, "b": 50}


def test_mixture_is_deterministic_under_the_seed_and_shuffled(three):
    a, b, c = three
    spec = [src(path=a, weight=1), src(path=b, weight=1), src(path=c, rows=10)]
    one, st1 = read_input(spec, "demonstration", ident, seed=7, limit=40)
    two, st2 = read_input(spec, "demonstration", ident, seed=7, limit=40)
    other, _ = read_input(spec, "demonstration", ident, seed=8, limit=40)
    assert [r["id"] for r in one] == [r["id"] for r in two] and st1 == st2
    assert [r["id"] for r in one] != [r["id"] for r in other]
    assert origin(one) == {"a": 15, "b": 15, "c": 10}  # fixed rows first, the weights share the rest
    assert [r["source"] for r in one[:10]] != sorted(r["source"] for r in one[:10])  # interleaved, not by source


def test_rows_beyond_the_source_repeat_it_with_distinct_ids(tmp_path):
    p = write_demos(tmp_path / "small.jsonl", 3, "s")
    recs, st = read_input([src(path=p, rows=8)], "demonstration", ident, seed=0)
    ids = [r["id"] for r in recs]
    assert len(recs) == 8 and len(set(ids)) == 8
    base = Counter(i.split("~")[0] for i in ids)
    assert sorted(base.values()) == [2, 3, 3]  # every row twice, two of them a third time
    assert st["sources"][f"input[0] {p}"]["repeated"] == 5
    recs, _ = read_input([src(path=p, rows=2)], "demonstration", ident, seed=0)
    assert len(recs) == 2 and len({r["id"] for r in recs}) == 2


def test_where_filters_on_source_and_meta(tmp_path):
    p = tmp_path / "mixed.jsonl"
    rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}],
             "source": "math" if i % 2 else "code", "meta": {"level": i % 3, "tags": {"lang": "en" if i < 6 else "fr"}}}
            for i in range(12)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs, st = read_input([src(path=str(p), where={"source": "math", "meta.tags.lang": "en"})], "demonstration",
                          ident)
    assert sorted(r["id"] for r in recs) == ["r1", "r3", "r5"]
    assert st["sources"][f"input[0] {p}"]["filtered_out"] == 9
    recs, _ = read_input([src(path=str(p), where={"meta.level": [0, 2]})], "demonstration", ident)
    assert sorted(int(r["id"][1:]) for r in recs) == [i for i in range(12) if i % 3 in (0, 2)]
    with pytest.raises(RecordError, match=r"input\[0\] .*mixed.jsonl: none of 12 rows matches where"):
        read_input([src(path=str(p), where={"source": "poetry"})], "demonstration", ident)


def test_foreign_layouts_and_splits_mix(tmp_path):
    import datasets

    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": f"t{i}", "completion": "x"} for i in range(4)]),
                          "test": datasets.Dataset.from_list([{"text": f"held {i}"} for i in range(2)])}
                         ).save_to_disk(str(dd))
    demos = write_demos(tmp_path / "d.jsonl", 2, "d")
    recs, st = read_input([src(path=str(dd)), src(path=str(dd), split="test"), src(path=demos)], "demonstration",
                          ident, seed=1)
    assert len(recs) == 8 and sum("text" in r for r in recs) == 2
    assert st["sources"][f"input[1] {dd}"]["split"] == "test"


def test_single_path_keeps_order_and_limit(three):
    a, _, _ = three
    recs, st = read_input(a, "demonstration", ident, limit=5)
    assert [r["id"] for r in recs] == [f"a{i}" for i in range(5)] and st["rows"] == 5
    assert st["sources"][a]["checks"]["flagged"] == 0


def test_source_config_errors():
    with pytest.raises(ConfigError, match="either weight or rows"):
        src(path="x", weight=1, rows=2)
    with pytest.raises(ConfigError, match="weight must be > 0"):
        src(path="x", weight=0)
    with pytest.raises(ConfigError, match="filter on 'id', 'source' or 'meta.KEY'"):
        src(path="x", where={"category": "math"})
    with pytest.raises(ConfigError, match="max_flagged_share must be in"):
        build(DataSection, {"max_flagged_share": 2}, "data", "r.yaml")


def test_largest_remainder_adds_up():
    assert largest_remainder(10, [1, 1, 1]) == [4, 3, 3]
    assert largest_remainder(7, [0.5, 0.3, 0.2]) == [4, 2, 1]
    assert sum(largest_remainder(1001, [0.37, 0.41, 0.22])) == 1001


def test_unusable_rows_are_dropped_counted_and_fail_above_the_share(tmp_path):
    p = tmp_path / "prefs.jsonl"
    u = [{"role": "user", "content": "q"}]
    good = [{"id": f"g{i}", "prompt": u, "chosen": [{"role": "assistant", "content": f"y{i}"}],
             "rejected": [{"role": "assistant", "content": "n"}]} for i in range(18)]
    bad_role = {"id": "b1", "prompt": u, "chosen": [{"role": "user", "content": "y"}],
                "rejected": [{"role": "assistant", "content": "n"}]}
    conflict = dict(good[0], chosen=[{"role": "assistant", "content": "other"}])
    p.write_text("".join(json.dumps(r) + "\n" for r in good + [bad_role, conflict]))
    recs, st = read_input(str(p), "preference", ident)
    s = st["sources"][str(p)]
    assert len(recs) == 18 and s["dropped"] == 2
    assert s["checks"] == {"rows": 20, "flagged": 2, "completion_not_assistant": 1, "conflicting_id": 1}
    with pytest.raises(RecordError) as e:
        read_input(str(p), "preference", ident, data=DataSection(max_flagged_share=0.05))
    msg = str(e.value)
    assert msg.startswith(f"{p}: 2 of 20 rows are unusable (completion_not_assistant: 1, conflicting_id: 1; "
                          f"first: {p}:19: completion_not_assistant)") and "\n" not in msg
