"""The rollout loop: prompt → Generate(n) → Score → LogProbs → Rollout events on Kafka.

Nothing starts before the reward model has trained on `min_rm_examples` feedback examples
(default 32) and serves a trained version. Then each of `concurrency` tasks repeats:

  1. backpressure: reserve room for n rollouts under the current version's budget (budget.py)
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
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import grpc

from rlhf.bus import EventProducer, new_event
from rlhf import priorities
from rlhf.rollout import metrics
from rlhf.rollout.budget import PolicyBudget
from rlhf.rollout.sources import PromptItem, PromptMixer
from rlhf.v1 import (
    common_pb2, events_pb2, generation_pb2, generation_pb2_grpc, reference_pb2, reference_pb2_grpc, reward_pb2,
    reward_pb2_grpc,
)

log = logging.getLogger(__name__)


@dataclass
class WorkerConfig:
    samples_per_prompt: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    concurrency: int = 2
    generate_timeout_s: float = 120.0
    score_timeout_s: float = 30.0
    reference_timeout_s: float = 30.0
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    version_poll_s: float = 1.0
    min_rm_examples: int = 32


class GroupDropped(Exception):
    """A prompt's samples could not be turned into rollouts; the loop moves on."""

    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage}: {reason}")
        self.stage = stage


async def call_with_retry(stage: str, fn: Callable[..., Awaitable[Any]], request: Any, timeout: float,
                          cfg: WorkerConfig, stopping: asyncio.Event) -> Any:
    """`fn(request, timeout=...)`, retried with exponential backoff (and jitter) while the
    answer is UNAVAILABLE; any other error raises GroupDropped at once."""
    backoff = cfg.initial_backoff_s
    while True:
        try:
            return await fn(request, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or stopping.is_set():
                metrics.CALL_ERRORS.labels(stage, e.code().name).inc()
                raise GroupDropped(stage, f"{e.code().name}: {e.details()}") from e
            metrics.CALL_ERRORS.labels(stage, "UNAVAILABLE").inc()
            log.warning("service unavailable, retrying", extra={"stage": stage, "backoff_s": round(backoff, 2)})
        await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
        backoff = min(cfg.max_backoff_s, backoff * 2)


class RolloutLoop:
    def __init__(
        self, cfg: WorkerConfig, prompts: PromptMixer, budget: PolicyBudget, producer: EventProducer,
        rollouts_topic: str, generator: grpc.aio.Channel, reward: grpc.aio.Channel, reference: grpc.aio.Channel,
    ):
        self.cfg = cfg
        self.prompts = prompts
        self.budget = budget
        self.producer = producer
        self.topic = rollouts_topic
        self.gen = generation_pb2_grpc.GenerationServiceStub(generator)
        self.rm = reward_pb2_grpc.RewardServiceStub(reward)
        self.ref = reference_pb2_grpc.ReferenceServiceStub(reference)
        self.stopping = asyncio.Event()
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
                info = await self.rm.GetInfo(reward_pb2.RewardInfoRequest(), timeout=self.cfg.version_poll_s * 5)
                if info.rm_version >= 1 and info.examples_seen >= self.cfg.min_rm_examples:
                    log.info("reward model ready, rollouts start",
                             extra={"rm_version": info.rm_version, "examples_seen": info.examples_seen})
                    self._rm_ready.set()
                    break
            except grpc.aio.AioRpcError as e:
                metrics.CALL_ERRORS.labels("rm_info", e.code().name).inc()
            if not announced:
                announced = True
                log.info("waiting for the reward model to learn from feedback",
                         extra={"min_rm_examples": self.cfg.min_rm_examples})
            metrics.WAITING_FOR_RM.set(1)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.cfg.version_poll_s)
        metrics.WAITING_FOR_RM.set(0)

    async def _task(self, index: int) -> None:
        n = self.cfg.samples_per_prompt
        while not self.stopping.is_set():
            # 1. backpressure
            if not self.budget.try_reserve(n):
                await self._wait_for_newer_version()
                continue
            produced = 0
            try:
                produced = await self.one_group(self.prompts.next())
            except GroupDropped as e:
                metrics.GROUPS_DROPPED.labels(e.stage).inc()
                log.warning("rollout group dropped", extra={"reason": str(e)})
            except Exception:
                metrics.GROUPS_DROPPED.labels("internal").inc()
                log.exception("rollout group failed")
                await asyncio.sleep(self.cfg.initial_backoff_s)
            finally:
                self.budget.settle(n, produced)
                metrics.BUDGET_REMAINING.set(self.budget.remaining)

    async def _wait_for_newer_version(self) -> None:
        metrics.BACKPRESSURE.set(1)
        try:
            info = await self.gen.GetInfo(generation_pb2.GetInfoRequest(), timeout=self.cfg.version_poll_s * 5)
            self.observe(info.policy_version)
        except grpc.aio.AioRpcError as e:
            metrics.CALL_ERRORS.labels("get_info", e.code().name).inc()
        if self.budget.remaining < self.cfg.samples_per_prompt:
            await self.budget.changed(self.cfg.version_poll_s)
        if self.budget.remaining >= self.cfg.samples_per_prompt:
            metrics.BACKPRESSURE.set(0)

    def observe(self, version: int) -> None:
        if self.budget.observe(version):
            metrics.PROGRESS_VERSION.set(version)
            metrics.BUDGET_REMAINING.set(self.budget.remaining)

    async def one_group(self, prompt: PromptItem) -> int:
        cfg, stop = self.cfg, self.stopping
        messages = [common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in prompt.messages]

        # 2-3. policy samples
        t0 = time.perf_counter()
        gen = await call_with_retry("generate", self.gen.Generate, generation_pb2.GenerateRequest(
            request_id=uuid.uuid4().hex, messages=common_pb2.ChatMessages(messages=messages),
            params=generation_pb2.SamplingParams(n=cfg.samples_per_prompt, temperature=cfg.temperature,
                                                 top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                                                 priority=priorities.BACKGROUND),
        ), cfg.generate_timeout_s, cfg, stop)
        metrics.STAGE_SECONDS.labels("generate").observe(time.perf_counter() - t0)
        self.observe(gen.policy_version)
        samples = list(gen.samples)

        # 4. reward-model scores
        t0 = time.perf_counter()
        scores = await call_with_retry("score", self.rm.Score, reward_pb2.ScoreRequest(
            items=[reward_pb2.ScoreItem(prompt=messages, response=s.text) for s in samples],
        ), cfg.score_timeout_s, cfg, stop)
        metrics.STAGE_SECONDS.labels("score").observe(time.perf_counter() - t0)

        # 5. reference log-probs of the same tokens
        t0 = time.perf_counter()
        ref = await call_with_retry("reference", self.ref.LogProbs, reference_pb2.LogProbsRequest(
            items=[reference_pb2.LogProbsItem(prompt_token_ids=gen.prompt_token_ids, response_token_ids=s.token_ids)
                   for s in samples],
        ), cfg.reference_timeout_s, cfg, stop)
        metrics.STAGE_SECONDS.labels("reference").observe(time.perf_counter() - t0)

        if len(scores.scores) != len(samples) or len(ref.results) != len(samples):
            raise GroupDropped("consistency", f"{len(samples)} samples, {len(scores.scores)} scores, "
                                              f"{len(ref.results)} reference results")
        # 6. one event per sample, acknowledged together
        group_id = uuid.uuid4().hex
        events = []
        for s, score, raw, r in zip(samples, scores.scores, scores.raw_scores, ref.results):
            if not (len(s.token_ids) == len(s.logprobs) == len(r.logprobs) > 0):
                raise GroupDropped("consistency", f"{len(s.token_ids)} tokens, {len(s.logprobs)} log-probs, "
                                                  f"{len(r.logprobs)} reference log-probs")
            events.append(new_event(
                events_pb2.Rollout, prompt_id=prompt.prompt_id, prompt_token_ids=gen.prompt_token_ids,
                response_token_ids=s.token_ids, logprobs=s.logprobs, ref_logprobs=r.logprobs, score=score,
                raw_score=raw, policy_version=gen.policy_version, rm_version=scores.rm_version,
                finish_reason=s.finish_reason, source=prompt.source, prompt=messages, response=s.text,
                group_id=group_id,
            ))
        await asyncio.to_thread(self.producer.publish_many, [(self.topic, ev, prompt.prompt_id) for ev in events])
        metrics.ROLLOUTS.labels(prompt.source).inc(len(events))
        metrics.RESPONSE_TOKENS.inc(sum(len(s.token_ids) for s in samples))
        return len(events)
