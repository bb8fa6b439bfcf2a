"""Which errors of a job attempt are outages of the machine (disk, database) rather than faults of the job.

A fine-tune that trained for hours and then met a full disk or a database restart while saving has done
nothing wrong: failing it would throw the work away. Such an attempt is handed back like one whose worker
died (worker.claims.requeue_job), to resume from its saved state; its attempts are still capped. A disk
error is recognised by its errno, so an unreadable image (PIL raises OSError) still fails the job at once.
Torch-free, like the rest of the job runtime.
"""

from __future__ import annotations

import errno

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from app.blobs import StorageUnavailable

DISK_ERRNOS = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EACCES, errno.EPERM})


def outage_of(exc: BaseException) -> dict[str, str] | None:
    """The problem an outage would report (type, title, detail), or None when `exc` is not one."""
    if isinstance(exc, StorageUnavailable) or (isinstance(exc, OSError) and exc.errno in DISK_ERRNOS):
        return {"type": "storage-unavailable", "title": "Storage unavailable", "detail": str(exc)}
    if isinstance(exc, OperationalError | InterfaceError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    ):
        detail = f"{type(exc).__name__}: {str(exc.orig) if exc.orig is not None else exc}"
        return {"type": "database-unavailable", "title": "Database unavailable", "detail": detail[:500]}
    return None
