"""Full disks, unwritable places and remote locations that never answer: each stops a job with one line
(exit 2) before or during its writes, leaves no `.tmp-*` file and keeps every complete file byte for byte.

The disks are real: tmpfs mounts of a few MB (root can mount here), one remounted read-only; the remote is a
local TCP server that accepts and never answers, used as an s3:// endpoint (nothing outside is contacted)."""

import importlib.util
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import hsic_ray
from hsic_ray.distributed.shutdown import shutdown
from hsic_ray.errors import ModelFileError, OutputLocationError, StorageError
from hsic_ray.run import checkpoint
from hsic_ray.run.directory import RunDirectory, check_location
from hsic_ray.run.location import check_free_space

REPO = Path(__file__).resolve().parents[1]


def _mount(directory: Path, size: str, read_only: bool = False) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}): needs root")
    if read_only:
        subprocess.run(["mount", "-o", "remount,ro", str(directory)], check=True)


@pytest.fixture
def mounts():
    """mount(directory, size, read_only=False): a real tmpfs there, unmounted after the test."""
    mounted: list[Path] = []

    def mount(directory: Path, size: str, read_only: bool = False) -> Path:
        _mount(directory, size, read_only)
        mounted.append(directory)
        return directory

    yield mount
    for directory in reversed(mounted):
        subprocess.run(["umount", "-l", str(directory)], check=False)


