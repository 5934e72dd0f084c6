"""The rollout loop: prompt → Generate(n) → Score → LogProbs → Rollout events on Kafka.

The learner's PolicyUpdates set the budget (rollouts per version, max policy lag) and the
sampling temperature (on_policy_updates); nothing is sampled before the first one. Nor
before the reward model has trained on `min_rm_examples` feedback examples (default 32)
and serves a trained version. Then each of `concurrency` tasks repeats:

  1. backpressure: reserve room for n rollouts under the budget the learner's last
     PolicyUpdate opened (budget.py; the generator's version number does not move it)
  2. a prompt: live (rlhf.interactions) or from the prompt set (sources.py)
  3. n samples from the policy, with per-token log π_θ and the version that produced them
  4. reward-model scores of the n (prompt, response) pairs
  5. reference log-probs log π_ref of the same response tokens
  6. one Rollout event per sample, published (acknowledged) as one group

Every call has a deadline. UNAVAILABLE (a service starting or restarting) is retried with
exponential backoff; any other error drops the group, is counted, and the loop goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any, Awaitable, Callable

import grpc
import tenacity
from pydantic import BaseModel, ConfigDict, Field

from rlhf import priorities
from rlhf.bus import EventProducer, new_event
from rlhf.rollout import metrics
from rlhf.rollout.budget import PolicyBudget
from rlhf.rollout.sources import PromptItem, PromptMixer
from rlhf.v1 import (
    common_pb2,
    events_pb2,
    generation_pb2,
    generation_pb2_grpc,
    learner_pb2,
    learner_pb2_grpc,
    reference_pb2,
    reference_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
)

log = logging.getLogger(__name__)


class WorkerConfig(BaseModel):
    """The loop's own settings; the rollout service carries each as `rollout_<name>`
    (`RLHF_ROLLOUT_SAMPLES_PER_PROMPT=2`). What the learner decides (rollouts per version,
    max policy lag, the sampling temperature) is not here: it comes with its PolicyUpdates."""

    model_config = ConfigDict(extra="forbid")

    samples_per_prompt: int = Field(4, description="responses sampled per prompt (one Generate call, n samples)")
    top_p: float = Field(1.0, description="nucleus sampling mass")
    max_tokens: int = Field(64, description="most tokens per sampled response")
    concurrency: int = Field(2, description="prompt groups in flight at once")
    generate_timeout_seconds: float = Field(120.0, description="deadline of one Generate call")
    score_timeout_seconds: float = Field(30.0, description="deadline of one Score call")
    reference_timeout_seconds: float = Field(30.0, description="deadline of one LogProbs call")
    initial_backoff_seconds: float = Field(
        0.5,
        description="first wait before retrying an UNAVAILABLE service (doubled each time, up to max_backoff_seconds)",
    )
    max_backoff_seconds: float = Field(10.0, description="longest wait between retries of an UNAVAILABLE service")
    version_poll_seconds: float = Field(
        1.0,
        description="while waiting for the reward model, or held back for the "
        "learner's next PolicyUpdate: how often to look again",
    )
    takeover_grace_seconds: float = Field(
        30.0,
        description="membership=group: partitions taken over mid-budget bring their share at the learner's next "
        "PolicyUpdate, or after this long held back without one",
    )
    min_rm_examples: int = Field(
        32,
        description="make no rollout before the reward model has trained on this many "
        "feedback examples (0: start at once, against the untrained RM)",
    )


class GroupDropped(Exception):
    """A prompt's samples could not be turned into rollouts; the loop moves on."""

    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage}: {reason}")
        self.stage = stage


def retry_wait(cfg: WorkerConfig) -> tenacity.wait.wait_base:
    """b/2 + uniform(0, b/2) before retry n, b = initial_backoff_seconds * 2**(n-1) capped at
    max_backoff_seconds."""
    half_first, half_max = cfg.initial_backoff_seconds / 2, cfg.max_backoff_seconds / 2
    return tenacity.wait_exponential(multiplier=half_first, max=half_max) + tenacity.wait_random_exponential(
        multiplier=half_first, max=half_max
    )


