"""One job per OUTPUT: a lease file in OUTPUT's manifest folder that the running job renews.

A second run on the same OUTPUT finds a live lease and refuses at once, naming the job that
holds it, so two runs never process the same photos twice. A killed run stops renewing; its
lease expires after TTL_SECONDS and the next run takes it over. The lease is created with an
exclusive create (a hard link locally, a conditional put on S3), so of two runs starting at
once exactly one wins. A lease file that cannot be read (torn, foreign) is no job's lease: it is
named in one warning and set aside in manifest/damaged/.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from ..errors import OutputBusyError
from ..manifest import DAMAGED_DIR, MANIFEST_DIR, damage_of, set_aside
from ..storage import Storage

log = logging.getLogger(__name__)

LEASE_FILE = f"{MANIFEST_DIR}/lease.json"
TTL_SECONDS = 60.0  # a killed run blocks the next one for at most this long
RENEW_SECONDS = 15.0


@dataclass(frozen=True)
class LeaseRecord:
    run_id: str
    host: str
    pid: int
    started_at: str
    expires_at: float  # seconds since the epoch

    @classmethod
    def parse(cls, data: bytes) -> LeaseRecord:
        """The record of a lease file's bytes; ValueError where they hold none."""
        record = json.loads(data)  # a ValueError where the bytes are no JSON text
        fields: dict[str, type | tuple[type, ...]] = {
            "run_id": str,
            "host": str,
            "pid": int,
            "started_at": str,
            "expires_at": (int, float),
        }
        if not isinstance(record, dict) or set(record) != set(fields):
            raise ValueError(f"not a lease record: {data[:60]!r}")
        wrong = [name for name, kind in fields.items() if not isinstance(record[name], kind)]
        if wrong:
            raise ValueError(f"not a lease record: {', '.join(wrong)} of the wrong type")
        return cls(**record)

    def describe(self) -> str:
        return f"run {self.run_id} (host {self.host}, pid {self.pid}, since {self.started_at})"

    def is_dead_here(self) -> bool:
        """A holder on this host whose process is gone (killed): no need to wait for expiry."""
        if self.host != socket.gethostname() or self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False


class Lease:
    """Held from acquire() to release(); renew() at least every RENEW_SECONDS."""

    def __init__(self, output: Storage, run_id: str, ttl: float = TTL_SECONDS, clock=time.time) -> None:
        self.output, self.run_id, self.ttl, self.clock = output, run_id, ttl, clock
        self.started_at = datetime.now(UTC).isoformat(timespec="seconds")

    def _record(self) -> LeaseRecord:
        return LeaseRecord(self.run_id, socket.gethostname(), os.getpid(), self.started_at, self.clock() + self.ttl)

    def _encode(self) -> bytes:
        return json.dumps(asdict(self._record())).encode()

    def current(self) -> LeaseRecord | None:
        """The lease in OUTPUT now (None when there is none, or when the file holds no lease:
        then it is set aside in manifest/damaged/)."""
        try:
            data = self.output.read_bytes(LEASE_FILE)
        except FileNotFoundError:
            return None
        try:
            return LeaseRecord.parse(data)
        except ValueError as exc:  # a torn or foreign file
            target = f"{MANIFEST_DIR}/{DAMAGED_DIR}/{os.path.basename(LEASE_FILE)}"
            set_aside(self.output, LEASE_FILE, target, data, damage_of(exc), "taken as no job's lease")
            return None

    def check(self) -> None:
        """OutputBusyError where another live job holds the lease. Writes nothing, except to set
        a damaged lease file aside."""
        held = self.current()
        if held is not None and held.run_id != self.run_id:
            self._refuse_if_live(held)

    def acquire(self) -> Lease:
        """Take the lease, or raise OutputBusyError naming the live job that holds it."""
        for _ in range(3):  # a lost race against another taker is decided by the re-read
            if self.output.create(LEASE_FILE, self._encode()):
                return self
            held = self.current()
            if held is None:
                continue  # released between our create and read
            if held.run_id == self.run_id:
                return self
            self._refuse_if_live(held)
            log.warning("taking over the lease of %s, which has ended", held.describe())
            self.output.remove(LEASE_FILE)
        raise OutputBusyError(f"{self.output.uri}: could not take the lease ({LEASE_FILE}): other runs keep taking it")

    def _refuse_if_live(self, held: LeaseRecord) -> None:
        left = held.expires_at - self.clock()
        if left > 0 and not held.is_dead_here():
            raise OutputBusyError(
                f"{self.output.uri}: another job is writing here: {held.describe()}; "
                f"its lease expires in {left:.0f} s unless it renews it (wait for it, or stop it)"
            )

    def renew(self) -> None:
        """Push the expiry on; OutputBusyError where another run has taken the lease since."""
        held = self.current()
        if held is not None and held.run_id != self.run_id:
            raise OutputBusyError(f"{self.output.uri}: the lease was taken over by {held.describe()}; stopping")
        self.output.write_atomic(LEASE_FILE, self._encode())

    def release(self) -> None:
        held = self.current()
        if held is not None and held.run_id == self.run_id:
            self.output.remove(LEASE_FILE)