def _job_main(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def temporaries(root: Path) -> list[str]:
    return [str(p) for p in root.rglob(".tmp-*")]


def fill(disk: Path, leave: int) -> None:
    """Fill the disk up to `leave` bytes free."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    (disk / "filler").write_bytes(b"\0" * max(0, free - leave))


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert lines[0].startswith("error: ") and "Traceback" not in text
    return lines[0]


# --- a full disk during writes ---------------------------------------------------------------------------


def test_a_full_disk_mid_checkpoint_stops_with_one_error_and_keeps_the_complete_checkpoint(tmp_path, mounts):
    disk = mounts(tmp_path / "disk", "3m")
    run = RunDirectory(str(disk / "run"))
    checkpoint.save_state(run, checkpoint.stage_file(10, 0), {"w": b"\1" * 200_000})
    checkpoint.save_state(run, checkpoint.coordinator_file(10), {"step": 10})
    checkpoint.commit(run, 10, 1)
    before = snapshot(disk / "run")
    fill(disk, leave=100_000)
    with pytest.raises(StorageError) as full:
        checkpoint.save_state(run, checkpoint.stage_file(20, 0), {"w": b"\2" * 400_000})
    message = str(full.value)
    assert "the disk is full" in message and "stage-000.pt" in message and "\n" not in message
    assert temporaries(disk) == []
    after = snapshot(disk / "run")
    assert {k: v for k, v in after.items() if k in before} == before  # every complete file, byte for byte
    assert checkpoint.latest_step(run) == 10 and checkpoint.verify(run, 10)["step"] == 10


def test_a_read_only_checkpoints_directory_inside_a_writable_run_is_one_error(tmp_path, mounts):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("kept\n")
    mounts(tmp_path / "run" / "checkpoints", "1m", read_only=True)
    run = RunDirectory(str(tmp_path / "run"))
    with pytest.raises(StorageError, match=r"checkpoints/step-00000005/stage-000.pt: the filesystem is read-only"):
        checkpoint.save_state(run, checkpoint.stage_file(5, 0), {"w": 1})
    assert temporaries(tmp_path) == [] and (tmp_path / "run" / "config.yaml").read_text() == "kept\n"


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["local", "ray"])
def test_the_hsic_job_on_a_disk_that_fills_mid_run_prints_one_line_and_keeps_its_checkpoints(
    tmp_path, mounts, monkeypatch, capsys, trainer
):
    """The estimate is waved through (0 bytes) so the run starts on a disk too small for it, as one whose
    disk other programs fill meanwhile would. On Ray the stage actors write their own files: a full disk
    there reaches the driver inside Ray's task error, and is still one line."""

    import hsic_ray.resources

    main = _job_main("train_deep")
    monkeypatch.setattr(hsic_ray.resources, "storage_bytes", lambda parameters: 0)
    disk = mounts(tmp_path / "disk", "3m")
    fill(disk, leave=400_000)  # room for a checkpoint or so of the smoke test's network (about 200 kB each)
    out = disk / "run"
    argv = ["--smoke-test", "--trainer", trainer, "--output", str(out), "--max-steps", "12"]
    argv += ["--checkpoint-every", "2"]
    try:
        assert main(argv) == 2
    finally:
        shutdown()  # the Ray variant's cluster, started in this process
    line = one_line(capsys.readouterr().err)
    assert "cannot write" in line and "the disk is full" in line and str(out) in line
    assert temporaries(disk) == []
    run = RunDirectory(str(out))
    assert checkpoint.complete_steps(run)  # the disk took some checkpoints before it filled
    for step in checkpoint.complete_steps(run):
        assert checkpoint.verify(run, step)["step"] == step  # each complete checkpoint still loads


# --- a disk without room, checked before anything is written ----------------------------------------------


@pytest.mark.slow
def test_the_hsic_job_refuses_a_disk_without_room_before_writing(tmp_path, mounts):
    disk = mounts(tmp_path / "disk", "3m")
    done = subprocess.run(
        [sys.executable, "jobs/train_deep.py", "--smoke-test", "--trainer", "local", "--output", str(disk / "run")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    line = one_line(done.stderr)
    assert "needs about" in line and "MB free" in line and "3.0 MB" in line
    assert list(disk.iterdir()) == []  # nothing written


# --- places that cannot hold a run -----------------------------------------------------------------------


@pytest.mark.parametrize("place", ["/proc/hsic-run", "/sys/kernel/hsic-run", "/dev/hsic-run", "/sys/fs/cgroup/run"])
def test_kernel_pseudo_filesystems_are_refused_up_front(place):
    with pytest.raises(OutputLocationError, match="kernel's view of the system"):
        check_location(place)
    assert not os.path.exists(place)


def test_a_read_only_mount_is_refused_up_front(tmp_path, mounts):
    disk = mounts(tmp_path / "ro", "1m", read_only=True)
    with pytest.raises(OutputLocationError, match="read-only filesystem"):
        check_location(str(disk / "run"))
    assert check_location(str(tmp_path / "rw" / "run")) == str(tmp_path / "rw" / "run")


# --- prepare: the same output check, and a full disk ------------------------------------------------------


def test_prepare_refuses_a_finished_run_and_unrelated_files_writing_nothing(tmp_path, capsys):
    from hsic_ray.data import main as prepare

    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "hsic-ray-run.json").write_text('{"kind": "hsic"}')
    (finished / "metrics.json").write_text("{}")
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("precious")
    for out, expected in ((finished, "holds a hsic run"), (user, "not an hsic-ray run (thesis.tex)")):
        before = snapshot(out)
        assert prepare(["prepare", "--source", "mnist-sample", "--output", str(out)]) == 2
        assert expected in one_line(capsys.readouterr().err)
        assert snapshot(out) == before
    assert prepare(["prepare", "--source", "mnist-sample", "--output", "/proc/x"]) == 2
    assert "kernel's view" in one_line(capsys.readouterr().err)


def test_prepare_replaces_a_dataset_it_wrote_before(tmp_path, capsys):
    from hsic_ray.data import main as prepare

    out = tmp_path / "data"
    assert prepare(["prepare", "--source", "mnist-sample", "--output", str(out), "--shard-size", "4000"]) == 0
    assert prepare(["prepare", "--source", "mnist-sample", "--output", str(out), "--shard-size", "9000"]) == 0
    assert sorted(p.name for p in (out / "train").iterdir()) == ["part-00000.parquet"]


def test_prepare_on_a_full_disk_is_one_line_and_leaves_no_partial_dataset(tmp_path, mounts, capsys):
    from hsic_ray.data import main as prepare

    disk = mounts(tmp_path / "disk", "3m")
    (disk / "kept.txt").write_text("kept")
    fill(disk, leave=500_000)  # the digits' shards take about 2 MB
    assert prepare(["prepare", "--source", "mnist-sample", "--output", str(disk / "data")]) == 2
    line = one_line(capsys.readouterr().err)
    assert "the disk is full" in line and str(disk / "data") in line
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "kept.txt"]  # no partial train/, no temporaries


# --- a remote location that never answers -----------------------------------------------------------------


@pytest.fixture
def silent_endpoint():
    """host:port of a server that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


@pytest.fixture
def offline_s3(monkeypatch):
    # Credentials that look real, and no EC2 metadata lookup: the only address contacted is the endpoint's.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def _fails_fast(call) -> None:
    """`call()` returns 2 (or raises a user error) within 30 s; in this process, so that importing torch on a
    busy machine does not count."""
    started = time.monotonic()
    assert call() == 2
    assert time.monotonic() - started < 30


@pytest.mark.slow
def test_a_silent_s3_endpoint_fails_fast_with_one_line(tmp_path, silent_endpoint, offline_s3, capsys):
    from hsic_ray.data import main as prepare

    uri = f"s3://bucket/data?endpoint_override={silent_endpoint}&scheme=http"
    _fails_fast(lambda: prepare(["prepare", "--source", "mnist-sample", "--output", uri]))  # --output
    train_deep = _job_main("train_deep")
    argv = ["--smoke-test", "--trainer", "local", "--output", str(tmp_path / "run"), "--dataset", f"parquet:{uri}"]
    _fails_fast(lambda: train_deep(argv))  # a data source
    for line in capsys.readouterr().err.splitlines():
        assert line.startswith("error: ") and "s3://bucket/data" in line and "cannot be reached over s3://" in line
        assert "credentials" in line
    assert not (tmp_path / "run").exists()  # nothing written

    def load() -> int:
        with pytest.raises(
            ModelFileError, match=r"^model s3://bucket/data\?endpoint_override=\S+ cannot be reached over s3://"
        ):
            hsic_ray.load_model(uri)
        return 2

    _fails_fast(load)


def test_free_space_is_measured_on_the_nearest_existing_directory_of_a_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/ does not exist yet: a run with output null writes under it
    check_free_space("runs", 1, "its checkpoints")
    with pytest.raises(
        StorageError, match=r"--output runs/a needs about [\d,.]+ MB for its checkpoints and its disk has"
    ):
        check_free_space("runs/a", 2**60, "its checkpoints")
    assert list(tmp_path.iterdir()) == []