async def call_with_retry(
    stage: str,
    fn: Callable[..., Awaitable[Any]],
    request: Any,
    timeout: float,
    cfg: WorkerConfig,
    stopping: asyncio.Event,
) -> Any:
    """`fn(request, timeout=...)`, retried by tenacity while the answer is UNAVAILABLE
    (and the worker is not stopping), waiting `retry_wait` between tries: doubling backoff
    with jitter, so workers that lost the same service do not come back in step. Any other
    error raises GroupDropped at once."""

    def retryable(e: BaseException) -> bool:
        return isinstance(e, grpc.aio.AioRpcError) and e.code() == grpc.StatusCode.UNAVAILABLE and not stopping.is_set()

    def before_sleep(state: tenacity.RetryCallState) -> None:
        metrics.CALL_ERRORS.labels(stage, "UNAVAILABLE").inc()
        log.warning(
            "service unavailable, retrying",
            extra={"stage": stage, "attempt": state.attempt_number, "backoff_s": round(state.upcoming_sleep, 2)},
        )

    retrying = tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception(retryable),
        wait=retry_wait(cfg),
        before_sleep=before_sleep,
        reraise=True,
    )
    try:
        # a coroutine around the call: a gRPC stub answers with an awaitable call object,
        # which tenacity would return as the result instead of awaiting it
        async def attempt() -> Any:
            return await fn(request, timeout=timeout)

        return await retrying(attempt)
    except grpc.aio.AioRpcError as e:
        metrics.CALL_ERRORS.labels(stage, e.code().name).inc()
        raise GroupDropped(stage, f"{e.code().name}: {e.details()}") from e


