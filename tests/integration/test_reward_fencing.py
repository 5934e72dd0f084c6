"""One reward trainer per state dir: a second reward service started on the state another one
writes exits 1 at start, naming the holder, and the holder keeps serving; once the holder is
SIGKILLed (the kernel drops its flock) a new one starts on the same state."""

from __future__ import annotations

import os
import signal

import pytest

from rlhf.durability import StateLocked, writer_lock
from tests.procs import ServiceProcess, free_port, run_service


def test_a_second_writer_lock_on_one_path_is_refused_naming_the_holder(tmp_path):
    path = tmp_path / "reward" / "writer.lock"
    with writer_lock(path, "reward trainer"):
        with pytest.raises(StateLocked, match=f"another reward trainer \\(pid {os.getpid()}"):
            writer_lock(path, "reward trainer").acquire()
    with writer_lock(path, "reward trainer"):  # released: the next holder takes it
        pass


@pytest.mark.slow
def test_a_second_reward_trainer_on_the_same_state_dir_exits_1(broker, topics, tmp_path):
    env = {
        "RLHF_KAFKA_BOOTSTRAP": broker.bootstrap,
        "RLHF_TOPIC_PREFIX": topics.prefix,
        "RLHF_REWARD_BACKBONE": "tiny",
        "RLHF_REWARD_TORCH_THREADS": "1",
    }
    with run_service("reward", tmp_path, env=env) as first:
        again = {**first.env, "RLHF_PORT": str(free_port()), "RLHF_METRICS_PORT": str(free_port())}
        second = ServiceProcess("reward", again, tmp_path / "second.log", int(again["RLHF_PORT"]), 0).start()
        assert second.proc.wait(120) == 1, second.log()
        assert "is written by another reward trainer" in second.log() and str(first.proc.pid) in second.log()
        assert first.status() == "SERVING"  # the holder is untouched
        first.stop(signal.SIGKILL)
        third = ServiceProcess("reward", again, tmp_path / "third.log", int(again["RLHF_PORT"]), 0).start()
        try:
            third.wait_serving(180)
        finally:
            third.stop(signal.SIGTERM)
