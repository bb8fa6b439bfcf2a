"""`magtune keys create|list|revoke`: API keys, straight in the database (MAGTUNE_DATABASE_URL), like
`magtune migrate`: the way to make the first key, before any key can call POST /v1/keys."""

from __future__ import annotations

import argparse
import re
from datetime import timedelta
from typing import Any

from worker.cli.output import EXIT_BAD_INPUT, EXIT_OK, emit, error

DURATION = re.compile(r"^(\d+)([smhd]?)$")
UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("keys", help="create, list and revoke API keys (in the database)")
    commands = parser.add_subparsers(dest="keys_command", required=True, metavar="ACTION")

    create = commands.add_parser("create", help="issue a key; prints it once")
    create.add_argument("--name", required=True, help="who or what holds the key")
    create.add_argument(
        "--scopes", required=True, help="comma-separated, e.g. faces:write,feedback:write (see README)"
    )
    create.add_argument("--expires-in", help="e.g. 3600, 90m, 12h, 30d (default: never)")
    create.add_argument("--json", action="store_true", help="print the key and its record as JSON")
    create.set_defaults(handler=run_create)

    listing = commands.add_parser("list", help="every key, without secrets")
    listing.add_argument("--json", action="store_true", help="print the keys as JSON")
    listing.set_defaults(handler=run_list)

    revoke = commands.add_parser("revoke", help="revoke a key: refused at once by every api process")
    revoke.add_argument("key_id", metavar="ID", help="the key's id (the part after mt_)")
    revoke.add_argument("--json", action="store_true", help="print the key as JSON")
    revoke.set_defaults(handler=run_revoke)


def parse_duration(text: str) -> timedelta:
    match = DURATION.match(text.strip())
    if match is None or int(match.group(1)) <= 0:
        raise ValueError(f"--expires-in {text!r}: expected a positive number with s, m, h or d (e.g. 30d)")
    return timedelta(seconds=int(match.group(1)) * UNIT_S[match.group(2)])


def parse_scopes(text: str) -> list[str]:
    from app.auth.scopes import Scope

    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in {scope.value for scope in Scope}]
    if not names or unknown:
        raise ValueError(
            f"--scopes: unknown {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(scope.value for scope in Scope)}"
        )
    return names


def _record(row: Any) -> dict[str, Any]:
    from app.auth.keys import key_state

    def when(value: Any) -> str | None:
        return value.isoformat() if value is not None else None

    return {
        "id": row.id,
        "name": row.name,
        "scopes": list(row.scopes),
        "state": key_state(row),
        "created_at": when(row.created_at),
        "expires_at": when(row.expires_at),
        "revoked_at": when(row.revoked_at),
        "last_used_at": when(row.last_used_at),
    }


def run_create(args: argparse.Namespace) -> int:
    from app.auth.keys import issue_key
    from app.config import get_settings
    from app.db import get_session_factory

    try:
        scopes = parse_scopes(args.scopes)
        expires_in = parse_duration(args.expires_in) if args.expires_in else None
        if not args.name or len(args.name) > 256 or "\x00" in args.name:
            raise ValueError("--name: 1 to 256 characters, no NUL")
    except ValueError as exc:
        error("keys create", str(exc))
        return EXIT_BAD_INPUT
    with get_session_factory(get_settings().database_url)() as session:
        issued = issue_key(
            session, name=args.name, scopes=scopes, expires_in=expires_in, created_by="magtune keys"
        )
        session.commit()
        result = {**_record(issued.row), "key": issued.secret}
    emit(result, as_json=args.json, render=_render_created)
    return EXIT_OK


def _render_created(result: dict[str, Any]) -> str:
    return (
        f"{result['key']}\n"
        f"key {result['id']} ({result['name']}): {', '.join(result['scopes'])}; "
        f"expires {result['expires_at'] or 'never'}\n"
        "This is the only time the key is shown: store it now (it is kept only as a hash)."
    )


def run_list(args: argparse.Namespace) -> int:
    from app.auth.keys import all_keys
    from app.config import get_settings
    from app.db import get_session_factory

    with get_session_factory(get_settings().database_url)() as session:
        records = [_record(row) for row in all_keys(session)]
    emit({"keys": records}, as_json=args.json, render=_render_list)
    return EXIT_OK


def _render_list(result: dict[str, Any]) -> str:
    if not result["keys"]:
        return "no keys"
    return "\n".join(
        f"{key['id']}  {key['state']:<8} {key['name']}: {','.join(key['scopes'])} "
        f"(last used {key['last_used_at'] or 'never'})"
        for key in result["keys"]
    )


def run_revoke(args: argparse.Namespace) -> int:
    from app.auth.keys import revoke_key
    from app.config import get_settings
    from app.db import get_session_factory

    with get_session_factory(get_settings().database_url)() as session:
        row = revoke_key(session, args.key_id)
        if row is None:
            error("keys revoke", f"no key with id {args.key_id!r}")
            return EXIT_BAD_INPUT
        session.commit()
        record = _record(row)
    emit(record, as_json=args.json, render=lambda key: f"key {key['id']} ({key['name']}) is revoked")
    return EXIT_OK
