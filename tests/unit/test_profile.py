"""The machine profile `rlhf up` applies: only to variables the user left unset, nothing with
`--profile none`, every value applied named at start-up, every variable a real setting that
parses, and detection that agrees with what this machine reports."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rlhf import profile as prof
from rlhf.cli import build_parser, settings_classes
from rlhf.profile import FEEDBACK, LEARNING, THREAD_VARS, Machine, profile_for, resolve

SETTINGS = settings_classes()
# the values of the documented win-rate runs (docs/results.md §3) on this 2-core bf16 CPU
TUNED_2_CORES_BF16 = {
    "RLHF_DTYPE": "bfloat16",
    "RLHF_LEARNER_MIXED_PRECISION": "bf16",
    "RLHF_TORCH_THREADS": "1",
    "RLHF_LEARNER_TORCH_THREADS": "1",
    "RLHF_REWARD_TORCH_THREADS": "1",
    "RLHF_REFERENCE_TORCH_THREADS": "1",
    "RLHF_ROLLOUT_CONCURRENCY": "4",
    "RLHF_LEARNER_PPO_EPOCHS": "2",
    "RLHF_LEARNER_LR": "3e-4",
    "RLHF_REWARD_PUBLISH_EVERY_STEPS": "5",
    "RLHF_REWARD_LR": "1e-4",
}


def test_two_bf16_cores_get_the_tuned_settings_of_the_win_rate_runs():
    p = profile_for(Machine(cores=2, cpu_bf16=True, cuda=False))
    assert p.name == "cpu-bf16"
    assert p.env == TUNED_2_CORES_BF16


@pytest.mark.parametrize(
    ("machine", "name", "dtype", "mixed"),
    [
        (Machine(cores=8, cpu_bf16=False, cuda=False), "cpu-fp32", "float32", "no"),
        # no GPU here: these two describe one (a dataclass, no torch involved)
        (Machine(cores=8, cpu_bf16=True, cuda=True, cuda_bf16=True), "cuda-bf16", "bfloat16", "bf16"),
        (Machine(cores=8, cpu_bf16=False, cuda=True, cuda_bf16=False), "cuda-fp16", "float16", "no"),
    ],
)
def test_precision_follows_the_hardware(machine, name, dtype, mixed):
    p = profile_for(machine)
    assert (p.name, p.env["RLHF_DTYPE"], p.env["RLHF_LEARNER_MIXED_PRECISION"]) == (name, dtype, mixed)
    assert {k: p.env[k] for k in LEARNING} == LEARNING  # the learning settings do not depend on it


@pytest.mark.parametrize(("cores", "threads"), [(1, 1), (2, 1), (4, 1), (8, 2), (17, 4), (64, 16)])
def test_threads_split_the_cores_over_the_four_torch_services(cores, threads):
    env = profile_for(Machine(cores=cores, cpu_bf16=True, cuda=False)).env
    assert {env[v] for v in THREAD_VARS} == {str(threads)}


def test_detection_agrees_with_what_this_machine_reports():
    machine = prof.detect()
    cores = len(os.sched_getaffinity(0))
    assert 1 <= machine.cores <= cores
    flags = next(
        (
            line.split(":", 1)[1].split()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if ":" in line and line.split(":", 1)[0].strip() in ("flags", "Features")
        ),
        [],
    )
    assert machine.cpu_bf16 == bool({"amx_bf16", "avx512_bf16", "bf16"} & set(flags))
    import torch

    assert machine.cuda == torch.cuda.is_available()
    env = profile_for(machine).env
    assert env["RLHF_TORCH_THREADS"] == str(max(1, machine.cores // 4))
    if machine.cpu_bf16 and not machine.cuda:
        assert env["RLHF_DTYPE"] == "bfloat16"
    if machine.cores == 2 and machine.cpu_bf16 and not machine.cuda:  # this 2-core Sapphire Rapids
        assert env == TUNED_2_CORES_BF16


@pytest.mark.parametrize(
    ("cpuinfo", "bf16"),
    [
        ("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile\n", True),
        ("flags\t\t: fpu sse2 avx2 amx_bf16\n", True),
        ("flags\t\t: fpu sse2 avx2 avx512f avx512bw\n", False),  # AVX512 alone: torch emulates bf16
        ("Features\t: fp asimd sve bf16 i8mm\n", True),  # Arm, e.g. Graviton3
        ("Features\t: fp asimd\n", False),
        ("", False),
    ],
)
def test_bf16_is_read_from_the_cpu_flags(cpuinfo, bf16):
    assert prof.cpu_has_bf16(cpuinfo) is bf16


def test_the_profile_fills_only_what_the_user_left_unset():
    p = profile_for(Machine(cores=2, cpu_bf16=True, cuda=False))
    environ = {"RLHF_LEARNER_LR": "1e-3", "rlhf_dtype": "float32", "RLHF_HOME": "/x", "PATH": "/bin"}
    applied, kept = p.split(environ)
    assert kept == {"RLHF_DTYPE": "float32", "RLHF_LEARNER_LR": "1e-3"}  # names match case-insensitively
    assert applied == {k: v for k, v in p.env.items() if k not in kept}
    # what the services get: the launcher lays rlhf up's env over os.environ, so the profile must
    # never carry a variable the user exported
    children = {**environ, **applied}
    assert children["RLHF_LEARNER_LR"] == "1e-3" and children["rlhf_dtype"] == "float32"
    assert "RLHF_DTYPE" not in children and children["RLHF_LEARNER_PPO_EPOCHS"] == "2"


def test_profile_none_applies_nothing_and_says_so():
    p = resolve("none")
    assert p.split({}) == ({}, {})
    (line,) = p.startup_lines({}, {})
    assert line.startswith("profile none")
    assert build_parser().parse_args(["up", "--profile", "none"]).profile == "none"
    assert build_parser().parse_args(["up"]).profile == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["up", "--profile", "fast"])
    with pytest.raises(ValueError, match="--profile must be one of auto, feedback, none"):
        resolve("fast")


def test_the_start_up_lines_name_every_value_applied_and_every_one_kept():
    p = profile_for(Machine(cores=2, cpu_bf16=True, cuda=False))
    applied, kept = p.split({"RLHF_REWARD_LR": "5e-5"})
    first, second = p.startup_lines(applied, kept)
    assert first.startswith("profile cpu-bf16 (2 cores, bf16 on the CPU, no GPU): ")
    for k, v in applied.items():
        assert f" {k}={v} " in first
    assert "RLHF_REWARD_LR" not in first and "--profile none" in first
    assert second == "profile: kept as exported: RLHF_REWARD_LR=5e-5"
    (only,) = p.startup_lines(*p.split({}))  # nothing exported: one line
    assert all(f"{k}={v}" in only for k, v in p.env.items())


def _profile_vars() -> dict[str, str]:
    every: dict[str, str] = {}
    for machine in (Machine(2, True, False), Machine(2, False, False), Machine(8, True, True, True)):
        every.update(profile_for(machine).env)
    return {**every, **FEEDBACK}


def test_every_profile_variable_is_a_setting_and_its_value_parses(monkeypatch):
    env = _profile_vars()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    read: set[str] = set()
    for cls in SETTINGS.values():
        s = cls()
        for name in cls.model_fields:
            var = f"RLHF_{name.upper()}"
            if var in env:
                read.add(var)
                assert str(getattr(s, name)) == str(type(getattr(s, name))(env[var])), var
    assert read == set(env), f"not a setting of any service: {set(env) - read}"


def test_no_profile_variable_has_an_old_name_the_user_could_have_exported_instead():
    # a renamed setting is read from RLHF_<OLD> only while RLHF_<NEW> is unset, so the profile
    # setting RLHF_<NEW> would silently override a user's RLHF_<OLD>
    # unless the profile knows the old name and leaves the variable alone when it is exported
    renamed = {
        f"RLHF_{new.upper()}": f"RLHF_{old.upper()}" for cls in SETTINGS.values() for old, new in cls.renamed.items()
    }
    assert {k: renamed[k] for k in set(renamed) & set(_profile_vars())} == prof.OLD_NAMES
    p = resolve("feedback")
    applied, kept = p.split({"RLHF_SAMPLES_PER_PROMPT": "2"})
    assert kept == {"RLHF_SAMPLES_PER_PROMPT": "2"} and "RLHF_ROLLOUT_SAMPLES_PER_PROMPT" not in applied


def test_a_win_rate_run_records_what_the_profile_gave_its_stack(monkeypatch):
    """config.json of `rlhf experiment win-rate --objective` lists the profile's values (an
    exported one as exported), not only this process's environment."""
    from rlhf.experiments.live import profile_of, stack_settings
    from rlhf.profile import resolve

    monkeypatch.setenv("RLHF_LEARNER_LR", "1e-3")
    applied, _ = resolve("auto").split(os.environ)
    recorded = stack_settings(profile_of(["--timeout", "900"]))
    assert recorded["RLHF_LEARNER_LR"] == "1e-3"
    assert applied and all(recorded[k] == v for k, v in applied.items())
    assert profile_of(["--profile=none"]) == profile_of(["--profile", "none"]) == "none"
    assert "RLHF_LEARNER_PPO_EPOCHS" not in stack_settings("none") or "RLHF_LEARNER_PPO_EPOCHS" in os.environ


