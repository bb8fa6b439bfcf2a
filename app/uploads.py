"""Receive a multipart/form-data upload by streaming its file part straight into the blob store.

FastAPI's `UploadFile` spools the whole body to a temp file before a handler runs, so a size limit could only
be enforced after the bytes were already on disk. Here the request body is parsed as it arrives: the file part
is hashed into a `StagedBlob` and the request is refused as soon as it passes its limit.
"""

from collections.abc import AsyncIterator, Collection, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from anyio import to_thread
from fastapi import Request
from pydantic import TypeAdapter, ValidationError
from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartState, parse_options_header

from app.blobs import BlobStore, BlobTooLarge, StagedBlob
from app.problems import Problem

FORM_OVERHEAD_BYTES = 64 * 1024
"""Room for boundaries, part headers and the small text fields around the file itself."""


@dataclass
class ReceivedUpload:
    blob: StagedBlob
    filename: str | None
    content_type: str | None
    fields: dict[str, str] = field(default_factory=dict)


@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    content_type: str | None = None
    headers: dict[bytes, bytes] = field(default_factory=dict)
    text: bytearray = field(default_factory=bytearray)


class _FormReader:
    """python-multipart callbacks: file bytes are queued for the blob, text fields kept small."""

    def __init__(self, file_field: str, text_fields: Collection[str], max_field_chars: int) -> None:
        self.file_field = file_field
        self.text_fields = set(text_fields)
        self.max_field_chars = max_field_chars
        self.max_field_bytes = max_field_chars * 4
        self.fields: dict[str, str] = {}
        self.file_seen = False
        self.filename: str | None = None
        self.content_type: str | None = None
        self.pending: list[bytes] = []
        self._part = _Part()
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._target = "skip"

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._header_name.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._part = _Part()

    def _header_end(self) -> None:
        self._part.headers[bytes(self._header_name).lower()] = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._part.headers.get(b"content-disposition", b""))
        name = options.get(b"name")
        if name is None:
            raise Problem(400, "malformed-multipart", "Malformed multipart body", "a part has no name")
        self._part.name = name.decode("utf-8", "replace")
        filename = options.get(b"filename")
        self._part.filename = filename.decode("utf-8", "replace") if filename is not None else None
        content_type = self._part.headers.get(b"content-type")
        self._part.content_type = content_type.decode("latin-1") if content_type else None
        if self._part.name == self.file_field:
            if self.file_seen:
                raise _field_problem(self.file_field, "send exactly one file", "too_many_files")
            self.file_seen = True
            self.filename = self._part.filename
            self.content_type = self._part.content_type
            self._target = "file"
        elif self._part.name in self.text_fields and self._part.filename is None:
            self._target = "text"
        else:
            self._target = "skip"

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._target == "file":
            self.pending.append(data[start:end])
        elif self._target == "text":
            self._part.text.extend(data[start:end])
            if len(self._part.text) > self.max_field_bytes:
                raise _field_problem(self._part.name, "the value is too long", "string_too_long")

    def _part_end(self) -> None:
        if self._target == "text":
            value = self._part.text.decode("utf-8", "replace")
            if len(value) > self.max_field_chars:
                raise _field_problem(self._part.name, "the value is too long", "string_too_long")
            self.fields[self._part.name] = value
        self._target = "skip"


@asynccontextmanager
async def receive_upload(
    request: Request,
    store: BlobStore,
    *,
    namespace: str,
    max_bytes: int,
    file_field: str = "file",
    text_fields: Collection[str] = (),
    max_field_chars: int = 256,
) -> AsyncIterator[ReceivedUpload]:
    """Stream the request's `file_field` part into a staged blob of `namespace`.

    Inside the block the blob is complete (`blob.sha256` is set) but uncommitted: commit it to keep it;
    otherwise it is removed on exit, including when the upload is refused. Text fields in `text_fields` come
    back in `fields`; anything else is skipped. Refusals are `Problem`s: 415 when the body is not
    multipart/form-data, 413 past `max_bytes`, 422 for a missing file or an over-long field.
    """
    media_type, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if media_type != b"multipart/form-data" or not boundary:
        raise Problem(
            415, "expected-multipart", "Expected multipart/form-data", "send the file as multipart/form-data"
        )
    body_limit = max_bytes + FORM_OVERHEAD_BYTES
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > body_limit:
        raise _too_large(max_bytes)

    reader = _FormReader(file_field, text_fields, max_field_chars)
    parser = MultipartParser(boundary, reader.callbacks())
    with store.staging(namespace, max_bytes) as staged:
        received = 0
        try:
            async for chunk in request.stream():
                received += len(chunk)
                if received > body_limit:
                    raise _too_large(max_bytes)
                parser.write(chunk)
                if reader.pending:
                    await to_thread.run_sync(_write_all, staged, reader.pending)
                    reader.pending = []
            parser.finalize()
            if parser.state != MultipartState.END:  # finalize() accepts a body cut before its last boundary
                raise FormParserError("the body ends before the multipart closing boundary")
        except BlobTooLarge as exc:
            raise _too_large(max_bytes) from exc
        except FormParserError as exc:
            raise Problem(400, "malformed-multipart", "Malformed multipart body", str(exc)) from exc
        if not reader.file_seen:
            raise _field_problem(file_field, "Field required", "missing")
        await to_thread.run_sync(staged.finish)
        yield ReceivedUpload(
            blob=staged, filename=reader.filename, content_type=reader.content_type, fields=reader.fields
        )


def _write_all(staged: StagedBlob, chunks: list[bytes]) -> None:
    for chunk in chunks:
        staged.write(chunk)


def _too_large(max_bytes: int) -> Problem:
    return Problem(
        413,
        "upload-too-large",
        "Upload too large",
        f"the file is over the limit of {max_bytes} bytes",
        max_bytes=max_bytes,
    )


def _field_problem(name: str, message: str, error_type: str) -> Problem:
    return Problem(
        422,
        "validation-error",
        "Invalid request",
        f"body.{name}: {message}",
        errors=[{"loc": ["body", name], "msg": message, "type": error_type}],
    )


def check_fields(fields: Mapping[str, str], **types: Any) -> None:
    """Refuse (422 `validation-error`, as for a JSON body) any received text field that its type refuses.

    `types` maps a field's name to its type, e.g. `Annotated[str, stored_text(256)]`; absent fields pass.
    """
    errors: list[dict[str, Any]] = []
    for name, declared in types.items():
        if name not in fields:
            continue
        try:
            TypeAdapter(declared).validate_python(fields[name])
        except ValidationError as exc:
            errors.extend(
                {"loc": ["body", name, *error["loc"]], "msg": error["msg"], "type": error["type"]}
                for error in exc.errors()
            )
    if errors:
        detail = "; ".join(f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}" for e in errors[:5])
        raise Problem(422, "validation-error", "Invalid request", detail, errors=errors)


def multipart_body(
    file_description: str, *, required: tuple[str, ...], **fields: dict[str, Any]
) -> dict[str, Any]:
    """`openapi_extra` for an endpoint that reads its multipart body itself (to stream it), so the docs and
    generated clients still see the form."""
    properties = {"file": {"type": "string", "format": "binary", "description": file_description}, **fields}
    schema = {"type": "object", "required": ["file", *required], "properties": properties}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}
