"""Storage agents: csv/json/text readers and writers confined to the tenant's workspace.

Every path is relative to ``<workspace_root>/<tenant>/`` (created on demand, mode 0700).
Confinement does not rely on string checks alone: absolute paths, ``..`` components and
NUL are refused up front, and then the path is opened one component at a time from a
descriptor of the tenant root with ``O_NOFOLLOW``, so no symbolic link is followed: not
one planted inside the workspace, not one swapped in between a check and the open.

Writers write a temporary file in the target directory and rename it over the target, so
a reader never sees a half-written file. ``append`` copies the old content into that
temporary file first; an exclusive ``flock`` on the directory serialises writers to the
same directory, so two appends from parallel steps on one host both land.

Blocking file work runs in a thread (``asyncio.to_thread``) to keep the worker's loop free.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import errno
import fcntl
import io
import json
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentflow_core.agent_configs.storage import (
    CsvReaderConfig,
    CsvWriterConfig,
    ReaderConfig,
    WriterConfig,
)
from agentflow_worker.agents.base import Agent, AgentError, StepContext, parse_config
from agentflow_worker.agents.templating import render, render_value, step_scope

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


# -- confinement -------------------------------------------------------------------------


def split_path(path: str) -> list[str]:
    """The components of a workspace-relative path, or AgentError saying why it is refused."""
    if "\0" in path:
        raise AgentError("storage: path contains a NUL character")
    if path.startswith(("/", "\\")) or os.path.isabs(path):
        raise AgentError(f"storage: path '{path}' is absolute; paths are relative to the tenant's workspace")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise AgentError(f"storage: path '{path}' contains '..'; paths may not leave the tenant's workspace")
    if not parts:
        raise AgentError(f"storage: path '{path}' names no file")
    return parts


def tenant_root(workspace_root: Path, tenant: str) -> Path:
    if not tenant or tenant in (".", "..") or "/" in tenant or "\0" in tenant:
        raise AgentError(f"storage: tenant '{tenant}' cannot name a workspace directory")
    root = Path(workspace_root) / tenant
    if not root.is_dir():
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(root, 0o700)  # mkdir's mode is filtered by the umask; the tenant root is exactly 0700
    return root


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


@contextlib.contextmanager
def open_dir(root: Path, parts: list[str], *, create: bool, shown: str) -> Iterator[int]:
    """A descriptor of the directory holding ``parts[-1]``, reached from ``root`` without
    following any symbolic link (missing directories made when ``create``)."""
    # The root itself may be a link set up by the operator (e.g. to a volume); that is theirs
    # to decide, so only the tenant's own components are opened with O_NOFOLLOW.
    fd = os.open(os.path.realpath(root), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for depth, name in enumerate(parts[:-1]):
            where = "/".join(parts[: depth + 1])
            try:
                nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise AgentError(f"storage: '{shown}' does not exist (no directory '{where}')") from None
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o700, dir_fd=fd)
                nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link(name, fd):
                    raise AgentError(
                        f"storage: '{where}' in path '{shown}' is a symbolic link; storage agents do not follow links"
                    ) from None
                if exc.errno == errno.ENOTDIR:
                    raise AgentError(f"storage: '{where}' in path '{shown}' is not a directory") from None
                raise
            os.close(fd)
            fd = nxt
        yield fd
    finally:
        os.close(fd)


def _check_inside(root: Path, parts: list[str], shown: str) -> None:
    """The plain realpath check: a clear message for the common case; the descriptor walk
    is what actually enforces confinement."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, *parts))
    if os.path.commonpath([real_root, real]) != real_root:
        raise AgentError(f"storage: path '{shown}' resolves outside the tenant's workspace (through a symbolic link)")


def _open_final(name: str, dir_fd: int, shown: str) -> int:
    try:
        # O_NONBLOCK: opening a FIFO planted in the workspace must not hang the worker
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        raise AgentError(f"storage: '{shown}' does not exist in the workspace") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise AgentError(f"storage: '{shown}' is a symbolic link; storage agents do not follow links") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise AgentError(f"storage: '{shown}' is not a regular file")
    return fd


