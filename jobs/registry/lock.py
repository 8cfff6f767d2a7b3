"""A mutual-exclusion lock kept in the MLflow Model Registry itself, with a lease.

MLflow aliases have no compare-and-swap, so two promotions that read the
champion, decide, and move the alias at the same time would both "win" and
leave a muddled audit trail. They serialise on this lock instead:

- The lock is a registered model named `<model>.promotion-lock`. Creating a
  registered model is atomic in every MLflow store (the name is the table's
  unique key: the second creator gets RESOURCE_ALREADY_EXISTS, or
  RESOURCE_DOES_NOT_EXIST when the holder deleted it while the server looked it up),
  so exactly one contender creates it; the others wait and try again. Its
  tags say who holds it (`gram.lock.owner`, a random token; `gram.lock.holder`,
  host and pid) and until when (`gram.lock.expires`, Unix seconds).
- Release deletes it, after checking that the owner tag is still ours.
- A holder that crashed leaves the lock behind; once its lease has expired
  (plus a grace period) a contender breaks it by *renaming* it to
  `<model>.promotion-lock.broken-<owner token>`. Renames are atomic too, and
  the new name is unique per broken holder: if two contenders try to break the
  same stale lock, one rename succeeds and the other fails (source gone, or
  target taken even when a fresh lock already sits under the old name), so a
  fresh lock is never broken by someone who saw a stale one. Broken locks stay
  in the registry as an audit record (tagged with who broke them and when).
- `check()` is the fence: the holder calls it right before each write; it fails
  unless the lock is still ours with at least `margin_seconds` of lease left.
  The holder's critical section (a few registry calls) is far shorter than the
  lease; expensive work (evaluations) happens outside the lock.

Lease times are compared on the contenders' clocks: keep lease_seconds well
above any clock skew between machines that promote (defaults: 120 s lease,
30 s grace).
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import socket
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from gram.config import ConfigError

__all__ = ["LockConfig", "LockError", "LockLostError", "LockTimeoutError", "RegistryLock"]

log = logging.getLogger(__name__)

OWNER_TAG = "gram.lock.owner"
HOLDER_TAG = "gram.lock.holder"
EXPIRES_TAG = "gram.lock.expires"
PURPOSE_TAG = "gram.lock.purpose"
LOCK_SUFFIX = ".promotion-lock"


class LockError(RuntimeError):
    """The registry lock could not be taken or is no longer held."""


class LockTimeoutError(LockError):
    """Another holder kept the lock for longer than we were willing to wait."""


class LockLostError(LockError):
    """Our lease ran out (or the lock was broken) before the work was done."""


@dataclass
class LockConfig:
    """The promotion lock.

    lease_seconds: how long a holder may keep it before others may break it, s.
    grace_seconds: extra time after expiry before breaking, s (clock skew, slow holders).
    wait_seconds: how long to wait for a lock held by someone else, s.
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


def _code(exc: BaseException) -> str:
    return str(getattr(exc, "error_code", ""))


