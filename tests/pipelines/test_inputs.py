"""Reading and checking inputs: manifests, prefixes, bad rows and bad files."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gram.schema import validate_key
from pipelines.config import InputsConfig
from pipelines.inputs import ManifestError, fingerprint, read_inputs


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return str(path)


def test_jsonl_rows_resolve_relative_paths_and_keep_every_caption(tmp_path):
    uri = _jsonl(
        tmp_path / "m.jsonl",
        [
            {"id": "a", "video": "clips/a.mp4", "captions": ["one", "two"]},
            {"id": "b", "video": "/abs/b.mp4", "captions": "single", "audio": "b.wav"},
            {"video": "s3://bucket/c.mp4", "caption": "from caption column"},
        ],
    )
    items = read_inputs(uri, InputsConfig())
    assert [i.video for i in items] == [
        str(tmp_path / "clips/a.mp4"),
        "/abs/b.mp4",
        "s3://bucket/c.mp4",
    ]
    assert items[0].captions == ("one", "two")
    assert items[1].captions == ("single",)
    assert items[1].audio == str(tmp_path / "b.wav")
    assert items[2].id == "c"
    assert [i.line for i in items] == [1, 2, 3]
    assert all(i.reason is None for i in items)


def test_extra_row_fields_are_kept_as_metadata_and_odd_ones_refused(tmp_path):
    uri = _jsonl(
        tmp_path / "m.jsonl",
        [
            {"id": "a", "video": "a.mp4", "captions": ["x"], "label": "red", "tags": ["p", 2]},
            {"id": "b", "video": "b.mp4", "captions": ["y"], "score": 0.5, "ok": True},
        ],
    )
    items = read_inputs(uri, InputsConfig())
    assert items[0].extra == {"label": "red", "tags": ["p", 2]}
    assert items[1].extra == {"score": 0.5, "ok": True}
    assert fingerprint(items) != fingerprint(
        [*items[:1], items[1].__class__(**{**items[1].to_json(), "captions": ("y",), "extra": {}})]
    )
    bad = _jsonl(tmp_path / "bad.jsonl", [{"video": "a.mp4", "captions": ["x"], "meta": {"k": 1}}])
    with pytest.raises(ManifestError, match=r"bad\.jsonl:1: field 'meta' must be a short string"):
        read_inputs(bad, InputsConfig())


def test_csv_and_parquet_manifests(tmp_path):
    (tmp_path / "m.csv").write_text(
        'id,video,captions\nx,x.mp4,"[""first"", ""second""]"\ny,y.mp4,plain caption\n', "utf-8"
    )
    items = read_inputs(str(tmp_path / "m.csv"), InputsConfig())
    assert [i.captions for i in items] == [("first", "second"), ("plain caption",)]
    assert [i.line for i in items] == [2, 3]
    table = pa.table(
        {"id": ["p", "q"], "video": ["p.mp4", "q.mp4"], "captions": [["c1", "c2"], ["c3"]]}
    )
    pq.write_table(table, tmp_path / "m.parquet")
    items = read_inputs(str(tmp_path / "m.parquet"), InputsConfig())
    assert [i.captions for i in items] == [("c1", "c2"), ("c3",)]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            '{"id": "a", "video": "a.mp4", "captions": ["x"]}\n{"id": "b", "video": \n',
            r"m\.jsonl:2: invalid JSON",
        ),
        ('{"id": "a", "captions": ["x"]}\n', r"m\.jsonl:1: no video path"),
        ('{"id": "a", "video": "a.mp4", "captions": [1, 2]}\n', r"m\.jsonl:1: captions must be"),
        ('["not", "an", "object"]\n', r"m\.jsonl:1: expected a JSON object"),
        ("\n\n", r"no inputs found"),
    ],
)
def test_malformed_manifest_names_the_line(tmp_path, text, match):
    (tmp_path / "m.jsonl").write_text(text, "utf-8")
    with pytest.raises(ManifestError, match=match):
        read_inputs(str(tmp_path / "m.jsonl"), InputsConfig())


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        read_inputs(str(tmp_path / "nope.jsonl"), InputsConfig())


def test_bad_rows_fail_with_a_reason_and_keep_their_line(tmp_path):
    path = tmp_path / "m.jsonl"
    lines = [
        json.dumps({"id": "ok", "video": "a.mp4", "captions": ["fine"]}),
        json.dumps({"id": "ok", "video": "b.mp4", "captions": ["duplicate id"]}),
        json.dumps({"id": "empty", "video": "c.mp4", "captions": ["", "   "]}),
        json.dumps({"id": "long", "video": "d.mp4", "captions": ["x" * 100_000]}),
        json.dumps({"id": "nocap", "video": "e.mp4"}),
    ]
    latin1 = b'{"id": "bytes", "video": "f.mp4", "captions": ["caf\xe9"]}\n'
    data = "\n".join(lines).encode() + b"\n" + latin1
    path.write_bytes(data)
    items = read_inputs(str(path), InputsConfig())
    assert [i.reason for i in items] == [
        None,
        "duplicate_id",
        "no_captions",
        "caption_too_long",
        "no_captions",
        "not_utf8",
    ]
    assert "line 1" in items[1].error
    assert "100000 characters" in items[3].error
    for item in items:  # every row is still a valid, printable item
        validate_key(item.key)
        json.dumps(item.to_json(), ensure_ascii=False).encode("utf-8")


def test_duplicate_ids_can_be_refused_up_front(tmp_path):
    uri = _jsonl(
        tmp_path / "m.jsonl",
        [
            {"id": "a", "video": "a.mp4", "captions": ["x"]},
            {"id": "a", "video": "b.mp4", "captions": ["y"]},
        ],
    )
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: id 'a' already used at line 1"):
        read_inputs(uri, InputsConfig(duplicate_ids="error"))


def test_awkward_ids_get_distinct_safe_keys(tmp_path):
    ids = ["a.b", "a_b", "a/b", "with space", "ünïcödé", "../etc/passwd", "a b"]
    uri = _jsonl(
        tmp_path / "m.jsonl",
        [{"id": i, "video": f"v{n}.mp4", "captions": ["c"]} for n, i in enumerate(ids)],
    )
    items = read_inputs(uri, InputsConfig())
    keys = [i.key for i in items]
    assert len(set(keys)) == len(ids)
    assert keys[1] == "a_b"
    for key in keys:
        validate_key(key)
    assert [i.id for i in items] == ids  # the mapping id -> key is kept on every item


def test_prefix_with_captions_keyed_by_stem(tmp_path):
    for name in ("b.mp4", "a.webm", "sub/c.mp4", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    _jsonl(
        tmp_path / "captions.jsonl",
        [
            {"id": "a", "captions": ["A"]},
            {"id": "b", "captions": ["B1", "B2"]},
            {"id": "sub/c", "captions": ["C"]},
        ],
    )
    items = read_inputs(str(tmp_path), InputsConfig())
    assert [(i.id, i.captions) for i in items] == [
        ("a", ("A",)),
        ("b", ("B1", "B2")),
        ("sub/c", ("C",)),
    ]
    (tmp_path / "caps.json").write_text(json.dumps({"a": "only a"}), "utf-8")
    items = read_inputs(str(tmp_path), InputsConfig(captions_file="caps.json"))
    assert [i.reason for i in items] == [None, "no_captions", "no_captions"]


def test_fingerprint_changes_with_content(tmp_path):
    uri = _jsonl(tmp_path / "m.jsonl", [{"id": "a", "video": "a.mp4", "captions": ["x"]}])
    first = fingerprint(read_inputs(uri, InputsConfig()))
    assert first == fingerprint(read_inputs(uri, InputsConfig()))
    _jsonl(tmp_path / "m.jsonl", [{"id": "a", "video": "a.mp4", "captions": ["y"]}])
    assert first != fingerprint(read_inputs(uri, InputsConfig()))
