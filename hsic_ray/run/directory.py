"""A run's output directory, on a local path or any pyarrow filesystem URI (shared storage on a cluster).

Every file is written whole to a temporary name and then moved into place, so a crash mid-write leaves
either the previous version or the new one, never a torn file. Nothing is created until the first write,
and `check_location` says before then whether a location can hold a run at all.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from hsic_ray.errors import OutputLocationError


def _has_scheme(uri: str) -> bool:
    return "://" in uri


def resolve_location(uri: str) -> str:
    """A URI as it is; a local path made absolute, so that other processes (stage actors, with other
    working directories) find it too."""
    return uri if _has_scheme(uri) else os.path.abspath(os.path.expanduser(uri))


def _in_ray_job_working_dir() -> bool:
    """Whether this process is a `ray job submit` entrypoint running in Ray's temporary copy of its
    working dir (deleted with the Ray session)."""
    config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}") or "{}")
    return bool((config.get("runtime_env") or {}).get("working_dir"))


def check_location(uri: str) -> str:
    """The absolute location of `uri` if a run can be written there; writes nothing.

    Raises OutputLocationError naming the problem and the fix.
    """
    if not uri or not uri.strip():
        raise OutputLocationError("--output is empty: give a directory path or a URI such as s3://bucket/runs/a")
    if _has_scheme(uri):
        try:
            fs, root = pafs.FileSystem.from_uri(uri)
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for unknown or unreachable URIs
            raise OutputLocationError(
                f"--output {uri} cannot be used ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                "give a local path or a reachable URI of a scheme pyarrow knows (s3://, gs://, hdfs://, file://)"
            ) from None
        if isinstance(fs, pafs.LocalFileSystem):
            _check_local_directory(root, uri)
        return uri
    if not os.path.isabs(os.path.expanduser(uri)) and _in_ray_job_working_dir():
        raise OutputLocationError(
            f"--output {uri} is relative, and this Ray job runs in Ray's temporary copy of its working dir, "
            'which is deleted with the Ray session; give an absolute path (e.g. --output "$PWD/runs/a") or a URI'
        )
    path = resolve_location(uri)
    _check_local_directory(path, uri)
    return path


def _check_local_directory(path: str, uri: str) -> None:
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "is a file" if existing == path else f"is under {existing}, which is a file"
        raise OutputLocationError(f"--output {uri} {where}; give a directory path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputLocationError(
            f"--output {uri} cannot be written ({existing} is not writable); choose another --output"
        )


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
        self.fs.delete_dir(self.path(name))

    def move(self, name: str, new_name: str) -> None:
        self.fs.move(self.path(name), self.path(new_name))

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