def test_profile_feedback_is_auto_plus_the_users_feedback_setting_and_exports_still_win():
    auto, feedback = resolve("auto"), resolve("feedback")
    assert feedback.name == f"{auto.name}+feedback" and feedback.machine == auto.machine
    assert feedback.env == {**auto.env, **FEEDBACK}
    # runs 10-12 of docs/results.md §4: the values they exported
    assert FEEDBACK["RLHF_LEARNER_OBJECTIVE"] == "grpo" and FEEDBACK["RLHF_LEARNER_USER_FEEDBACK"] == "both"
    assert set(FEEDBACK).isdisjoint(LEARNING)
    applied, kept = feedback.split({"RLHF_LEARNER_OBJECTIVE": "ppo"})
    assert kept == {"RLHF_LEARNER_OBJECTIVE": "ppo"} and "RLHF_LEARNER_OBJECTIVE" not in applied
    assert build_parser().parse_args(["up", "--profile", "feedback"]).profile == "feedback"


def test_profile_feedback_gives_the_learner_and_gateway_a_configuration_they_accept(monkeypatch):
    """The settings validate across fields (a batch of whole prompt groups, feedback-alone steps
    need user_feedback): the profile's values together must pass, not only one by one."""
    for k, v in resolve("feedback").env.items():
        monkeypatch.setenv(k, v)
    for cls in SETTINGS.values():
        cls()
