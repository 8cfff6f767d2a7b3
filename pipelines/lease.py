"""A lease: mutual exclusion with an expiry, over any store that can create a record atomically.

    with Lease(StorageLeaseStore("s3://bucket/out/_state/lease.json"), LeaseTimes(wait_seconds=0),
               what="the output s3://bucket/out", purpose="preprocess") as lease:
        lease.keep_alive()      # renews in the background while the work runs
        ...
        lease.check()           # the fence: before each decisive write

The logic is shared; where the record lives is a `LeaseStore`:
`StorageLeaseStore` keeps it as a JSON object in local or S3 storage (the
preprocessing job's hold on its output), and the promotion lock keeps it in
the MLflow Model Registry (`jobs/common/lock.py`).

- A contender *creates* the record; the store guarantees that one creator
  wins (S3 If-None-Match, a registered model's unique name, a file under
  `flock`). The record says who holds it (`owner`, a random token; `holder`,
  host and pid) and until when (`expires`, Unix seconds).
- A holder that crashed leaves its record behind. Once the lease has expired
  (plus a grace period), or at once when the holder was a process on this
  same machine that no longer runs (`break_dead_holders`), a contender
  *breaks* it through the store, which guarantees that a fresh record is
  never broken by someone who saw a stale one.
- `check()` is the fence: it fails unless the record is still ours with at
  least `margin_seconds` of lease left. `keep_alive()` renews the lease every
  third of `lease_seconds` on a background thread.
- Release deletes the record, after checking that it is still ours.

Lease times are compared on the contenders' clocks: keep `lease_seconds` well
above any clock skew between the machines involved.
"""

from __future__ import annotations

import json
import logging
import os
import random
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Protocol

from gram.config import ConfigError
from pipelines import storage
from pipelines.storage import S3Config

__all__ = [
    "Lease",
    "LeaseError",
    "LeaseHeldError",
    "LeaseLostError",
    "LeaseRecord",
    "LeaseStore",
    "LeaseTimes",
    "StorageLeaseStore",
]

log = logging.getLogger(__name__)


class LeaseError(RuntimeError):
    """The lease could not be taken or is no longer held."""


class LeaseHeldError(LeaseError):
    """Someone else held the lease for longer than we were willing to wait."""


class LeaseLostError(LeaseError):
    """Our lease ran out (or was broken) before the work was done."""


@dataclass
class LeaseTimes:
    """The lease's timing.

    lease_seconds: how long a holder may keep it without renewing before others may break it, s.
    grace_seconds: extra time after expiry before breaking, s (clock skew, slow holders).
    wait_seconds: how long to wait for a lease held by someone else, s (0 = refuse at once).
    margin_seconds: a holder stops writing when less than this is left of its lease, s.
    """

    lease_seconds: float = 120.0
    grace_seconds: float = 30.0
    wait_seconds: float = 300.0
    margin_seconds: float = 15.0

    def __post_init__(self) -> None:
        if self.lease_seconds <= 0 or self.wait_seconds < 0 or self.grace_seconds < 0:
            raise ConfigError("lock.lease_seconds must be > 0, wait/grace_seconds >= 0")
        if not 0 <= self.margin_seconds < self.lease_seconds:
            raise ConfigError("lock.margin_seconds must be in [0, lease_seconds)")


@dataclass(frozen=True)
class LeaseRecord:
    """Who holds a lease, until when (Unix seconds), and why."""

    owner: str
    """A random token of the holder: the only proof of ownership."""
    holder: str
    """`host:pid`, for people reading errors."""
    expires: float
    purpose: str = ""
    process: str = ""
    """Identity of the holder's process on its machine (boot id, pid namespace, pid, start
    time) so a contender on the same machine can tell that it has died; empty if unknown."""
    version: str = ""
    """The store's version of the stored record (not stored itself)."""


