"""Where files may go, checked before anything is written: a local directory that can hold a run (not a file,
not read-only, not a kernel's pseudo filesystem, with room for what the run writes), or a remote URI that
answers its first request within `FIRST_CONTACT_S` seconds.

Remote filesystems retry for minutes by default (an unreachable s3:// endpoint 100 s, gs:// without
credentials 150 s): the first request goes through a copy of the filesystem with short retries, so a URI that
cannot answer fails in seconds with one line naming the scheme, the location and what is likely missing.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import threading
from typing import Any

import pyarrow.fs as pafs

from hsic_ray.errors import OutputLocationError, StorageError

FIRST_CONTACT_S = 15
# Filesystems that hold no files of their own: the kernel's views of processes, devices and settings.
PSEUDO_FILESYSTEMS = {
    "proc",
    "sysfs",
    "devtmpfs",
    "devpts",
    "cgroup",
    "cgroup2",
    "debugfs",
    "tracefs",
    "securityfs",
    "configfs",
    "pstore",
    "bpf",
    "mqueue",
    "fusectl",
    "binfmt_misc",
    "autofs",
    "efivarfs",
}
_PSEUDO_ROOTS = ("/proc", "/sys", "/dev")  # and everything under them, but for /dev/shm
_HINTS = {
    "s3": "AWS credentials (AWS_ACCESS_KEY_ID or ~/.aws/credentials), the bucket and its region, or network access "
    "to the endpoint",
    "gs": "Google Cloud credentials (GOOGLE_APPLICATION_CREDENTIALS or gcloud auth application-default login), "
    "the bucket, or network access",
    "gcs": "Google Cloud credentials (GOOGLE_APPLICATION_CREDENTIALS or gcloud auth application-default login), "
    "the bucket, or network access",
    "hdfs": "the namenode's address, a Hadoop client (HADOOP_HOME, CLASSPATH) or network access",
}


def has_scheme(uri: str) -> bool:
    return "://" in uri


def resolve_location(uri: str) -> str:
    """A URI as it is; a local path made absolute, so that other processes (stage actors, with other
    working directories) find it too."""
    return uri if has_scheme(uri) else os.path.abspath(os.path.expanduser(uri))


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
    if has_scheme(uri):
        fs, root, _ = open_location(uri, "--output", OutputLocationError)
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


def _existing_ancestor(path: str) -> str:
    path = os.path.abspath(path)  # a relative path's dirname ends at "", which never exists
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _filesystem_type(path: str) -> str | None:
    """The type of the filesystem mounted over `path` (None where /proc/self/mounts cannot be read)."""
    try:
        with open("/proc/self/mounts") as mounts:
            entries = [line.split()[1:3] for line in mounts if len(line.split()) >= 3]
    except OSError:
        return None
    best, kind = "", None
    for point, fstype in entries:
        point = point.replace("\\040", " ")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fstype
    return kind


def _pseudo_filesystem(path: str) -> str | None:
    """What makes `path` a place of the kernel's rather than a disk's ("proc at /proc"), or None."""
    real = os.path.realpath(path)
    kind = _filesystem_type(real)
    if kind in PSEUDO_FILESYSTEMS:
        return f"on a {kind} filesystem"
    under = lambda root: real == root or real.startswith(root + "/")  # noqa: E731
    root = next((root for root in _PSEUDO_ROOTS if under(root)), None)
    return None if root is None or under("/dev/shm") else f"under {root}"


def _check_local_directory(path: str, uri: str) -> None:
    existing = _existing_ancestor(path)
    pseudo = _pseudo_filesystem(existing)
    if pseudo is not None:
        raise OutputLocationError(
            f"--output {uri} is {pseudo} (the kernel's view of the system), which cannot hold a run; "
            "choose a directory on a disk"
        )
    if not os.path.isdir(existing):
        where = "is a file" if existing == path else f"is under {existing}, which is a file"
        raise OutputLocationError(f"--output {uri} {where}; give a directory path")
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        raise OutputLocationError(f"--output {uri} is on a read-only filesystem ({existing}); choose another --output")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputLocationError(
            f"--output {uri} cannot be written ({existing} is not writable); choose another --output"
        )


def check_free_space(location: str, need: int, what: str) -> None:
    """Refuse a local `location` whose disk has less than `need` bytes free; remote stores are not measured."""
    if has_scheme(location):
        return
    free = shutil.disk_usage(_existing_ancestor(location)).free
    if free < need:
        raise StorageError(
            f"--output {location} needs about {_megabytes(need)} for {what} and its disk has {_megabytes(free)} "
            "free; free some space or choose another --output"
        )


def _megabytes(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"


def _bounded(fs: pafs.FileSystem) -> pafs.FileSystem:
    """A copy of a remote filesystem whose requests give up within about FIRST_CONTACT_S seconds."""
    if isinstance(fs, pafs.S3FileSystem):
        changes: dict[str, Any] = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=2)}
        timeout = {"connect_timeout": 5.0}
    elif isinstance(fs, pafs.GcsFileSystem):
        changes, timeout = {"retry_time_limit": datetime.timedelta(seconds=FIRST_CONTACT_S // 2)}, {}
    else:
        return fs  # local, or a scheme without timeout options: `_first_request`'s own limit holds
    rebuild, (options, *rest) = fs.__reduce__()[:2]
    options = {**options, **changes}
    for key, value in timeout.items():
        if options.get(key, -1) < 0:  # not set by the URI
            options[key] = value
    return rebuild(options, *rest)


def _first_request(fs: pafs.FileSystem, path: str) -> pafs.FileInfo:
    """fs.get_file_info(path), given up after FIRST_CONTACT_S (a scheme without timeouts of its own)."""
    outcome: dict[str, Any] = {}

    def ask() -> None:
        try:
            outcome["info"] = fs.get_file_info(path)
        except Exception as exc:  # reported by the caller, in the caller's thread
            outcome["error"] = exc

    asker = threading.Thread(target=ask, name="first-contact", daemon=True)
    asker.start()
    asker.join(FIRST_CONTACT_S)
    if asker.is_alive():
        raise TimeoutError(f"no answer within {FIRST_CONTACT_S} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["info"]


def _likely_missing(scheme: str, text: str) -> str:
    low = text.lower()
    if any(word in low for word in ("credential", "access token", "accessdenied", "access denied", "403", "signature")):
        return "credentials (or their permissions on this location)"
    if any(word in low for word in ("nosuchbucket", "bucket does not exist", "404")):
        return "the bucket (it does not exist, or is in another region or project)"
    return _HINTS.get(scheme, "network access to it, or the credentials it needs")


def open_location(uri: str, what: str, error: type[Exception]) -> tuple[pafs.FileSystem, str, pafs.FileInfo]:
    """(filesystem, path, what is there) for a local path or URI, after a first request bounded in time.

    `what` names the location in the error (e.g. "--output"), raised as `error` with one line.
    """
    location = resolve_location(uri)
    try:
        fs, path = pafs.FileSystem.from_uri(location)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for unknown or unreachable URIs
        raise error(
            f"{what} {uri} cannot be used ({type(exc).__name__}: {_first_line(exc)}); give a local path or a "
            "reachable URI of a scheme pyarrow knows (s3://, gs://, hdfs://, file://)"
        ) from None
    try:
        return fs, path, _first_request(_bounded(fs), path)
    except Exception as exc:
        scheme = location.split("://", 1)[0] if has_scheme(location) else "file"
        raise error(
            f"{what} {uri} cannot be reached over {scheme}:// ({type(exc).__name__}: {_first_line(exc)[:200]}); "
            f"check {_likely_missing(scheme, str(exc))}"
        ) from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]
