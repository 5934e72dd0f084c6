import os

import pytest

from rlhf.durability import append_jsonl, atomic_file, atomic_folder, read_jsonl, write_atomic, write_jsonl_atomic


def test_an_atomic_file_is_all_new_or_all_old(tmp_path):
    path = tmp_path / "state.json"
    write_atomic(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as f:
            f.write("half of the new")
            raise RuntimeError("crash mid-write")
    assert path.read_text() == "old"
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary left


def test_an_atomic_folder_replaces_the_old_one_whole(tmp_path):
    final = tmp_path / "v000001"
    with pytest.raises(RuntimeError):
        with atomic_folder(final, prefix=".v000001-") as tmp:
            assert tmp.name.startswith(".v000001-")
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []
    with atomic_folder(final) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a").write_text("1")
    with atomic_folder(final) as tmp:
        (tmp / "b").write_text("2")
    assert [p.name for p in final.iterdir()] == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["v000001"]


def test_json_lines_skip_a_torn_line_and_rewrite_atomically(tmp_path):
    path = tmp_path / "log.jsonl"
    assert read_jsonl(path) == []
    append_jsonl(path, {"a": 1})
    append_jsonl(path, {"a": 2})
    with open(path, "a") as f:
        f.write('{"a": 3, "cut')  # killed mid-append
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    write_jsonl_atomic(path, [{"a": 1}])
    assert path.read_text() == '{"a": 1}\n'


def test_a_pid_lock_refuses_a_second_holder_naming_the_first_and_frees_on_release(tmp_path):
    from rlhf.durability import StateLocked, writer_lock
    from rlhf.preflight import PreflightError, StateDirLock

    with StateDirLock(tmp_path):
        with pytest.raises(PreflightError, match=f"in use by another rlhf up \\(pid {os.getpid()}"):
            StateDirLock(tmp_path).__enter__()
    with StateDirLock(tmp_path):  # released: the next run takes it
        pass
    with writer_lock(tmp_path / "learner" / "writer.lock", "learner"):
        with pytest.raises(StateLocked, match="written by another learner"):
            writer_lock(tmp_path / "learner" / "writer.lock", "learner").acquire()
