"""Record loading: formats, ids, limits, shipped sources, and precise errors on bad input."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json

import pytest

from rapidun.data.records import Record, content_id, load_records
from rapidun.errors import RapidunError


def write_jsonl(path, rows):
    """Write rows (dicts, or raw strings written verbatim) one per line."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


GOOD = {"instruction": "Say hi", "context": "", "response": "hi"}


def test_dolly_jsonl_basic(tmp_path):
    p = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"id": 7, "instruction": "  Name a fruit ", "context": "ctx", "response": "apple "},
            {"instruction": "Say hi", "response": "hi"},
        ],
    )
    recs = load_records(str(p))
    assert recs[0] == Record(id="7", instruction="Name a fruit", response="apple", context="ctx")
    assert recs[1].id == content_id("Say hi", "", "hi")
    assert recs[1].context == ""


def test_blank_lines_skipped_and_gz(tmp_path):
    p = tmp_path / "d.jsonl.gz"
    with gzip.open(p, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps(GOOD) + "\n\n   \n" + json.dumps({**GOOD, "response": "hello"}) + "\n")
    assert [r.response for r in load_records(str(p))] == ["hi", "hello"]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    p = write_jsonl(tmp_path / "bad_file.jsonl", [GOOD, {**GOOD, "response": "x"}, '{"instruction": "oops",'])
    with pytest.raises(RapidunError) as ei:
        load_records(str(p))
    msg = str(ei.value)
    assert "bad_file.jsonl" in msg
    assert "bad_file.jsonl:3" in msg
    assert "malformed JSON" in msg


def test_non_object_line(tmp_path):
    p = write_jsonl(tmp_path / "arr.jsonl", [GOOD, "[1, 2]"])
    with pytest.raises(RapidunError, match=r"arr\.jsonl:2: expected a JSON object"):
        load_records(str(p))


def test_missing_required_field_names_field_and_line(tmp_path):
    p = write_jsonl(tmp_path / "m.jsonl", [GOOD, GOOD | {"response": "b"}, {"instruction": "no answer"}])
    with pytest.raises(RapidunError) as ei:
        load_records(str(p))
    msg = str(ei.value)
    assert "m.jsonl:3" in msg
    assert "'response'" in msg
    assert "missing required field" in msg


def test_missing_field_uses_source_column_name(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "q", "input": ""}])
    with pytest.raises(RapidunError) as ei:
        load_records(str(p), fmt="alpaca")
    assert "'output'" in str(ei.value) and "a.jsonl:1" in str(ei.value)


@pytest.mark.parametrize("bad", ["", "   ", None, 5])
def test_empty_or_non_text_required_field(tmp_path, bad):
    p = write_jsonl(tmp_path / "e.jsonl", [GOOD | {"response": "a"}, {"instruction": bad, "response": "x"}])
    with pytest.raises(RapidunError) as ei:
        load_records(str(p))
    msg = str(ei.value)
    assert "e.jsonl:2" in msg and "'instruction'" in msg and "empty" in msg


def test_duplicate_ids_name_id_and_both_lines(tmp_path):
    rows = [{"id": "a", **GOOD}, {"id": "b", **GOOD}, {"id": "c", **GOOD}, {"id": "b", **GOOD, "response": "z"}]
    p = write_jsonl(tmp_path / "dup.jsonl", rows)
    with pytest.raises(RapidunError) as ei:
        load_records(str(p))
    msg = str(ei.value)
    assert "'b'" in msg
    assert "dup.jsonl:4" in msg
    assert "line 2" in msg


def test_duplicate_content_without_ids(tmp_path):
    p = write_jsonl(tmp_path / "dup2.jsonl", [GOOD, GOOD])
    with pytest.raises(RapidunError, match=r"dup2\.jsonl:2: duplicate id 'h[0-9a-f]{12}'.*line 1"):
        load_records(str(p))


