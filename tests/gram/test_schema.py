"""The shard contract: keys, member names and clip metadata."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gram.schema import (
    ClipMeta,
    frame_suffix,
    is_frame_suffix,
    safe_key,
    validate_key,
    validate_member_name,
)


@given(st.text(min_size=1, max_size=300))
def test_safe_key_always_gives_a_valid_key(raw):
    key = safe_key(raw)
    validate_key(key)
    assert safe_key(raw) == key  # stable


def test_safe_key_keeps_valid_ids_and_separates_lookalikes():
    assert safe_key("clip_001-a") == "clip_001-a"
    assert safe_key("a.b") != safe_key("a_b")
    assert safe_key("a.b") != safe_key("a/b")
    assert safe_key("vidéo 1").startswith("vid_o_1_")


@pytest.mark.parametrize("bad", ["a.b", "a/b", "", "x" * 129, "a b", "ä"])
def test_invalid_keys_are_refused_with_the_fix(bad):
    with pytest.raises(ValueError, match="safe_key"):
        validate_key(bad)


@pytest.mark.parametrize(
    "bad", ["../x.jpg", "/etc/passwd", "a/../../b", "a\x00b", "a\nb", "\\abs", ""]
)
def test_unsafe_member_names_are_refused(bad):
    with pytest.raises(ValueError, match="unsafe"):
        validate_member_name(bad)


def test_frame_suffixes_round_trip():
    assert frame_suffix(7) == "f007.jpg"
    assert is_frame_suffix("f007.jpg") == 7
    assert is_frame_suffix("flac") is None
    with pytest.raises(ValueError, match="frame index"):
        frame_suffix(1000)


def test_clip_meta_round_trip_and_forward_compatibility():
    meta = ClipMeta(
        id="a",
        source="s3://b/a.mp4",
        duration=2.0,
        fps=25.0,
        has_audio=True,
        frame_times=[0.5, 1.5],
        num_segments=2,
    )
    data = meta.to_json()
    assert ClipMeta.from_json(data) == meta
    newer = {**data, "future_field": 1}
    assert ClipMeta.from_json(newer).extra == {"future_field": 1}
    with pytest.raises(ValueError, match="frame_times"):
        ClipMeta(
            id="a",
            source="x",
            duration=1,
            fps=1,
            has_audio=False,
            frame_times=[0.1],
            num_segments=2,
        )