class LeaseStore(Protocol):
    """Where a lease record lives; each method is atomic in the store."""

    def create(self, record: LeaseRecord) -> LeaseRecord | None:
        """Store `record` if none exists; the stored record, or None if one existed."""

    def read(self) -> LeaseRecord | None:
        """The current record (with its version), or None."""

    def break_stale(self, stale: LeaseRecord, breaker: str) -> bool:
        """Remove `stale` if it is still the stored record; False if it changed meanwhile."""

    def renew(self, record: LeaseRecord, expires: float) -> LeaseRecord | None:
        """Move our record's expiry; the new record, or None if it is no longer ours."""

    def delete(self, record: LeaseRecord) -> None:
        """Remove our record (the caller checked that it is ours)."""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _process_identity(pid: int) -> str:
    """`boot:pidns:pid:start` on Linux (start = the process's start time in clock ticks)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        namespace = os.readlink(f"/proc/{pid}/ns/pid").strip("pid:[]")  # "pid:[4026531836]"
    except OSError:
        return ""
    start = stat.rsplit(")", 1)[1].split()[19]  # field 22 of proc(5), after "pid (comm)"
    boot = _boot_id()
    return f"{boot}:{namespace}:{pid}:{start}" if boot else ""


def _holder_is_dead(process: str) -> bool:
    """True only when `process` names a process of this machine (same boot, same pid
    namespace) that no longer runs; False when unsure."""
    mine = _process_identity(os.getpid())
    parts, own = process.split(":"), mine.split(":")
    if not mine or len(parts) != 4 or parts[:2] != own[:2] or not parts[2].isdigit():
        return False
    return _process_identity(int(parts[2])) != process


class Lease:
    """`with Lease(store, times, what=..., purpose=...): ...` (see the module docstring).

    Args:
        store: where the record lives.
        times: lease, grace, wait and margin times.
        what: what the lease guards, for messages ("the promotion lock 'gram.promotion-lock'").
        purpose: a short note stored on the record (what the holder is doing).
        how_to_clear: the last words of the error when the wait runs out (how to clear a
            lease whose holder is certainly gone).
        break_dead_holders: break at once a record whose holder process is known dead.
    """

    def __init__(
        self,
        store: LeaseStore,
        times: LeaseTimes | None = None,
        *,
        what: str,
        purpose: str = "",
        how_to_clear: str = "",
        break_dead_holders: bool = False,
    ) -> None:
        self.store = store
        self.times = times or LeaseTimes()
        self.what = what
        self.purpose = purpose[:200]
        self.how_to_clear = how_to_clear
        self.break_dead_holders = break_dead_holders
        self.token = secrets.token_hex(8)
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        self.record: LeaseRecord | None = None
        self.waited = 0.0
        self._lost: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def expires(self) -> float:
        """Unix time our lease ends (0 when not held)."""
        return self.record.expires if self.record is not None else 0.0

    def _new_record(self) -> LeaseRecord:
        return LeaseRecord(
            owner=self.token,
            holder=self.holder,
            expires=time.time() + self.times.lease_seconds,
            purpose=self.purpose,
            process=_process_identity(os.getpid()),
        )

    def _stale(self, record: LeaseRecord) -> bool:
        if time.time() > record.expires + self.times.grace_seconds:
            return True
        return self.break_dead_holders and bool(record.process) and _holder_is_dead(record.process)

    def _take(self) -> bool:
        stored = self.store.create(self._new_record())
        if stored is None:
            # A retried create of our own can find our record: check the owner.
            current = self.store.read()
            if current is None or current.owner != self.token:
                return False
            stored = current
        self.record = stored
        return True

    def acquire(self) -> Lease:
        """Take the lease, waiting up to `wait_seconds`; raises LeaseHeldError."""
        start = time.monotonic()
        deadline = start + self.times.wait_seconds
        delay = 0.1
        announced = False
        while True:
            if self._take():
                self.waited = time.monotonic() - start
                log.info("%s taken by %s", self.what, self.holder)
                return self
            current = self.store.read()
            if current is not None and self._stale(current):
                if self.store.break_stale(current, self.holder):
                    log.warning(
                        "broke the stale lease on %s (held by %s, lease until %.0f)",
                        self.what,
                        current.holder,
                        current.expires,
                    )
                continue
            if current is not None and not announced and self.times.wait_seconds > 0:
                announced = True
                log.info(
                    "waiting for %s, held by %s (lease until %.0f)",
                    self.what,
                    current.holder,
                    current.expires,
                )
            if time.monotonic() >= deadline:
                raise LeaseHeldError(self._held_message(current))
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 1.5, 1.0)

    def _held_message(self, current: LeaseRecord | None) -> str:
        holder = current.holder if current is not None else "?"
        purpose = f" for {current.purpose!r}" if current is not None and current.purpose else ""
        until = f"{current.expires:.0f}" if current is not None else "?"
        waited = f"; waited {self.times.wait_seconds:.0f} s" if self.times.wait_seconds else ""
        fix = f", or {self.how_to_clear}" if self.how_to_clear else ""
        return (
            f"{self.what} is held by {holder}{purpose} (lease until {until}, Unix time){waited}. "
            f"Retry later{fix}"
        )

    def renew(self) -> None:
        """Extend our lease to `lease_seconds` from now; raises LeaseLostError."""
        with self._lock:
            if self.record is None:
                raise LeaseLostError(f"{self.what}: the lease is not held")
            renewed = self.store.renew(self.record, time.time() + self.times.lease_seconds)
            if renewed is None:
                self._lost = f"{self.what} is no longer ours: it was broken"
                raise LeaseLostError(self._lost)
            self.record = renewed

    def keep_alive(self) -> None:
        """Renew every third of `lease_seconds` on a daemon thread until release."""
        if self._renewer is not None:
            return

        def loop() -> None:
            while not self._stop.wait(self.times.lease_seconds / 3):
                try:
                    self.renew()
                except LeaseLostError:
                    return
                except Exception as exc:  # an outage: the fence decides when it matters
                    log.warning("could not renew the lease on %s: %s", self.what, exc)

        self._renewer = threading.Thread(target=loop, name="gram-lease", daemon=True)
        self._renewer.start()

    def ensure(self) -> None:
        """The cheap fence (no store request): raise LeaseLostError if renewal found the
        lease broken, or if less than `margin_seconds` is left of it."""
        if self._lost is not None:
            raise LeaseLostError(self._lost)
        left = self.expires - time.time()
        if left < self.times.margin_seconds:
            raise LeaseLostError(
                f"only {left:.1f} s left of the lease on {self.what}: stopping before any "
                "write (is the store reachable? raise the lease time if it is slow)"
            )

    def check(self) -> None:
        """The fence: raise LeaseLostError unless the stored record is still ours with
        `margin_seconds` to spare."""
        self.ensure()
        current = self.store.read()
        if current is None or current.owner != self.token:
            raise LeaseLostError(f"{self.what} is no longer ours: it was broken")

    def release(self) -> None:
        """Delete the record if it is still ours; an expired lease is left for others to break."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
        if self.record is None:
            return
        if self.expires - time.time() < self.times.margin_seconds:
            log.warning("lease on %s ran out before release; leaving it to expire", self.what)
        else:
            current = self.store.read()
            if current is not None and current.owner == self.token:
                self.store.delete(current)
        self.record = None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class StorageLeaseStore:
    """A lease record as a JSON object at `uri` (local path or s3://), written with
    compare-and-swap (`storage.put_bytes_if`)."""

    def __init__(self, uri: str, *, s3: S3Config | None = None) -> None:
        self.uri = uri
        self.s3 = s3

    @staticmethod
    def _encode(record: LeaseRecord) -> bytes:
        fields = asdict(record)
        del fields["version"]
        return json.dumps(fields, sort_keys=True).encode()

    def create(self, record: LeaseRecord) -> LeaseRecord | None:
        """See `LeaseStore.create`; a broken record (no owner) counts as none."""
        data = self._encode(record)
        version = storage.put_bytes_if(self.uri, data, version=None, s3=self.s3)
        if version is None:
            current = self.read()
            if current is None or current.owner:
                return None
            version = storage.put_bytes_if(self.uri, data, version=current.version, s3=self.s3)
        return None if version is None else replace(record, version=version)

    def read(self) -> LeaseRecord | None:
        """See `LeaseStore.read`."""
        try:
            data, version = storage.read_versioned(self.uri, s3=self.s3)
        except storage.StorageNotFoundError:
            return None
        try:
            fields = json.loads(data)
            return LeaseRecord(**fields, version=version)
        except (ValueError, TypeError):  # not ours to judge: an unreadable record is stale
            return LeaseRecord(owner="", holder="?", expires=0.0, version=version)

    def break_stale(self, stale: LeaseRecord, breaker: str) -> bool:
        """Replace `stale` by a broken record (no owner, expired), which the next create
        replaces in turn."""
        tomb = LeaseRecord(owner="", holder=f"broken by {breaker}", expires=0.0)
        return (
            storage.put_bytes_if(self.uri, self._encode(tomb), version=stale.version, s3=self.s3)
            is not None
        )

    def renew(self, record: LeaseRecord, expires: float) -> LeaseRecord | None:
        """See `LeaseStore.renew`."""
        fresh = replace(record, expires=expires, version="")
        version = storage.put_bytes_if(
            self.uri, self._encode(fresh), version=record.version, s3=self.s3
        )
        return None if version is None else replace(fresh, version=version)

    def delete(self, record: LeaseRecord) -> None:
        """See `LeaseStore.delete`."""
        storage.delete(self.uri, s3=self.s3)
