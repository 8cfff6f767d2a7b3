"""Per-rank shard streaming: exactly-once epochs, determinism, resume, safe reading."""

from __future__ import annotations

import io
import tarfile
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gram.shards import ShardInfo, ShardLoader, iter_raw_samples, plan_epoch, steps_per_epoch


def _tar(path: Path, keys: list[str], extra: dict[str, bytes] | None = None) -> Path:
    with tarfile.open(path, "w") as tar:
        for key in keys:
            for suffix, data in {"txt": key.encode(), "json": b"{}", **(extra or {})}.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _dataset(tmp_path: Path, counts: list[int]) -> list[ShardInfo]:
    shards = []
    for i, n in enumerate(counts):
        keys = [f"s{i}-k{j:03d}" for j in range(n)]
        shards.append(ShardInfo(str(_tar(tmp_path / f"part-{i:06d}.tar", keys)), n))
    return shards


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(0, 30), min_size=1, max_size=12),
    world=st.integers(1, 5),
    epoch=st.integers(0, 3),
)
def test_plan_covers_every_sample_once_except_the_remainder(counts, world, epoch):
    shards = [ShardInfo(f"s{i}", n) for i, n in enumerate(counts)]
    total = sum(counts)
    seen: list[tuple[int, int]] = []
    for rank in range(world):
        plan = plan_epoch(shards, epoch=epoch, seed=7, rank=rank, world_size=world)
        assert plan.samples == total // world
        assert plan.dropped == total % world
        covered = [(idx, j) for idx, lo, hi in plan.spans for j in range(lo, hi)]
        assert len(covered) == plan.samples
        seen += covered
    assert len(seen) == len(set(seen)) == total - total % world
    again = plan_epoch(shards, epoch=epoch, seed=7, rank=0, world_size=world)
    assert again == plan_epoch(shards, epoch=epoch, seed=7, rank=0, world_size=world)


def test_epochs_reorder_shards():
    shards = [ShardInfo(f"s{i}", 5) for i in range(20)]
    orders = {plan_epoch(shards, epoch=e, seed=1, rank=0, world_size=1).spans for e in range(4)}
    assert len(orders) == 4
    assert steps_per_epoch(101, 2, 8) == 7  # 50 per rank -> 6 full batches + 1 of 2


def test_raw_samples_group_members_and_slice(tmp_path):
    path = _tar(tmp_path / "a.tar", [f"k{i}" for i in range(6)], {"f000.jpg": b"\xff"})
    with open(path, "rb") as fh:
        got = list(iter_raw_samples(fh, str(path), first=2, end=5))
    assert [s["__key__"] for s in got] == ["k2", "k3", "k4"]
    assert got[0]["txt"] == b"k2"
    assert got[0]["f000.jpg"] == b"\xff"
    assert set(got[0]) == {"__key__", "__url__", "txt", "json", "f000.jpg"}


@pytest.mark.parametrize(
    "name", ["../evil.txt", "/abs/x.txt", "a/../../b.txt", "k\x01.txt", "a.b.c/x"]
)
def test_unsafe_member_names_are_refused_and_nothing_is_written(tmp_path, name, monkeypatch):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    buf.seek(0)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"unsafe|invalid sample key|no suffix"):
        list(iter_raw_samples(buf, "mem"))
    assert list(tmp_path.iterdir()) == []


def test_duplicate_key_runs_are_refused(tmp_path):
    path = _tar(tmp_path / "d.tar", ["a", "b", "a"])
    with open(path, "rb") as fh, pytest.raises(ValueError, match="appears in two"):
        list(iter_raw_samples(fh, str(path)))


def _loader(shards, rank, world, **kw):
    return ShardLoader(
        shards,
        batch_size=4,
        rank=rank,
        world_size=world,
        seed=3,
        open_shard=lambda url: open(url, "rb"),
        decode=kw.pop("decode", lambda raw, rng: (raw["__key__"], rng.random())),
        collate=list,
        shuffle_buffer=kw.pop("shuffle_buffer", 7),
        decode_threads=3,
        **kw,
    )


def test_two_ranks_see_every_sample_once_per_epoch(tmp_path):
    shards = _dataset(tmp_path, [9, 0, 13, 4, 11])  # 37 samples
    for epoch in range(2):
        keys = []
        for rank in range(2):
            loader = _loader(shards, rank, 2)
            batches = list(loader.epoch(epoch))
            assert len(batches) == loader.steps_per_epoch() == 5  # 18 per rank: 4+4+4+4+2
            keys += [k for b in batches for k, _ in b]
        assert len(keys) == len(set(keys)) == 36  # only 37 mod 2 = 1 left out


