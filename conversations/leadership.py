"""One active consumer per source: a lease row, renewed by its holder and checked inside every batch
transaction. A standby worker waits and takes over within seconds of the holder's death (the lease expires)."""
from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from datetime import UTC, datetime, timedelta

from django.db import IntegrityError, InterfaceError, OperationalError, close_old_connections, transaction
from django.db.models import Q

from conversations.models import StreamLease

logger = logging.getLogger(__name__)


class LeaseLost(Exception):
    """Another worker holds the source now: this one must stop consuming (its uncommitted batch is re-read)."""


def holder_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Lease:
    def __init__(self, *, source: str, ttl: float = 10.0, holder: str | None = None) -> None:
        self.source = source
        self.ttl = timedelta(seconds=ttl)
        self.holder = holder or holder_name()
        self._renewer: threading.Thread | None = None
        self._released = threading.Event()

    def try_acquire(self) -> bool:
        """Take the lease if it is free or expired (or already ours). A conditional write: safe to race."""
        now = datetime.now(UTC)
        taken = StreamLease.objects.filter(source=self.source).filter(
            Q(expires_at__lt=now) | Q(holder=self.holder)
        ).update(holder=self.holder, acquired_at=now, expires_at=now + self.ttl)
        if taken:
            return True
        try:
            with transaction.atomic():
                StreamLease.objects.create(source=self.source, holder=self.holder, acquired_at=now,
                                           expires_at=now + self.ttl)
            return True
        except IntegrityError:
            return False  # somebody else holds it and it has not expired

    def wait_for(self, stop: threading.Event, *, poll: float = 1.0) -> bool:
        """Block until this worker holds the lease (True) or `stop` is set (False)."""
        announced = False
        while not stop.is_set():
            if self._try(stop):
                logger.info("lease on source %s acquired by %s", self.source, self.holder)
                return True
            if not announced:
                logger.info("standing by: another worker consumes source %s; taking over when it stops", self.source)
                announced = True
            stop.wait(poll)
        return False

    def _try(self, stop: threading.Event) -> bool:
        try:
            return self.try_acquire()
        except (OperationalError, InterfaceError) as exc:
            logger.warning("lease on %s: database unavailable (%s), retrying", self.source, exc)
            close_old_connections()
            return False

    def fence(self) -> None:
        """Inside a batch transaction: renew the lease, or fail the batch if another worker took it."""
        now = datetime.now(UTC)
        if not StreamLease.objects.filter(source=self.source, holder=self.holder).update(expires_at=now + self.ttl):
            raise LeaseLost(f"another worker took over source {self.source}; this worker stops consuming it")

    def start_renewing(self) -> None:
        """Keep the lease alive while the stream is quiet (batches renew it too)."""
        self._renewer = threading.Thread(target=self._renew_loop, name=f"lease-{self.source}", daemon=True)
        self._renewer.start()

    def _renew_loop(self) -> None:
        interval = self.ttl.total_seconds() / 3
        while not self._released.wait(interval):
            try:
                with transaction.atomic():
                    self.fence()
            except LeaseLost:
                logger.error("lease on %s lost to another worker", self.source)
                return
            except (OperationalError, InterfaceError) as exc:
                logger.warning("lease on %s not renewed: database unavailable (%s)", self.source, exc)
                close_old_connections()
        close_old_connections()

    def release(self) -> None:
        self._released.set()
        try:
            StreamLease.objects.filter(source=self.source, holder=self.holder).update(
                expires_at=datetime.now(UTC) - timedelta(seconds=1)
            )
        except (OperationalError, InterfaceError):
            logger.warning("lease on %s not released (database unavailable); it expires by itself", self.source)
