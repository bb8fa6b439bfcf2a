"""Checks and set-up when a process starts: auth off only on loopback, and the embedded admin key."""

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from app.auth.keys import issue_key, parse_key
from app.auth.scopes import ALL_SCOPES
from app.config import Settings
from app.db import get_session_factory
from app.tables import ApiKey

ADMIN_KEY_NAME = "admin (magtune up)"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def refuse_unsafe_bind(settings: Settings, host: str) -> str | None:
    """Why the api must not start (auth off on an address other hosts can reach), or None."""
    if settings.auth_disabled and not is_loopback(host):
        return (
            f"MAGTUNE_AUTH_DISABLED=true is allowed only on a loopback address (127.0.0.1, ::1, localhost), "
            f"not {host or 'all addresses'}: anyone who can reach the port could do anything. Bind to "
            "127.0.0.1, or keep auth on and create a key with `magtune keys create`"
        )
    return None


@dataclass(frozen=True)
class AdminKey:
    path: Path
    secret: str | None  # the key when created by this start (shown once), else None


def ensure_admin_key(settings: Settings) -> AdminKey:
    """The embedded admin key: created (every scope) on first start and written to `admin_key_path` with
    mode 0600; a later start reuses it. A file whose key the database does not know (a database made anew)
    is replaced; a key that was revoked stays revoked."""
    path = settings.admin_key_path
    if path.exists():
        parsed = parse_key(path.read_text().strip())
        with get_session_factory(settings.database_url)() as session:
            if parsed is not None and session.get(ApiKey, parsed[0]) is not None:
                return AdminKey(path, None)
    with get_session_factory(settings.database_url)() as session:
        issued = issue_key(session, name=ADMIN_KEY_NAME, scopes=ALL_SCOPES, created_by="magtune up")
        _write_private(path, issued.secret + "\n")
        session.commit()
    return AdminKey(path, issued.secret)


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, replacing any old one atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.unlink(missing_ok=True)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