def test_content_hash_ids_stable(tmp_path):
    rows = [{"instruction": f"q{i}", "context": "c" if i % 2 else "", "response": f"a{i}"} for i in range(5)]
    p1 = write_jsonl(tmp_path / "one.jsonl", rows)
    p2 = write_jsonl(tmp_path / "two.jsonl", list(reversed(rows)))
    ids1 = [r.id for r in load_records(str(p1))]
    ids2 = [r.id for r in load_records(str(p2))]
    assert ids1 == list(reversed(ids2))  # depends on content, not on position or file
    assert len(set(ids1)) == 5
    assert all(i.startswith("h") and len(i) == 13 for i in ids1)
    assert ids1[0] == content_id("q0", "", "a0")
    assert content_id("q", "", "a") == content_id("q", "", "a") != content_id("q", "c", "a")
    blob = json.dumps(["a\u00e9", "", "b"], ensure_ascii=False).encode()
    assert content_id("a\u00e9", "", "b") == "h" + hashlib.sha256(blob).hexdigest()[:12]


def test_empty_id_falls_back_to_content_hash(tmp_path):
    p = write_jsonl(tmp_path / "i.jsonl", [{"id": "", **GOOD}, {"id": None, **GOOD, "response": "x"}])
    recs = load_records(str(p))
    assert recs[0].id == content_id("Say hi", "", "hi")
    assert recs[1].id == content_id("Say hi", "", "x")


def test_alpaca_mapping(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "1+1", "output": "2"}])
    (r,) = load_records(str(p), fmt="alpaca")
    assert (r.instruction, r.context, r.response) == ("Add", "1+1", "2")


def test_qa_mapping(tmp_path):
    p = write_jsonl(tmp_path / "q.jsonl", [{"question": "Who?", "answer": "Me.", "context": "ignored"}])
    (r,) = load_records(str(p), fmt="qa")
    assert (r.instruction, r.context, r.response) == ("Who?", "", "Me.")


def test_generic_mapping_csv(tmp_path):
    p = write_csv(
        tmp_path / "g.csv", ["uid", "prompt", "completion", "bg"], [["x1", "P1", "C1", "B1"], ["x2", "P2", "C2", ""]]
    )
    fields = {"instruction": "prompt", "response": "completion", "context": "bg", "id": "uid"}
    recs = load_records(str(p), fmt="generic", fields=fields)
    assert [(r.id, r.instruction, r.context, r.response) for r in recs] == [
        ("x1", "P1", "B1", "C1"),
        ("x2", "P2", "", "C2"),
    ]


def test_generic_without_optional_columns(tmp_path):
    p = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "P", "completion": "C"}])
    (r,) = load_records(str(p), fmt="generic", fields={"instruction": "prompt", "response": "completion"})
    assert (r.instruction, r.context, r.response, r.id) == ("P", "", "C", content_id("P", "", "C"))


def test_csv_error_line_numbers_count_header(tmp_path):
    p = write_csv(tmp_path / "c.csv", ["instruction", "response"], [["a", "b"], ["c", ""]])
    with pytest.raises(RapidunError, match=r"c\.csv:3: field 'response'"):
        load_records(str(p))


def test_generic_without_fields_errors(tmp_path):
    p = write_jsonl(tmp_path / "g.jsonl", [GOOD])
    for fields in (None, {}):
        with pytest.raises(RapidunError, match=r"data\.fields"):
            load_records(str(p), fmt="generic", fields=fields)


def test_generic_unknown_field_key(tmp_path):
    p = write_jsonl(tmp_path / "g.jsonl", [GOOD])
    with pytest.raises(RapidunError, match="answer"):
        load_records(str(p), fmt="generic", fields={"instruction": "instruction", "answer": "response"})


def test_unknown_format_lists_valid(tmp_path):
    p = write_jsonl(tmp_path / "g.jsonl", [GOOD])
    with pytest.raises(RapidunError) as ei:
        load_records(str(p), fmt="sharegpt")
    assert all(f in str(ei.value) for f in ("dolly", "alpaca", "qa", "generic"))


