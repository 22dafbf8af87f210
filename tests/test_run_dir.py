"""Run directories: JSON-lines records appended on a local disk, torn lines survived."""

import os

from hsic_ray.run.directory import RunDirectory


def test_local_records_are_appended_not_rewritten(tmp_path):
    run = RunDirectory(str(tmp_path / "run"))
    run.append_jsonl("metrics.jsonl", {"step": 1})
    inode = os.stat(tmp_path / "run" / "metrics.jsonl").st_ino
    for step in range(2, 6):
        run.append_jsonl("metrics.jsonl", {"step": step})
    assert os.stat(tmp_path / "run" / "metrics.jsonl").st_ino == inode  # the same file, grown in place
    assert [r["step"] for r in run.read_jsonl("metrics.jsonl")] == [1, 2, 3, 4, 5]
    # Another process continuing the run (a resume) appends after what is there.
    assert [r["step"] for r in RunDirectory(str(tmp_path / "run")).read_jsonl("metrics.jsonl")] == [1, 2, 3, 4, 5]


def test_a_line_torn_by_a_crash_is_skipped_and_the_next_record_starts_its_own_line(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    path.parent.mkdir()
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')  # the process died mid-write
    run = RunDirectory(str(tmp_path / "run"))
    assert run.read_jsonl("metrics.jsonl") == [{"step": 1}, {"step": 2}]
    run.append_jsonl("metrics.jsonl", {"step": 3})
    run.append_jsonl("metrics.jsonl", {"step": 4})
    assert run.read_jsonl("metrics.jsonl") == [{"step": 1}, {"step": 2}, {"step": 3}, {"step": 4}]
    assert path.read_text().splitlines()[2] == '{"st'


def test_on_an_object_store_each_record_rewrites_the_file_whole():
    run = RunDirectory("mock:///runs/a")  # pyarrow's in-memory filesystem stands in for a bucket
    assert run.local_path("metrics.jsonl") is None
    for step in range(1, 4):
        run.append_jsonl("metrics.jsonl", {"step": step})
    assert run.read_jsonl("metrics.jsonl") == [{"step": 1}, {"step": 2}, {"step": 3}]
