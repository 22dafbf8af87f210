"""A run's output directory, on a local path or any pyarrow filesystem URI (shared storage on a cluster).

Every file is written whole to a temporary name and then moved into place, so a crash mid-write leaves
either the previous version or the new one, never a torn file.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

import pyarrow.fs as pafs


def _has_scheme(uri: str) -> bool:
    return "://" in uri


class RunDirectory:
    def __init__(self, uri: str):
        self.uri = uri
        # Absolute, so that other processes (stage actors) with other working directories find it too.
        self.location = uri if _has_scheme(uri) else os.path.abspath(os.path.expanduser(uri))
        self.fs, self.root = pafs.FileSystem.from_uri(self.location)
        self.fs.create_dir(self.root, recursive=True)
        self._jsonl: dict[str, list[str]] = {}  # on object stores: each JSON-lines file's lines, to rewrite it
        self._appending: set[str] = set()  # on a local disk: the JSON-lines files this process appends to

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def local_path(self, name: str) -> str | None:
        """The file's path on this machine, or None when the run lives on remote storage."""
        return self.path(name) if isinstance(self.fs, pafs.LocalFileSystem) else None

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self.path(name)).type != pafs.FileType.NotFound

    def list_dir(self, name: str) -> list[str]:
        """Names directly under `name` (empty when it does not exist)."""
        selector = pafs.FileSelector(self.path(name), allow_not_found=True)
        return sorted(info.base_name for info in self.fs.get_file_info(selector))

    def delete_dir(self, name: str) -> None:
        self.fs.delete_dir(self.path(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        final = self.path(name)
        parent = final.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
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
        os.makedirs(os.path.dirname(local), exist_ok=True)
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
            writer(tmp)
            self.write_bytes(name, Path(tmp).read_bytes())
