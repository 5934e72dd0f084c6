"""The machine profile: the environment defaults `rlhf up` gives its services, in one place.

The settings' own defaults are the plain, safe ones (fp32, torch's threads, conservative
PPO/RM steps). On a CPU that runs the six services at once they learn slowly: measured with
the 135M chat model on 2 cores (docs/results.md §3), bf16 decodes ~1.9× and trains ~2× faster
than fp32 where the CPU has bf16 instructions, and one torch thread per service lets the
generator and the learner overlap instead of thrashing. So `rlhf up` detects the machine once
(usable cores, bf16 on the CPU, a GPU torch can use) and sets, for every variable the user
has NOT exported, the values below. An exported variable always wins; `rlhf up --profile
none` applies nothing.

  machine   RLHF_DTYPE, RLHF_LEARNER_MIXED_PRECISION    bf16 where the hardware has it
            RLHF_*TORCH_THREADS                         the cores split over the 4 torch services
  learning  rollout concurrency, PPO epochs, learner LR, RM publish-every and LR: the settings
            of the documented win-rate runs, which reached 0.79–0.86 in 17–20 minutes there

`--profile feedback` adds FEEDBACK below (GRPO + best-of-n with the users' own feedback in
the policy), the fastest setting measured on the rare-preference oracles and on concise.

    machine = detect()                   # Machine(cores=2, cpu_bf16=True, cuda=False, ...)
    profile = profile_for(machine)       # Profile("cpu-bf16", ..., env={...})
    applied, kept = profile.split(os.environ)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

CHOICES = ("auto", "feedback", "none")

# the four services that run torch models, each with its own intra-op thread setting
THREAD_VARS = (
    "RLHF_TORCH_THREADS",  # generator (transformers backend)
    "RLHF_LEARNER_TORCH_THREADS",
    "RLHF_REWARD_TORCH_THREADS",
    "RLHF_REFERENCE_TORCH_THREADS",
)

# What the loop learns fastest with, whatever the machine (the tuned win-rate runs,
# scripts/win-rate-135m.sh). Rollouts keep the setting's own default of ≤ 64 tokens.
LEARNING = {
    # 4 prompt groups × 4 answers in flight: one learner batch (16 rollouts) per round
    "RLHF_ROLLOUT_CONCURRENCY": "4",
    # 2 passes over each batch instead of 4: half the learner's time per version, on a CPU
    # where one PPO step of 16 rollouts already takes 21–31 s
    "RLHF_LEARNER_PPO_EPOCHS": "2",
    # the LoRA adapter (r=8, the default finetune) at 3e-4, three times the setting's default
    "RLHF_LEARNER_LR": "3e-4",
    # the RM: a new version every 5 training steps (80 comparisons) instead of 20, at 5× the
    # setting's learning rate, so rollouts are scored by an RM that has seen recent feedback
    "RLHF_REWARD_PUBLISH_EVERY_STEPS": "5",
    "RLHF_REWARD_LR": "1e-4",
}

# `--profile feedback`: `auto` plus the setting that learned fastest from the simulated users
# on every oracle it was measured on (docs/results.md §4, runs 10–12): GRPO over 8 samples a
# prompt with best-of-n distillation, the users' own comparisons and thumbs-up in the policy
# (weight 0.25, ≤ 8 a step, steps on them alone before the first rollout batch), and compare
# mode showing the RM's most-apart pair of 4 samples. Not yet `auto`'s: its rloo/online_dpo
# rows and `prefers_question_ending` are not measured, and on the concise oracle it reached
# 0.7 at 9.5 loop minutes, not the 8 the issue asks.
FEEDBACK = {
    "RLHF_LEARNER_OBJECTIVE": "grpo",
    "RLHF_LEARNER_DISTILL": "best_of_n",
    "RLHF_ROLLOUT_SAMPLES_PER_PROMPT": "8",
    "RLHF_LEARNER_BATCH_SIZE": "32",
    "RLHF_LEARNER_KL_TARGET": "2",
    "RLHF_LEARNER_USER_FEEDBACK": "both",
    "RLHF_LEARNER_USER_FEEDBACK_ALONE": "true",
    "RLHF_LEARNER_USER_FEEDBACK_MAX_PER_STEP": "8",
    "RLHF_LEARNER_USER_FEEDBACK_COEF": "0.25",
    "RLHF_COMPARE_CANDIDATES": "4",
    "RLHF_COMPARE_SELECTION": "rm_extremes",
}

# a profile variable whose setting was renamed: the user may still export the old name (the
# setting reads it while the new one is unset), so the profile must leave such a variable alone
OLD_NAMES = {"RLHF_ROLLOUT_SAMPLES_PER_PROMPT": "RLHF_SAMPLES_PER_PROMPT"}


@dataclass(frozen=True)
class Machine:
    """What the services will find: usable cores, bf16 instructions on the CPU, a GPU torch
    can use (and whether it does bf16)."""

    cores: int
    cpu_bf16: bool
    cuda: bool
    cuda_bf16: bool = False

    def describe(self) -> str:
        gpu = ("a GPU with bf16" if self.cuda_bf16 else "a GPU without bf16") if self.cuda else "no GPU"
        cores = f"{self.cores} core" + ("s" if self.cores != 1 else "")
        return f"{cores}, {'bf16' if self.cpu_bf16 else 'no bf16'} on the CPU, {gpu}"


@dataclass(frozen=True)
class Profile:
    """A name and the environment defaults it gives, in the order they are printed."""

    name: str
    env: dict[str, str] = field(default_factory=dict)
    machine: Machine | None = None

    def split(self, environ) -> tuple[dict[str, str], dict[str, str]]:
        """(applied, kept): the profile's values for the variables `environ` leaves unset,
        and the user's own value of each variable the profile would have set. Environment
        names are matched case-insensitively, as the settings read them."""
        given = {k.upper(): v for k, v in environ.items()}
        exported = {k: k if k in given else OLD_NAMES.get(k) for k in self.env}
        kept = {name: given[name] for name in exported.values() if name in given}
        applied = {k: v for k, v in self.env.items() if exported[k] not in given}
        return applied, kept

    def startup_lines(self, applied: dict[str, str], kept: dict[str, str]) -> list[str]:
        """What `rlhf up` prints at start: every value applied, and the exported ones kept."""
        if not self.env:
            return ["profile none: every setting at its own default (`rlhf config` lists them)"]
        values = " ".join(f"{k}={v}" for k, v in applied.items()) or "nothing (all exported)"
        where = f" ({self.machine.describe()})" if self.machine else ""
        hint = "(override any by exporting it; --profile none for the plain defaults)"
        lines = [f"profile {self.name}{where}: {values} {hint}"]
        if kept:
            lines.append("profile: kept as exported: " + " ".join(f"{k}={v}" for k, v in kept.items()))
        return lines


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota (a
    container's `--cpus`), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """bf16 arithmetic in hardware: AMX-BF16 or AVX512-BF16 on x86, the BF16 extension on
    Arm (`bf16` in /proc/cpuinfo's Features). Without it torch emulates bf16, slower than fp32."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags = set(value.split())
            return bool(flags & {"amx_bf16", "avx512_bf16", "bf16"})
    return False


def detect() -> Machine:
    """This machine, as the services will see it: the GPU question is torch's (a CUDA GPU
    with the CPU torch wheel that `make` installs still runs everything on the CPU)."""
    import torch

    cuda = torch.cuda.is_available()
    return Machine(
        cores=usable_cores(),
        cpu_bf16=cpu_has_bf16(),
        cuda=cuda,
        cuda_bf16=bool(cuda and torch.cuda.is_bf16_supported()),
    )


def threads_per_service(cores: int) -> int:
    """The cores split evenly over the four torch services, at least one each. Measured on
    2 cores (1 each: generator and learner overlap); above that it is the even split."""
    return max(1, cores // len(THREAD_VARS))


def profile_for(machine: Machine) -> Profile:
    """The defaults for `machine`: precision from its hardware, threads from its cores, then
    the learning settings."""
    if machine.cuda:
        # the GPU runs the models (vLLM for generation); fp16 where bf16 is missing
        name = "cuda-bf16" if machine.cuda_bf16 else "cuda-fp16"
        precision = {
            "RLHF_DTYPE": "bfloat16" if machine.cuda_bf16 else "float16",
            "RLHF_LEARNER_MIXED_PRECISION": "bf16" if machine.cuda_bf16 else "no",
        }
    elif machine.cpu_bf16:
        # the learner keeps fp32 master weights under bf16 autocast and recomputes π_old in its
        # own precision, so its PPO ratios stay exact against bf16-sampled rollouts
        name = "cpu-bf16"
        precision = {"RLHF_DTYPE": "bfloat16", "RLHF_LEARNER_MIXED_PRECISION": "bf16"}
    else:
        name = "cpu-fp32"
        precision = {"RLHF_DTYPE": "float32", "RLHF_LEARNER_MIXED_PRECISION": "no"}
    threads = str(threads_per_service(machine.cores))
    return Profile(name, {**precision, **dict.fromkeys(THREAD_VARS, threads), **LEARNING}, machine)


def resolve(choice: str) -> Profile:
    """`--profile auto` (this machine's), `feedback` (auto plus FEEDBACK) or `none` (nothing
    applied)."""
    if choice == "none":
        return Profile("none")
    if choice == "auto":
        return profile_for(detect())
    if choice == "feedback":
        auto = profile_for(detect())
        return Profile(f"{auto.name}+feedback", {**auto.env, **FEEDBACK}, auto.machine)
    raise ValueError(f"--profile must be one of {', '.join(CHOICES)}, not {choice!r}")
