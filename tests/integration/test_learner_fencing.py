"""One learner per state dir: a second learner service started on the checkpoints another one
writes exits non-zero at start, naming the holder, and trains nothing; once the first is
SIGKILLed (the kernel drops its flock) a new one starts on the same state."""

from __future__ import annotations

import os
import signal

import pytest

from rlhf.durability import StateLocked, writer_lock
from tests.integration.test_learner_crash import learner_env
from tests.procs import ServiceProcess, free_port


def test_a_second_writer_lock_on_one_path_is_refused_naming_the_holder(tmp_path):
    path = tmp_path / "learner" / "writer.lock"
    with writer_lock(path, "learner"):
        with pytest.raises(StateLocked, match=f"another learner \\(pid {os.getpid()}"):
            writer_lock(path, "learner").acquire()
    with writer_lock(path, "learner"):  # released: the next holder takes it
        pass


@pytest.mark.slow
def test_a_second_learner_on_the_same_state_dir_fails_fast(broker, topics, tiny_model_dir, tmp_path):
    state_dir = tmp_path / "state"
    env = learner_env(broker, topics, tiny_model_dir, state_dir)
    first = ServiceProcess("learner", env, tmp_path / "first.log", int(env["RLHF_PORT"]), 0).start()
    try:
        first.wait_serving(240)
        env2 = {**env, "RLHF_PORT": str(free_port())}
        second = ServiceProcess("learner", env2, tmp_path / "second.log", int(env2["RLHF_PORT"]), 0).start()
        assert second.proc.wait(120) != 0, second.log()
        assert "is written by another learner" in second.log() and str(first.proc.pid) in second.log()
        assert first.status() == "SERVING"  # the holder is untouched
    finally:
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(30)
    third = ServiceProcess("learner", env, tmp_path / "third.log", int(env["RLHF_PORT"]), 0).start()
    try:
        third.wait_serving(240)
    finally:
        third.stop(signal.SIGTERM)