class RolloutLoop:
    def __init__(
        self,
        cfg: WorkerConfig,
        prompts: PromptMixer,
        budget: PolicyBudget,
        producer: EventProducer,
        rollouts_topic: str,
        generator: grpc.aio.Channel,
        reward: grpc.aio.Channel,
        reference: grpc.aio.Channel,
        learner: grpc.aio.Channel | None = None,
    ):
        self.cfg = cfg
        self.prompts = prompts
        self.budget = budget
        self.producer = producer
        self.topic = rollouts_topic
        self.gen = generation_pb2_grpc.GenerationServiceStub(generator)
        self.rm = reward_pb2_grpc.RewardServiceStub(reward)
        self.ref = reference_pb2_grpc.ReferenceServiceStub(reference)
        self.learner = learner_pb2_grpc.LearnerServiceStub(learner) if learner is not None else None
        self.stopping = asyncio.Event()
        # called once per live prompt when its group is published or dropped: the feeds then
        # commit its offset (commit after processing)
        self.on_prompt_done: Callable[[PromptItem], None] | None = None
        self.temperature: float | None = None  # the learner's, from its PolicyUpdates (None: the generator's default)
        self._told_waiting = False
        self._takeover_since: float | None = None  # held back with a taken-over share closed since
        self._rm_ready = asyncio.Event()
        if cfg.min_rm_examples <= 0:
            self._rm_ready.set()

    async def run(self) -> None:
        await self.wait_for_reward_model()
        await asyncio.gather(*(self._task(i) for i in range(self.cfg.concurrency)))

    async def wait_for_reward_model(self) -> None:
        """Hold every rollout until the reward model has trained on `min_rm_examples` feedback
        examples and serves a trained version (≥ 1). An RM that has seen (almost) no feedback
        is a random head: PPO against it would push the policy toward noise, and spend the
        generator on it, before anyone has said what they want."""
        announced = False
        while not self._rm_ready.is_set() and not self.stopping.is_set():
            try:
                info = await self.rm.GetInfo(reward_pb2.RewardInfoRequest(), timeout=self.cfg.version_poll_seconds * 5)
                if info.rm_version >= 1 and info.examples_seen >= self.cfg.min_rm_examples:
                    log.info(
                        "reward model ready, rollouts start",
                        extra={"rm_version": info.rm_version, "examples_seen": info.examples_seen},
                    )
                    self._rm_ready.set()
                    break
            except grpc.aio.AioRpcError as e:
                metrics.CALL_ERRORS.labels("rm_info", e.code().name).inc()
            if not announced:
                announced = True
                log.info(
                    "waiting for the reward model to learn from feedback",
                    extra={"min_rm_examples": self.cfg.min_rm_examples},
                )
            metrics.WAITING_FOR_RM.set(1)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.cfg.version_poll_seconds)
        metrics.WAITING_FOR_RM.set(0)

    async def _task(self, index: int) -> None:
        n = self.cfg.samples_per_prompt
        while not self.stopping.is_set():
            # 1. backpressure
            if not self.budget.try_reserve(n):
                await self._wait_for_newer_version()
                continue
            produced = 0
            prompt = self.prompts.next()
            try:
                produced = await self.one_group(prompt)
            except GroupDropped as e:
                metrics.GROUPS_DROPPED.labels(e.stage).inc()
                log.warning("rollout group dropped", extra={"reason": str(e)})
            except Exception:
                metrics.GROUPS_DROPPED.labels("internal").inc()
                log.exception("rollout group failed")
                await asyncio.sleep(self.cfg.initial_backoff_seconds)
            finally:
                self.budget.settle(n, produced)
                metrics.BUDGET_REMAINING.set(self.budget.remaining)
                if prompt.origin is not None and self.on_prompt_done is not None:
                    self.on_prompt_done(prompt)

    async def _wait_for_newer_version(self) -> None:
        metrics.BACKPRESSURE.set(1)
        if not self.budget.known and not self._told_waiting:
            self._told_waiting = True
            log.info("waiting for the learner's first PolicyUpdate (rollouts per version, max policy lag, temperature)")
        self._maybe_open_takeover()
        counts = await self._learner_counts()
        if counts is not None and self.budget.learner_counts(*counts):
            metrics.BUDGET_RELEASES.inc()
            log.info(
                "the learner dropped rollouts and waits for fresh ones: new budget",
                extra={"rollouts_trained": counts[0], "rollouts_dropped_stale": counts[1]},
            )
        if self.budget.remaining < self.cfg.samples_per_prompt:
            await self.budget.changed(self.cfg.version_poll_seconds)
        if self.budget.remaining >= self.cfg.samples_per_prompt:
            metrics.BACKPRESSURE.set(0)

    def _maybe_open_takeover(self) -> None:
        """Held back with partitions taken over mid-budget (budget.py): open their share once
        `takeover_grace_seconds` pass with no announcement."""
        if not self.budget.taken_over:
            self._takeover_since = None
            return
        now = time.monotonic()
        if self._takeover_since is None:
            self._takeover_since = now
        elif now - self._takeover_since >= self.cfg.takeover_grace_seconds and self.budget.open_takeover():
            self._takeover_since = None
            metrics.BUDGET_SHARE.set(self.budget.budget)
            log.warning(
                "no PolicyUpdate within the takeover grace: the share of the partitions taken over opens now",
                extra={"budget_share": self.budget.budget, "grace_s": self.cfg.takeover_grace_seconds},
            )

    async def _learner_counts(self) -> tuple[int, int] | None:
        """The learner's (rollouts trained, dropped stale), or None if it is not reachable."""
        if self.learner is None:
            return None
        try:
            s = await self.learner.GetStatus(learner_pb2.GetStatusRequest(), timeout=self.cfg.version_poll_seconds)
        except grpc.aio.AioRpcError as e:
            metrics.CALL_ERRORS.labels("learner_status", e.code().name).inc()
            return None
        return s.rollouts_trained, s.rollouts_dropped_stale

    async def on_policy_updates(self, events: list[events_pb2.PolicyUpdate]) -> None:
        """PolicyUpdates from the learner (any action): the loop moved on, a new budget."""
        valid = [ev for ev in events if ev.version >= 0]
        for ev in events:
            if ev.version < 0:
                metrics.POLICY_UPDATES_INVALID.labels("negative_version").inc()
                log.error(
                    "policy update ignored: negative version", extra={"version": ev.version, "event_id": ev.event_id}
                )
        if not valid:
            return
        counts = await self._learner_counts()
        for ev in valid:
            before = (self.budget.per_version, self.budget.budget, self.temperature)
            self.budget.advance(ev.version, counts, ev.rollouts_per_version, ev.max_policy_lag)
            if ev.temperature > 0:
                self.temperature = ev.temperature
            if (self.budget.per_version, self.budget.budget, self.temperature) != before:
                log.info(
                    "following the learner's terms",
                    extra={
                        "rollouts_per_version": self.budget.per_version,
                        "budget": self.budget.budget,
                        "temperature": self.temperature,
                        "version": ev.version,
                    },
                )
        metrics.PROGRESS_VERSION.set(valid[-1].version)
        metrics.BUDGET_SHARE.set(self.budget.budget)
        metrics.BUDGET_REMAINING.set(self.budget.remaining)

    async def one_group(self, prompt: PromptItem) -> int:
        cfg, stop = self.cfg, self.stopping
        messages = [common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in prompt.messages]

        # 2-3. policy samples
        t0 = time.perf_counter()
        gen = await call_with_retry(
            "generate",
            self.gen.Generate,
            generation_pb2.GenerateRequest(
                request_id=uuid.uuid4().hex,
                messages=common_pb2.ChatMessages(messages=messages),
                params=generation_pb2.SamplingParams(
                    n=cfg.samples_per_prompt,
                    temperature=self.temperature,
                    top_p=cfg.top_p,
                    max_tokens=cfg.max_tokens,
                    priority=priorities.BACKGROUND,
                ),
            ),
            cfg.generate_timeout_seconds,
            cfg,
            stop,
        )
        metrics.STAGE_SECONDS.labels("generate").observe(time.perf_counter() - t0)
        samples = list(gen.samples)

        # 4. reward-model scores
        t0 = time.perf_counter()
        scores = await call_with_retry(
            "score",
            self.rm.Score,
            reward_pb2.ScoreRequest(
                items=[reward_pb2.ScoreItem(prompt=messages, response=s.text) for s in samples],
            ),
            cfg.score_timeout_seconds,
            cfg,
            stop,
        )
        metrics.STAGE_SECONDS.labels("score").observe(time.perf_counter() - t0)

        # 5. reference log-probs of the same tokens
        t0 = time.perf_counter()
        ref = await call_with_retry(
            "reference",
            self.ref.LogProbs,
            reference_pb2.LogProbsRequest(
                items=[
                    reference_pb2.LogProbsItem(prompt_token_ids=gen.prompt_token_ids, response_token_ids=s.token_ids)
                    for s in samples
                ],
            ),
            cfg.reference_timeout_seconds,
            cfg,
            stop,
        )
        metrics.STAGE_SECONDS.labels("reference").observe(time.perf_counter() - t0)

        if len(scores.scores) != len(samples) or len(ref.results) != len(samples):
            raise GroupDropped(
                "consistency",
                f"{len(samples)} samples, {len(scores.scores)} scores, {len(ref.results)} reference results",
            )
        # 6. one event per sample, acknowledged together
        group_id = uuid.uuid4().hex
        events = []
        for s, score, raw, r in zip(samples, scores.scores, scores.raw_scores, ref.results):
            if not (len(s.token_ids) == len(s.logprobs) == len(r.logprobs) > 0):
                raise GroupDropped(
                    "consistency",
                    f"{len(s.token_ids)} tokens, {len(s.logprobs)} log-probs, {len(r.logprobs)} reference log-probs",
                )
            events.append(
                new_event(
                    events_pb2.Rollout,
                    prompt_id=prompt.prompt_id,
                    prompt_token_ids=gen.prompt_token_ids,
                    response_token_ids=s.token_ids,
                    logprobs=s.logprobs,
                    ref_logprobs=r.logprobs,
                    score=score,
                    raw_score=raw,
                    policy_version=gen.policy_version,
                    rm_version=scores.rm_version,
                    finish_reason=s.finish_reason,
                    source=prompt.source,
                    prompt=messages,
                    response=s.text,
                    group_id=group_id,
                    group_size=len(samples),
                )
            )
        await asyncio.to_thread(self.producer.publish_many, [(self.topic, ev, prompt.prompt_id) for ev in events])
        metrics.ROLLOUTS.labels(prompt.source).inc(len(events))
        metrics.RESPONSE_TOKENS.inc(sum(len(s.token_ids) for s in samples))
        return len(events)
