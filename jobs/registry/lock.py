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
30 s grace). The lease logic (take, wait, break, fence, release) is
`pipelines.lease.Lease`; this module is where the record lives.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pipelines.lease import (
    Lease,
    LeaseError,
    LeaseHeldError,
    LeaseLostError,
    LeaseRecord,
    LeaseTimes,
)

__all__ = ["LockConfig", "LockError", "LockLostError", "LockTimeoutError", "RegistryLock"]

log = logging.getLogger(__name__)

OWNER_TAG = "gram.lock.owner"
HOLDER_TAG = "gram.lock.holder"
EXPIRES_TAG = "gram.lock.expires"
PURPOSE_TAG = "gram.lock.purpose"
PROCESS_TAG = "gram.lock.process"
LOCK_SUFFIX = ".promotion-lock"

LockError = LeaseError
"""The registry lock could not be taken or is no longer held."""
LockTimeoutError = LeaseHeldError
"""Another holder kept the lock for longer than we were willing to wait."""
LockLostError = LeaseLostError
"""Our lease ran out (or the lock was broken) before the work was done."""
LockConfig = LeaseTimes
"""The promotion lock's times (`lock.*` keys): lease, grace, wait and margin seconds."""


def _code(exc: BaseException) -> str:
    return str(getattr(exc, "error_code", ""))


class _RegistryStore:
    """The lease record as the tags of the registered model `name` (see the module docstring)."""

    def __init__(self, client: Any, name: str, lease_seconds: float) -> None:
        self.client = client
        self.name = name
        self.lease_seconds = lease_seconds

    @staticmethod
    def _tags(record: LeaseRecord) -> dict[str, str]:
        return {
            OWNER_TAG: record.owner,
            HOLDER_TAG: record.holder,
            EXPIRES_TAG: f"{record.expires:.3f}",
            PURPOSE_TAG: record.purpose,
            PROCESS_TAG: record.process,
        }

    def _stale_deadline(self, model: Any) -> float:
        # Created by hand or half-written: judge by its last update, as if taken then.
        started = (model.last_updated_timestamp or model.creation_timestamp or 0) / 1000
        return float(started) + self.lease_seconds

    def read(self) -> LeaseRecord | None:
        from mlflow.exceptions import MlflowException

        try:
            model = self.client.get_registered_model(self.name)
        except MlflowException as exc:
            if _code(exc) == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        tags = model.tags
        expires = tags.get(EXPIRES_TAG)
        return LeaseRecord(
            owner=tags.get(OWNER_TAG) or f"unowned-{model.creation_timestamp}",
            holder=tags.get(HOLDER_TAG, "?"),
            expires=float(expires) if expires is not None else self._stale_deadline(model),
            purpose=tags.get(PURPOSE_TAG, ""),
            process=tags.get(PROCESS_TAG, ""),
        )

    def create(self, record: LeaseRecord) -> LeaseRecord | None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(
                self.name,
                tags=self._tags(record),
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
            return None
        return record

    def break_stale(self, stale: LeaseRecord, breaker: str) -> bool:
        from mlflow.exceptions import MlflowException

        target = f"{self.name}.broken-{stale.owner}"
        try:
            self.client.rename_registered_model(self.name, target)
        except MlflowException as exc:
            log.info("another contender broke or replaced the stale lock first (%s)", _code(exc))
            return False
        self.client.set_registered_model_tag(
            target, "gram.lock.broken_by", f"{breaker} at {time.time():.0f}"
        )
        log.warning("the stale promotion lock is kept as %r for the record", target)
        return True

    def renew(self, record: LeaseRecord, expires: float) -> LeaseRecord | None:
        current = self.read()
        if current is None or current.owner != record.owner:
            return None
        self.client.set_registered_model_tag(self.name, EXPIRES_TAG, f"{expires:.3f}")
        return LeaseRecord(**{**record.__dict__, "expires": expires})

    def delete(self, record: LeaseRecord) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.delete_registered_model(self.name)
        except MlflowException as exc:  # an HTTP retry of a delete that went through
            if _code(exc) != "RESOURCE_DOES_NOT_EXIST":
                raise


class RegistryLock(Lease):
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
        self.name = f"{model_name}{LOCK_SUFFIX}"
        config = config or LockConfig()
        super().__init__(
            _RegistryStore(client, self.name, config.lease_seconds),
            config,
            what=f"the promotion lock {self.name!r}",
            purpose=purpose,
            how_to_clear=(
                "raise lock.wait_seconds, or, if that holder is certainly gone, "
                f"delete the registered model {self.name!r}"
            ),
        )

    @property
    def config(self) -> LockConfig:
        """The lock's times."""
        return self.times