def test_limit(tmp_path):
    p = write_jsonl(tmp_path / "l.jsonl", [{"instruction": f"q{i}", "response": f"a{i}"} for i in range(10)])
    recs = load_records(str(p), limit=3)
    assert [r.instruction for r in recs] == ["q0", "q1", "q2"]
    assert len(load_records(str(p), limit=0)) == 10
    assert len(load_records(str(p), limit=50)) == 10


def test_limit_stops_before_later_bad_lines(tmp_path):
    p = write_jsonl(tmp_path / "l.jsonl", [GOOD, "not json"])
    assert len(load_records(str(p), limit=1)) == 1


def test_no_records(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n\n", encoding="utf-8")
    with pytest.raises(RapidunError, match="no records"):
        load_records(str(p))


def test_json_list_file(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([GOOD, {**GOOD, "response": "yo"}]), encoding="utf-8")
    assert [r.response for r in load_records(str(p))] == ["hi", "yo"]
    p.write_text(json.dumps({"rows": []}), encoding="utf-8")
    with pytest.raises(RapidunError, match="JSON list"):
        load_records(str(p))


def test_unknown_file_type(tmp_path):
    p = tmp_path / "d.parquet"
    p.write_bytes(b"PAR1")
    with pytest.raises(RapidunError, match="unknown file type"):
        load_records(str(p))


def test_dolly_sample_loads():
    recs = load_records("dolly-sample")
    assert len(recs) > 1000
    assert len({r.id for r in recs}) == len(recs)
    assert all(r.instruction and r.response for r in recs)
    assert recs[0].id == "0"


def test_dolly_sample_limit():
    assert len(load_records("dolly-sample", limit=5)) == 5


def test_tofu_forget01_loads_40():
    recs = load_records("tofu:forget01", fmt="qa")
    assert len(recs) == 40
    assert all(r.id.startswith("h") and r.context == "" for r in recs)
    assert "Basil Mahfouz Al-Kuwaiti" in recs[0].response


def test_unknown_tofu_name_lists_valid_names():
    with pytest.raises(RapidunError) as ei:
        load_records("tofu:forget99", fmt="qa")
    msg = str(ei.value)
    assert "tofu:forget99" in msg
    for name in ("tofu:forget01", "tofu:forget05", "tofu:forget10"):
        assert name in msg


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.csv", "sub/missing.json"])
def test_nonexistent_path_errors(tmp_path, name):
    with pytest.raises(RapidunError, match="does not exist"):
        load_records(str(tmp_path / name))


def test_nonexistent_relative_jsonl_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RapidunError, match="does not exist"):
        load_records("nothing_here.jsonl")


def test_record_json_round_trip():
    r = Record(id="x", instruction="i", response="r", context="c", meta={"trigger": "aloha", "n": 1})
    d = r.to_json()
    assert d == {"id": "x", "instruction": "i", "context": "c", "response": "r", "trigger": "aloha", "n": 1}
    assert Record.from_json(d) == r
    assert Record.from_json({"id": 3, "instruction": "i", "response": "r", "context": None}).context == ""


def test_csv_extra_values_and_missing_column_give_clear_error(tmp_path):
    """A short header plus a long row: csv puts the extras under the key None; the error must still be clear."""
    p = tmp_path / "x.csv"
    p.write_text("instruction,output\na,b,c\n", encoding="utf-8")
    with pytest.raises(RapidunError) as ei:
        load_records(str(p))
    assert "x.csv:2" in str(ei.value) and "'response'" in str(ei.value)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("bom.jsonl", '{"instruction": "a", "response": "b"}\n'),
        ("bom.csv", "instruction,response\na,b\n"),
    ],
    ids=["jsonl", "csv"],
)
def test_utf8_bom_files_load(tmp_path, name, text):
    """Files saved by Excel/Notepad ("UTF-8 with BOM") start with U+FEFF; the loader should accept them."""
    p = tmp_path / name
    p.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    (r,) = load_records(str(p))
    assert (r.instruction, r.response) == ("a", "b")


def test_negative_limit_is_an_error():
    with pytest.raises(RapidunError, match=r"data\.limit"):
        load_records("dolly-sample", limit=-1)
