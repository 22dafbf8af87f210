"""A run's output directory, on a local path or any pyarrow filesystem URI (shared storage on a cluster).

Every file is written whole to a temporary name and then moved into place, so a crash mid-write leaves
either the previous version or the new one, never a torn file. A write that meets a full or read-only disk
removes its temporary and raises StorageError (one line), leaving every complete file as it was. Nothing is
created until the first write, and `check_location` (`hsic_ray.run.location`) says before then whether a
location can hold a run at all.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from hsic_ray.errors import OutputLocationError, StorageError
from hsic_ray.run.location import check_location, resolve_location

__all__ = ["OutputLocationError", "RunDirectory", "StorageError", "check_location", "resolve_location"]

# Write failures that are the place's, not the program's: the run stops with one line naming the cause.
STORAGE_FAULTS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the filesystem is read-only",
    errno.EACCES: "it is not writable",
    errno.EPERM: "it is not writable",
}


def _errno(exc: OSError) -> int | None:
    """The OS error number, also where pyarrow gives it only in its message ("[errno 28] ...")."""
    if exc.errno:
        return exc.errno
    found = re.search(r"\[errno (\d+)\]", str(exc), re.IGNORECASE)
    return int(found.group(1)) if found else None


@contextlib.contextmanager
def storage_faults(where: str, cleanup: Callable[[], None] | None = None) -> Iterator[None]:
    """Turn a full or read-only disk met while writing `where` into one StorageError line, after `cleanup`
    (which removes what the failed write left half-done); other errors pass unchanged."""
    try:
        yield
    except OSError as exc:
        code = _errno(exc)
        if code not in STORAGE_FAULTS:
            raise
        if cleanup is not None:
            with contextlib.suppress(OSError):
                cleanup()
        raise StorageError(
            f"cannot write {where}: {STORAGE_FAULTS[code]} ({os.strerror(code)}); the files already complete are "
            "kept: free some space or make it writable, then rerun the same command"
        ) from None


class RunDirectory:
    def __init__(self, uri: str):
        self.uri = uri
        self.location = resolve_location(uri)
        self.fs, self.root = pafs.FileSystem.from_uri(self.location)
        self._jsonl: dict[str, list[str]] = {}  # on object stores: each JSON-lines file's lines, to rewrite it
        self._appending: set[str] = set()  # on a local disk: the JSON-lines files this process appends to

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def local_path(self, name: str) -> str | None:
        """The file's path on this machine, or None when the run lives on remote storage."""
        return self.path(name) if isinstance(self.fs, pafs.LocalFileSystem) else None

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self.path(name)).type != pafs.FileType.NotFound

    def list_dir(self, name: str = "") -> list[str]:
        """Names directly under `name` (the run directory itself by default; empty when it does not exist)."""
        selector = pafs.FileSelector(self.path(name) if name else self.root, allow_not_found=True)
        return sorted(info.base_name for info in self.fs.get_file_info(selector))

    def delete_dir(self, name: str) -> None:
        with storage_faults(self.path(name)):
            self.fs.delete_dir(self.path(name))

    def move(self, name: str, new_name: str) -> None:
        with storage_faults(self.path(new_name)):
            self.fs.move(self.path(name), self.path(new_name))

    def write_bytes(self, name: str, data: bytes) -> None:
        final = self.path(name)
        parent = final.rsplit("/", 1)[0]
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
        with storage_faults(final, cleanup=lambda: self.fs.delete_file(tmp)):
            self.fs.create_dir(parent, recursive=True)
            with self.fs.open_output_stream(tmp) as out:
                out.write(data)
            self.fs.move(tmp, final)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode())

    def write_json(self, name: str, obj: Any) -> None:
        self.write_text(name, json.dumps(obj, indent=2) + "\n")

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self.path(name)) as src:
            return src.read()

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode()

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_text(name))

    def read_jsonl(self, name: str) -> list[dict[str, Any]]:
        """The records of a JSON-lines file; a line torn by a crash mid-append is skipped."""
        if not self.exists(name):
            return []
        records = []
        for line in self.read_text(name).splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def append_jsonl(self, name: str, record: dict[str, Any]) -> None:
        """Add one record. On a local disk the line is appended (a crash can tear only that line, which
        `read_jsonl` skips); object stores cannot append, so there the file is rewritten atomically."""
        line = json.dumps(record) + "\n"
        local = self.local_path(name)
        if local is None:
            if name not in self._jsonl:
                self._jsonl[name] = [json.dumps(r) + "\n" for r in self.read_jsonl(name)]
            self._jsonl[name].append(line)
            self.write_text(name, "".join(self._jsonl[name]))
            return
        with storage_faults(local):
            os.makedirs(os.path.dirname(local), exist_ok=True)
            self._append_line(local, name, line)

    def _append_line(self, local: str, name: str, line: str) -> None:
        with open(local, "a+b") as f:
            if name not in self._appending:  # first append here: do not glue onto a line a crash left torn
                self._appending.add(name)
                f.seek(0, os.SEEK_END)
                if f.tell() > 0:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        line = "\n" + line
            f.write(line.encode())

    def write_with_local_file(self, name: str, writer: Callable[[str], None]) -> None:
        """For writers that need a local file path (matplotlib): write there, then store the bytes."""
        suffix = Path(name).suffix
        with tempfile.TemporaryDirectory() as tmpdir:
            tmp = os.path.join(tmpdir, "out" + suffix)
            with storage_faults(f"{self.path(name)} (through {tmp})"):
                writer(tmp)
            self.write_bytes(name, Path(tmp).read_bytes())