def _read_fd(fd: int, limit: int, shown: str) -> bytes:
    size = os.fstat(fd).st_size
    if size > limit:
        raise AgentError(f"storage: '{shown}' is {size} bytes, more than max_bytes={limit}")
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        total += len(chunk)
        if total > limit:  # the file grew while we read it
            raise AgentError(f"storage: '{shown}' is more than max_bytes={limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass(frozen=True, slots=True)
class _Target:
    root: Path
    parts: list[str]

    @property
    def shown(self) -> str:
        return "/".join(self.parts)


def _target(ctx: StepContext, template: str) -> _Target:
    path = render(template, step_scope(ctx))
    parts = split_path(path)
    root = tenant_root(ctx.svc.workspace_root, ctx.tenant)
    _check_inside(root, parts, "/".join(parts))
    return _Target(root, parts)


def read_bytes(target: _Target, limit: int) -> bytes:
    with open_dir(target.root, target.parts, create=False, shown=target.shown) as dfd:
        fd = _open_final(target.parts[-1], dfd, target.shown)
        try:
            return _read_fd(fd, limit, target.shown)
        finally:
            os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def write_bytes(target: _Target, limit: int, render_new: Callable[[bytes | None], bytes], *, append: bool) -> int:
    """Atomically replace the target with ``render_new(old_bytes_or_None)``; returns its size."""
    name = target.parts[-1]
    with open_dir(target.root, target.parts, create=True, shown=target.shown) as dfd:
        fcntl.flock(dfd, fcntl.LOCK_EX)  # released when the descriptor closes
        old: bytes | None = None
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None:
            if stat.S_ISLNK(st.st_mode):
                raise AgentError(f"storage: '{target.shown}' is a symbolic link; storage agents do not follow links")
            if not stat.S_ISREG(st.st_mode):
                raise AgentError(f"storage: '{target.shown}' exists and is not a regular file")
            if append:
                fd = _open_final(name, dfd, target.shown)
                try:
                    old = _read_fd(fd, limit, target.shown)
                finally:
                    os.close(fd)
        data: bytes = render_new(old)
        if len(data) > limit:
            raise AgentError(
                f"storage: writing '{target.shown}' would make it {len(data)} bytes, more than max_bytes={limit}"
            )
        tmp = f".{name}.{secrets.token_hex(6)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
        return len(data)


# -- encodings and formats ---------------------------------------------------------------


def _decode(data: bytes, encoding: str, shown: str) -> str:
    try:
        return data.decode(encoding)
    except LookupError:
        raise AgentError(f"storage: encoding '{encoding}' is not known") from None
    except UnicodeDecodeError as exc:
        raise AgentError(f"storage: '{shown}' is not valid {encoding} (byte {exc.start}): {exc.reason}") from None


def _encode(text: str, encoding: str, shown: str) -> bytes:
    try:
        return text.encode(encoding)
    except LookupError:
        raise AgentError(f"storage: encoding '{encoding}' is not known") from None
    except UnicodeEncodeError as exc:
        raise AgentError(
            f"storage: cannot write '{shown}' as {encoding}: {exc.object[exc.start : exc.end]!r} has no encoding"
        ) from None


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _rows(data: Any) -> list[dict[str, Any]]:
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise AgentError(f"csv_writer: data must be a list of objects (rows), not a {type(data).__name__}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise AgentError(f"csv_writer: row {i} is a {type(row).__name__}, not an object")
    return data


def _header(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(str(key), None)
    return list(seen)


async def _thread(func: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return await asyncio.to_thread(func, *args, **kwargs)
    except AgentError:
        raise
    except OSError as exc:
        raise AgentError(f"storage: {exc.strerror or exc}") from exc


class _Writer:
    kind = "file_writer"

    async def run(self, ctx: StepContext) -> Any:
        cfg = self.config(ctx)
        target = _target(ctx, cfg.path)
        data = ctx.input if cfg.data is None else render_value(cfg.data, step_scope(ctx))
        if cfg.mode == "append" and not self.can_append:
            raise AgentError(f"{self.kind}: mode 'append' is not supported (a JSON document has one value); use write")
        size = await _thread(
            write_bytes,
            target,
            cfg.max_bytes,
            lambda old: self.produce(cfg, data, old, target.shown),
            append=cfg.mode == "append",
        )
        return {"path": target.shown, "bytes": size}

    can_append = True

    def config(self, ctx: StepContext) -> WriterConfig:
        return parse_config(WriterConfig, ctx)

    def produce(self, cfg: Any, data: Any, old: bytes | None, shown: str) -> bytes:
        text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, indent=2)
        new = _encode(text, cfg.encoding, shown)
        return new if old is None else old + new


class FileWriter(_Writer):
    """``file_writer``: text (a non-string value is written as JSON)."""


class JsonWriter(_Writer):
    """``json_writer``: one JSON document."""

    kind = "json_writer"
    can_append = False

    def produce(self, cfg: Any, data: Any, old: bytes | None, shown: str) -> bytes:
        try:
            text = json.dumps(data, ensure_ascii=False, indent=2) + "\n"
        except (TypeError, ValueError) as exc:
            raise AgentError(f"json_writer: data is not JSON-serialisable: {exc}") from exc
        return _encode(text, cfg.encoding, shown)


class CsvWriter(_Writer):
    """``csv_writer``: rows (objects) under a header of their keys; append keeps the file's header."""

    kind = "csv_writer"

    def config(self, ctx: StepContext) -> CsvWriterConfig:
        return parse_config(CsvWriterConfig, ctx)

    def produce(self, cfg: Any, data: Any, old: bytes | None, shown: str) -> bytes:
        rows = _rows(data)
        buffer = io.StringIO()
        header: list[str]
        if old:
            existing = next(csv.reader(io.StringIO(_decode(old, cfg.encoding, shown)), delimiter=cfg.delimiter), [])
            header = existing
            extra = [k for k in _header(rows) if k not in header]
            if extra:
                raise AgentError(
                    f"csv_writer: cannot append to '{shown}': column(s) {', '.join(extra)} are not in its header "
                    f"({', '.join(header)})"
                )
            prefix = old if old.endswith(b"\n") else old + _encode("\r\n", cfg.encoding, shown)
        else:
            header = _header(rows)
            prefix = b""
        writer = csv.writer(buffer, delimiter=cfg.delimiter)
        if not old:
            writer.writerow(header)
        for row in rows:
            writer.writerow([_cell(row.get(k)) for k in header])
        return prefix + _encode(buffer.getvalue(), cfg.encoding, shown)


class FileReader:
    """``file_reader``: the file's text."""

    async def run(self, ctx: StepContext) -> Any:
        cfg = parse_config(ReaderConfig, ctx)
        target = _target(ctx, cfg.path)
        data = await _thread(read_bytes, target, cfg.max_bytes)
        return _decode(data, cfg.encoding, target.shown)


class JsonReader:
    """``json_reader``: the parsed document."""

    async def run(self, ctx: StepContext) -> Any:
        cfg = parse_config(ReaderConfig, ctx)
        target = _target(ctx, cfg.path)
        text = _decode(await _thread(read_bytes, target, cfg.max_bytes), cfg.encoding, target.shown)
        try:
            return json.loads(text)
        except ValueError as exc:
            raise AgentError(f"json_reader: '{target.shown}' is not valid JSON: {exc}") from None


class CsvReader:
    """``csv_reader``: ``{"rows": [objects keyed by the header], "row_count", "truncated"}``."""

    async def run(self, ctx: StepContext) -> Any:
        cfg = parse_config(CsvReaderConfig, ctx)
        target = _target(ctx, cfg.path)
        text = _decode(await _thread(read_bytes, target, cfg.max_bytes), cfg.encoding, target.shown)
        # cells beyond the header land under "_extra" (a None key would not survive as JSON)
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=cfg.delimiter, restkey="_extra")
        rows: list[dict[str, Any]] = []
        truncated = False
        try:
            for row in reader:
                if len(rows) >= cfg.max_rows:
                    truncated = True
                    break
                rows.append(row)
        except csv.Error as exc:
            raise AgentError(f"csv_reader: '{target.shown}' line {reader.line_num}: {exc}") from None
        return {"rows": rows, "row_count": len(rows), "truncated": truncated}


STORAGE_AGENTS: dict[str, Agent] = {
    "csv_reader": CsvReader(),
    "csv_writer": CsvWriter(),
    "json_reader": JsonReader(),
    "json_writer": JsonWriter(),
    "file_reader": FileReader(),
    "file_writer": FileWriter(),
}