class RegistryLock:
    """`with RegistryLock(client, "gram", purpose="promote 7"): ...` (see the module docstring).

    Args:
        client: an `mlflow.MlflowClient` on the tracking/registry server.
        model_name: the registered model the lock protects.
        config: lease, grace, wait and margin times.
        purpose: a short note stored on the lock (what the holder is doing).
    """

    def __init__(
        self, client: Any, model_name: str, config: LockConfig | None = None, *, purpose: str = ""
    ) -> None:
        self.client = client
        self.name = f"{model_name}{LOCK_SUFFIX}"
        self.config = config or LockConfig()
        self.purpose = purpose[:200]
        self.token = secrets.token_hex(8)
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        self.expires = 0.0
        self.waited = 0.0

    def _tags(self, expires: float) -> dict[str, str]:
        return {
            OWNER_TAG: self.token,
            HOLDER_TAG: self.holder,
            EXPIRES_TAG: f"{expires:.3f}",
            PURPOSE_TAG: self.purpose,
        }

    def _read(self) -> Any | None:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_registered_model(self.name)
        except MlflowException as exc:
            if _code(exc) == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise

    def _create(self) -> bool:
        from mlflow.exceptions import MlflowException

        expires = time.time() + self.config.lease_seconds
        try:
            self.client.create_registered_model(
                self.name,
                tags=self._tags(expires),
                description=(
                    f"Promotion lock of {self.name.removesuffix(LOCK_SUFFIX)!r} "
                    "(gram-ray, jobs/registry/lock.py). Deleted by its holder when done; "
                    "broken by others once its lease has expired."
                ),
            )
        except MlflowException as exc:
            # Someone holds it. The server answers RESOURCE_DOES_NOT_EXIST when the holder
            # deleted it between our failed insert and the server's look-up of the holder:
            # a race lost, like RESOURCE_ALREADY_EXISTS (measured on a sqlite store: about
            # 2% of the attempts of two processes taking and releasing the lock in a loop).
            if _code(exc) not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
            # An HTTP retry of our own successful create also lands here: check the owner.
            current = self._read()
            if current is None or current.tags.get(OWNER_TAG) != self.token:
                return False
            expires = float(current.tags[EXPIRES_TAG])
        self.expires = expires
        return True

    def _stale(self, lock: Any) -> bool:
        expires = lock.tags.get(EXPIRES_TAG)
        if expires is None:  # created by hand or half-written: judge by its last update
            started = (lock.last_updated_timestamp or lock.creation_timestamp or 0) / 1000
            deadline = started + self.config.lease_seconds
        else:
            deadline = float(expires)
        return time.time() > deadline + self.config.grace_seconds

    def _break(self, lock: Any) -> None:
        from mlflow.exceptions import MlflowException

        owner = lock.tags.get(OWNER_TAG) or f"unowned-{lock.creation_timestamp}"
        target = f"{self.name}.broken-{owner}"
        try:
            self.client.rename_registered_model(self.name, target)
        except MlflowException as exc:
            log.info("another contender broke or replaced the stale lock first (%s)", _code(exc))
            return
        self.client.set_registered_model_tag(
            target, "gram.lock.broken_by", f"{self.holder} at {time.time():.0f}"
        )
        log.warning(
            "broke the stale promotion lock of %s (held by %s, lease expired at %s); "
            "kept as %r for the record",
            lock.tags.get(HOLDER_TAG, "?"),
            self.name,
            lock.tags.get(EXPIRES_TAG, "?"),
            target,
        )

    def acquire(self) -> RegistryLock:
        """Take the lock, waiting up to `wait_seconds`; raises LockTimeoutError."""
        start = time.monotonic()
        deadline = start + self.config.wait_seconds
        delay = 0.1
        announced = False
        while True:
            if self._create():
                self.waited = time.monotonic() - start
                log.info("promotion lock %s taken by %s", self.name, self.holder)
                return self
            current = self._read()
            if current is not None and self._stale(current):
                self._break(current)
                continue
            if current is not None and not announced:
                announced = True
                log.info(
                    "waiting for the promotion lock %s, held by %s (lease until %s)",
                    self.name,
                    current.tags.get(HOLDER_TAG, "?"),
                    current.tags.get(EXPIRES_TAG, "?"),
                )
            if time.monotonic() > deadline:
                holder = current.tags.get(HOLDER_TAG, "?") if current is not None else "?"
                expires = current.tags.get(EXPIRES_TAG, "?") if current is not None else "?"
                raise LockTimeoutError(
                    f"the promotion lock {self.name!r} is held by {holder} (lease until "
                    f"{expires}, Unix time); waited {self.config.wait_seconds:.0f} s. Retry "
                    "later, raise lock.wait_seconds, or, if that holder is certainly gone, "
                    f"delete the registered model {self.name!r}"
                )
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 1.5, 1.0)

    def check(self) -> None:
        """Raise LockLostError unless we still hold the lock with `margin_seconds` to spare."""
        left = self.expires - time.time()
        if left < self.config.margin_seconds:
            raise LockLostError(
                f"only {left:.1f} s left of the lease on {self.name!r}: stopping before any "
                "write (raise lock.lease_seconds if the registry is slow)"
            )
        current = self._read()
        if current is None or current.tags.get(OWNER_TAG) != self.token:
            raise LockLostError(f"the lock {self.name!r} is no longer ours: it was broken")

    def release(self) -> None:
        """Delete the lock if it is still ours; an expired lease is left for others to break."""
        if self.expires - time.time() < self.config.margin_seconds:
            log.warning("lease on %s ran out before release; leaving it to expire", self.name)
            return
        from mlflow.exceptions import MlflowException

        current = self._read()
        if current is not None and current.tags.get(OWNER_TAG) == self.token:
            try:
                self.client.delete_registered_model(self.name)
            except MlflowException as exc:  # an HTTP retry of a delete that went through
                if _code(exc) != "RESOURCE_DOES_NOT_EXIST":
                    raise
        self.expires = 0.0

    def __enter__(self) -> RegistryLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