def test_resume_mid_epoch_continues_exactly_where_it_stopped(tmp_path):
    shards = _dataset(tmp_path, [10, 10, 10])
    full = list(_loader(shards, 0, 1).epoch(1))
    resumed = list(_loader(shards, 0, 1).epoch(1, skip=12))
    assert resumed == full[3:]  # same samples, order and augmentation randomness
    other_epoch = [k for b in _loader(shards, 0, 1).epoch(2) for k, _ in b]
    assert other_epoch != [k for b in full for k, _ in b]


def test_decode_errors_and_index_mismatch_reach_the_consumer(tmp_path):
    shards = _dataset(tmp_path, [5])

    def bad_decode(raw, rng):
        raise RuntimeError(f"cannot decode {raw['__key__']}")

    loader = _loader(shards, 0, 1)
    loader.decode = bad_decode
    with pytest.raises(RuntimeError, match="cannot decode"):
        list(loader.epoch(0))
    lying = [ShardInfo(shards[0].url, 8)]
    with pytest.raises(ValueError, match="shard and index disagree"):
        list(_loader(lying, 0, 1, shuffle_buffer=1).epoch(0))


def test_consumer_waits_are_measured_and_early_exit_stops_the_producer(tmp_path):
    shards = _dataset(tmp_path, [40])
    with _loader(shards, 0, 1) as loader:
        it = loader.epoch(0)
        next(it)
        it.close()  # the producer stops and frees the reader: the next epoch runs in full
        assert loader.wait_seconds > 0.0
        assert sum(len(b) for b in loader.epoch(1)) == 40


def test_a_second_epoch_while_one_is_open_is_refused_not_left_waiting(tmp_path):
    shards = _dataset(tmp_path, [40])
    with _loader(shards, 0, 1) as loader:
        first = loader.epoch(0)
        next(first)
        with pytest.raises(RuntimeError, match="still open"):
            next(loader.epoch(1))
        first.close()
        assert sum(len(b) for b in loader.epoch(1)) == 40


def _loader_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith(("shards", "decode"))}


def test_reading_and_decoding_threads_are_kept_across_epochs_and_closed(tmp_path):
    """New threads every epoch make a long run's memory grow (glibc malloc arenas)."""
    shards = _dataset(tmp_path, [9, 13])
    before = _loader_threads()
    loader = _loader(shards, 0, 1)
    list(loader.epoch(0))
    ours = _loader_threads() - before
    assert len(ours) == 1 + 3  # one reader, decode_threads=3
    for epoch in range(1, 6):
        assert sum(len(b) for b in loader.epoch(epoch)) == 22
    assert _loader_threads() - before == ours
    loader.close()
    for thread in ours:
        thread.join(timeout=5)
    assert not [t for t in ours if t.is_alive()]


def _counting_open(opened: list[str]):
    def open_shard(url):
        opened.append(url)
        return open(url, "rb")

    return open_shard


def _prepare(raw):
    """A stand-in for decoding once: the text member as str, marked as prepared."""
    return {**raw, "txt": raw["txt"].decode(), "prepared": True}


def _decode(raw, rng):
    text = raw["txt"] if raw.get("prepared") else raw["txt"].decode()
    return (text, rng.random())


@pytest.mark.parametrize("world", [1, 2])
def test_decoded_cache_serves_later_epochs_from_memory_with_the_same_batches(tmp_path, world):
    from gram.shards import DecodedCache

    shards = _dataset(tmp_path, [9, 0, 13, 4, 11])
    for rank in range(world):
        plain = _loader(shards, rank, world, decode=_decode)
        opened: list[str] = []
        cached = _loader(shards, rank, world, decode=_decode)
        cached.open_shard = _counting_open(opened)
        cached.cache = DecodedCache(1.0, _prepare)
        for epoch in range(3):
            opened.clear()
            # Same samples, order and per-sample randomness, whether from disk or memory.
            assert list(cached.epoch(epoch)) == list(plain.epoch(epoch))
            if epoch == 0:
                assert opened, "the first epoch reads the shards"
            elif world == 1:  # (with 2 ranks a rank's spans move with the shard order)
                assert not opened, "later epochs come from memory"
        assert cached.cache.hits > 0
        assert cached.cache.nbytes <= cached.cache.max_bytes
        plain.close()
        cached.close()


def test_a_full_decoded_cache_keeps_what_it_holds_and_reads_the_rest(tmp_path):
    from gram.shards import DecodedCache

    shards = _dataset(tmp_path, [10, 10, 10])
    cache = DecodedCache(4e-3, _prepare)  # ~4 KiB: room for some samples, not all
    with _loader(shards, 0, 1, decode=_decode, cache=cache) as loader:
        first = list(loader.epoch(0))
        held = len(cache)
        assert 0 < held < 30
        assert list(loader.epoch(0)) == first
        assert len(cache) == held  # nothing evicted, nothing added past the bound
        assert cache.nbytes <= cache.max_bytes
    with pytest.raises(ValueError, match="max_mib > 0"):
        DecodedCache(0, _prepare)
