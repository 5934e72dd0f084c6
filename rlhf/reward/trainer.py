"""Online reward-model training: one step per batch of new examples, mixed with replay.

A step, in order:
  1. progressive validation: score the new examples with the current weights, before
     training on them; their accuracy is the online accuracy (rlhf_rm_accuracy_ratio)
  2. update the score normaliser with those (eval-mode) raw scores
  3. mix in a uniform sample of older examples from the replay buffer
  4. Bradley-Terry loss on pairs, the tie loss on ties, pointwise logistic loss on lone
     ratings, each example weighted by its rater's reliability; one AdamW step
  5. remember the new examples in the replay buffer

Rater reliability (rlhf/reward/reliability.py): the held-out scores of step 1 are the RM's
prediction for each new vote; the votes refit a one-coin Dawid-Skene model every few
steps. A rater who falls below the threshold is quarantined: their examples leave the
replay buffer and later ones are not trained, both held aside (`held`, in checkpoints); the
reward service copies their events to the quarantine topic. A released rater's held
examples are trained again (`pending`).

A superseding event (Feedback.supersedes_event_id: a rater changed their vote) retracts
the old one: its examples leave the replay buffer, the held and pending lists and the
batch being ingested, its vote leaves the reliability window, and the counts
(examples_seen, pairs_seen) drop by what it had added; the new vote trains as usual.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch

from rlhf.reward.config import TrainerConfig
from rlhf.reward.data import (
    PAIR,
    POINT,
    TIE,
    EventDedup,
    Example,
    FeedbackConverter,
    FeedbackLimits,
    ReplayBuffer,
    prompt_key,
)
from rlhf.reward.loss import bradley_terry_loss, odin_disentangle_loss, pointwise_logistic_loss, tie_loss
from rlhf.reward.model import RewardModel
from rlhf.reward.normalizer import ScoreNormalizer
from rlhf.reward.reliability import RaterReliability, ReliabilityConfig, Vote

log = logging.getLogger(__name__)


@dataclass
class Ingested:
    """What a batch of feedback events turned into."""

    examples: list[Example]
    kinds: dict[str, int]  # events per kind ("comparison", "thumbs", "unknown")
    duplicates: int
    invalid: dict[str, int]  # events without training signal, per reason class
    refused: list[tuple[int, str]] = field(default_factory=list)  # (index in the input, why): to dead-letter
    quarantined: list[int] = field(default_factory=list)  # indices of events from quarantined raters
    retracted: int = 0  # examples taken back by superseding events


def vote_of(e: Example, scores: list[float]) -> Vote | None:
    """The reliability vote an example casts, with the RM's held-out prediction as prior
    (`scores`: its texts' raw scores before training); None for ties and anonymous ones."""
    if not e.rater or e.kind == TIE:
        return None
    key = prompt_key(e.prompt)
    if e.kind == PAIR:
        first, second = sorted((e.chosen, e.rejected))
        s_first, s_second = (scores[0], scores[1]) if first == e.chosen else (scores[1], scores[0])
        prior = 1 / (1 + math.exp(-max(-30.0, min(30.0, s_first - s_second))))
        return Vote(e.rater, f"{key}|{first}|{second}", 1 if first == e.chosen else -1, prior, e.event_id)
    prior = 1 / (1 + math.exp(-max(-30.0, min(30.0, scores[0]))))
    return Vote(e.rater, f"{key}|{e.response}", e.label, prior, e.event_id)


class OnlineRewardTrainer:
    def __init__(self, model: RewardModel, cfg: TrainerConfig, reliability: ReliabilityConfig | None = None):
        self.model = model
        self.cfg = cfg
        self.reliability = RaterReliability(reliability or ReliabilityConfig())
        self.held: dict[str, list[Example]] = {}  # quarantined raters' examples, kept for a release
        self.pending: list[Example] = []  # released raters' examples, trained in the next steps
        # event id → (rater, examples, pairs) its first training added: what a superseding event takes back
        self.event_log: OrderedDict[str, tuple[str, int, int]] = OrderedDict()
        self.superseded = EventDedup(cfg.dedup_capacity)  # ids retracted (dropped should they come later)
        self.retracted = 0  # examples retracted so far
        self.quarantine_changes: list[tuple[str, str, float]] = []  # (rater, "quarantined"/"released", p) since read
        if cfg.length_debias == "odin":
            # before the optimiser is built, so that it trains the length head too
            model.add_length_head(seed=cfg.seed + 1)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.buffer = ReplayBuffer(cfg.replay_size, seed=cfg.seed)
        self.dedup = EventDedup(cfg.dedup_capacity)
        self.converter = FeedbackConverter(limits=FeedbackLimits(cfg.max_prompt_chars, cfg.max_response_chars))
        self.normalizer = ScoreNormalizer(window=cfg.norm_window, clip=cfg.norm_clip)
        self.correct: deque[int] = deque(maxlen=cfg.accuracy_window)  # 1 = validated right
        self.online_accuracy = 0.0  # mean of `correct`, kept as a float other threads can read
        self.step = 0
        self.examples_seen = 0  # new examples trained on (pairs + pointwise)
        self.pairs_seen = 0

    def ingest(self, events: Iterable[Any]) -> Ingested:
        """Feedback events → new examples, dropping event ids seen before; events without
        training signal are counted by reason and listed in `refused` for the dead-letter topic."""
        out = Ingested([], {}, 0, {})
        for i, fb in enumerate(events):
            if not self.dedup.add(fb.event_id):
                out.duplicates += 1
                continue
            if fb.event_id in self.superseded:  # a vote its rater already changed
                out.kinds["superseded"] = out.kinds.get("superseded", 0) + 1
                continue
            old = getattr(fb, "supersedes_event_id", "")
            if old:
                out.retracted += self.retract(old, fb.rater_id, out.examples)
            if self.reliability.is_quarantined(fb.rater_id):
                out.quarantined.append(i)
            kind, examples, problem = self.converter.convert(fb)
            out.kinds[kind] = out.kinds.get(kind, 0) + 1
            if problem is not None:
                out.invalid[problem.reason] = out.invalid.get(problem.reason, 0) + 1
                out.refused.append((i, str(problem)))
                log.warning("feedback event refused", extra={"event_id": fb.event_id, "reason": str(problem)})
            out.examples.extend(examples)
            if examples:
                self.event_log[fb.event_id] = (fb.rater_id, 0, 0)  # counted as it trains
                while len(self.event_log) > self.cfg.dedup_capacity:
                    self.event_log.popitem(last=False)
        return out

    def retract(self, event_id: str, rater: str, batch: list[Example] | None = None) -> int:
        """Take back what event `event_id` trained (its rater changed their vote); only the
        same rater can retract their event. Returns the examples removed; examples_seen and
        pairs_seen drop by what the event's first training added, even where its examples
        already left the replay buffer."""
        self.superseded.add(event_id)
        logged = self.event_log.get(event_id)
        if logged is None or logged[0] != rater:
            if logged is not None:
                log.warning("supersedes_event_id names another rater's event; ignored", extra={"event_id": event_id})
            return 0
        del self.event_log[event_id]
        mine = lambda e: e.event_id == event_id  # noqa: E731
        gone = self.buffer.remove(mine)
        if batch is not None:
            gone += [e for e in batch if mine(e)]
            batch[:] = [e for e in batch if not mine(e)]
        gone += [e for e in self.pending if mine(e)]
        self.pending = [e for e in self.pending if not mine(e)]
        if rater in self.held:
            gone += [e for e in self.held[rater] if mine(e)]
            self.held[rater] = [e for e in self.held[rater] if not mine(e)]
        for e in gone:
            if e.kind == POINT:
                self.converter.forget(e.prompt, e.response)
        self.reliability.forget(event_id)
        _, trained, trained_pairs = logged
        self.examples_seen -= trained
        self.pairs_seen -= trained_pairs
        self.retracted += len(gone)
        log.info("feedback retracted", extra={"event_id": event_id, "examples": len(gone)})
        return len(gone)

    def train(self, examples: list[Example]) -> Iterator[dict[str, float]]:
        """One step per `train_batch_size` new examples, lazily: the stats of each step as it is
        taken, so a caller can publish or checkpoint between steps."""
        bs = self.cfg.train_batch_size
        for i in range(0, len(examples), bs):
            yield self.train_step(examples[i : i + bs])

    def train_released(self) -> Iterator[dict[str, float]]:
        """Steps on released examples alone (`pending`), `train_batch_size` a step, until none
        are left: a release trains even while no new feedback arrives."""
        while self.pending:
            yield self.train_step([], release=self.cfg.train_batch_size)

    def train_step(self, new: list[Example], release: int | None = None) -> dict[str, float]:
        """One optimiser step on `new` plus `release` released examples (default: as many as
        `new`, at least one) plus replay."""
        t0 = time.perf_counter()
        right: list[int] = []
        if new:
            # 1. progressive validation, before the weights have seen these examples
            self.model.eval()
            with torch.no_grad():
                raw = self._scores(new)  # (n_texts,)
            right = self._correct(new, raw)
            self.correct.extend(right)
            if self.correct:
                self.online_accuracy = sum(self.correct) / len(self.correct)
            # 2. the normaliser follows the scores the current weights give
            self.normalizer.update(raw)
            # 3. the held-out scores are the RM's prediction of each vote: refit reliability
            self._observe(new, raw.tolist())
        trainable = [e for e in new if not self.reliability.is_quarantined(e.rater)]
        for e in new:
            if self.reliability.is_quarantined(e.rater):
                self._hold(e)
        n_release = release if release is not None else (len(new) or 1)
        released, self.pending = self.pending[:n_release], self.pending[n_release:]
        # released examples of events that never trained (held from the start) count as seen now
        fresh = {e.event_id for e in released if self.event_log.get(e.event_id, ("", 1, 0))[1] == 0}
        # 4. replay: older examples keep the RM from forgetting them
        batch = trainable + released + self.buffer.sample(round(self.cfg.replay_ratio * len(new)))
        # 5. one optimiser step on the mixed batch, each example weighted by its rater's reliability
        weights = torch.tensor([self.reliability.weight(e.rater) for e in batch], dtype=torch.float32)
        self.model.train()
        if not batch or float(weights.sum()) <= 0:
            loss, stats, grad_norm = torch.zeros(()), {}, torch.zeros(())
        else:
            if self.cfg.length_debias == "odin":
                loss, stats = self._odin_loss(batch, weights)
            else:
                scores = self._scores(batch)  # (n_texts,) with grad
                loss, stats = self._loss(batch, scores, weights.to(scores.device))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
            self.optimizer.step()
        self.model.eval()
        # 6. remember
        self.buffer.extend(trainable + released)
        self.step += 1
        first_time = trainable + [e for e in released if e.event_id in fresh]
        self.examples_seen += len(first_time)
        n_pairs = sum(e.kind == PAIR for e in first_time)
        self.pairs_seen += n_pairs
        for e in first_time:
            if e.event_id in self.event_log:
                rater, n, pairs = self.event_log[e.event_id]
                self.event_log[e.event_id] = (rater, n + 1, pairs + (e.kind == PAIR))
        out = {k: float(v) for k, v in stats.items()}
        out.update(
            loss=float(loss.detach()),
            grad_norm=float(grad_norm),
            new_examples=len(first_time),
            new_pairs=n_pairs,
            replayed=len(batch) - len(trainable),
            held_examples=len(new) - len(trainable),
            mean_weight=float(weights.mean()) if len(batch) else 0.0,
            quarantined_raters=len(self.reliability.quarantined),
            validation_accuracy=sum(right) / len(right) if right else 0.0,
            online_accuracy=self.online_accuracy,
            step_seconds=time.perf_counter() - t0,
        )
        return out

    # ---- reliability and quarantine ------------------------------------------------------

    def _observe(self, new: list[Example], raw: list[float]) -> None:
        votes, i = [], 0
        for e in new:
            n = len(e.texts())
            vote = vote_of(e, raw[i : i + n])
            i += n
            if vote is not None:
                votes.append(vote)
        if not self.reliability.cfg.enabled:
            return
        newly_in, newly_out = self.reliability.observe(votes)
        for rater in sorted(newly_in):
            for e in self.buffer.remove(lambda e, r=rater: e.rater == r):
                self._hold(e)
            p = self.reliability.accuracy.get(rater, 0.0)
            self.quarantine_changes.append((rater, "quarantined", p))
            log.warning("rater quarantined", extra={"rater_id": rater, "accuracy": round(p, 3)})
        for rater in sorted(newly_out):
            self._release_held(rater)

    def _hold(self, e: Example) -> None:
        held = self.held.setdefault(e.rater, [])
        held.append(e)
        if len(held) > self.cfg.replay_size:
            del held[0]

    def _release_held(self, rater: str) -> None:
        examples = self.held.pop(rater, [])
        self.pending.extend(examples)
        p = self.reliability.accuracy.get(rater, 0.0)
        self.quarantine_changes.append((rater, "released", p))
        log.warning("rater released", extra={"rater_id": rater, "accuracy": round(p, 3), "examples": len(examples)})

    def release(self, rater: str) -> int:
        """An operator's release: `rater` is trusted again, and their held examples train
        in the next steps. Returns how many."""
        held = len(self.held.get(rater, []))
        if self.reliability.release(rater) or held:
            self._release_held(rater)
        return held

    def replay(self, rater: str, events: Iterable[Any]) -> tuple[int, int]:
        """Events of `rater` read back from the quarantine topic, queued to train with a
        release: those not already held, pending or trained (the checkpoint holds at most
        `replay_size` examples per rater, and a lost checkpoint none), and not superseded.
        Returns (events, examples) queued."""
        queued = {e.event_id for e in self.pending}
        n_events = n_examples = 0
        for fb in events:
            if fb.rater_id != rater or fb.event_id in queued or fb.event_id in self.superseded:
                continue
            logged = self.event_log.get(fb.event_id)
            if logged is not None and logged[1] > 0:  # trained already
                continue
            _, examples, problem = self.converter.convert(fb)
            if problem is not None or not examples:
                continue
            self.dedup.add(fb.event_id)  # should it arrive on rlhf.feedback again: trained once
            self.event_log[fb.event_id] = (rater, 0, 0)
            self.pending.extend(examples)
            queued.add(fb.event_id)
            n_events, n_examples = n_events + 1, n_examples + len(examples)
        return n_events, n_examples

    # ---- scores and losses ---------------------------------------------------------------

    def _scores(self, examples: list[Example]) -> torch.Tensor:
        prompts = [e.prompt for e in examples for _ in e.texts()]
        texts = [t for e in examples for t in e.texts()]
        return self.model.score_texts(prompts, texts)

    @staticmethod
    def _split(examples: list[Example], scores: torch.Tensor):
        """Scores laid out by _scores → {kind: (index tensors)}: pair (chosen, rejected),
        tie (a, b), point (scores) with labels, each with the examples' positions."""
        pos: dict[str, list] = {PAIR: [[], [], []], TIE: [[], [], []], POINT: [[], [], []]}
        i = 0
        for j, e in enumerate(examples):
            if e.kind in (PAIR, TIE):
                pos[e.kind][0].append(i)
                pos[e.kind][1].append(i + 1)
                i += 2
            else:
                pos[POINT][0].append(i)
                pos[POINT][1].append(float(e.label))
                i += 1
            pos[e.kind][2].append(j)
        idx = lambda xs: torch.tensor(xs, dtype=torch.long, device=scores.device)  # noqa: E731
        return {
            PAIR: (scores[idx(pos[PAIR][0])], scores[idx(pos[PAIR][1])], idx(pos[PAIR][2])),
            TIE: (scores[idx(pos[TIE][0])], scores[idx(pos[TIE][1])], idx(pos[TIE][2])),
            POINT: (
                scores[idx(pos[POINT][0])],
                torch.tensor(pos[POINT][1], device=scores.device),
                idx(pos[POINT][2]),
            ),
        }

    def _correct(self, examples: list[Example], scores: torch.Tensor) -> list[int]:
        """1/0 per pair and rating: judged right before training; ties are not judged."""
        parts = self._split(examples, scores)
        chosen, rejected, _ = parts[PAIR]
        points, labels, _ = parts[POINT]
        pair_right = iter((chosen > rejected).tolist())
        point_right = iter((points * labels > 0).tolist())
        out = []
        for e in examples:
            if e.kind == PAIR:
                out.append(int(next(pair_right)))
            elif e.kind == POINT:
                out.append(int(next(point_right)))
        return out

    def _loss(
        self, examples: list[Example], scores: torch.Tensor, weights: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted mean over examples: with equal weights each pair, tie and lone rating weighs the same."""
        parts = self._split(examples, scores)
        if weights is None:
            weights = torch.ones(len(examples), device=scores.device)
        loss = scores.new_zeros(())
        total = weights.sum().clamp(min=1e-12)
        stats: dict[str, torch.Tensor] = {}
        for kind, fn in ((PAIR, bradley_terry_loss), (TIE, tie_loss), (POINT, pointwise_logistic_loss)):
            a, b, where = parts[kind]
            if not where.numel():
                continue
            w = weights[where]
            if float(w.sum()) <= 0:
                continue
            term, st = fn(a, b, w, self.cfg.label_noise) if kind == PAIR else fn(a, b, w)
            loss = loss + term * w.sum()
            stats.update(st)
        return loss / total, stats

    def _odin_loss(
        self, examples: list[Example], weights: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """ODIN (rlhf.reward.loss.odin_disentangle_loss): the ranking and pointwise losses on
        r_Q + r_L, plus the terms that put length into r_L and keep it out of r_Q. Validation,
        the normaliser and serving see r_Q alone (RewardModel.forward)."""
        prompts = [e.prompt for e in examples for _ in e.texts()]
        texts = [t for e in examples for t in e.texts()]
        quality, length = self.model.score_heads(prompts, texts)  # (n_texts,) each, with grad
        loss, stats = self._loss(examples, quality + length, None if weights is None else weights.to(quality.device))
        lengths = torch.tensor(
            [len(t.split()) for t in texts], dtype=quality.dtype, device=quality.device
        )  # (n_texts,)
        head_q, head_l = self.model.head.weight.squeeze(0), self.model.length_head.weight.squeeze(0)  # (H,) each
        extra, odin_stats = odin_disentangle_loss(
            quality, length, lengths, head_q, head_l, self.cfg.odin_length_weight, self.cfg.odin_ortho_weight
        )
        stats.update(odin_stats)
        return loss + extra, stats

    def state_dict(self) -> dict[str, Any]:
        """Everything but the model weights (those go to the weight store)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "examples_seen": self.examples_seen,
            "pairs_seen": self.pairs_seen,
            "normalizer": self.normalizer.state_dict(),
            "correct": list(self.correct),
            "dedup": self.dedup.state(),
            "converter": self.converter.state(),
            "buffer": self.buffer.state(),
            "config": self.cfg.model_dump(),
            "reliability": self.reliability.state_dict(),
            "held": {r: [e.to_json() for e in es] for r, es in self.held.items()},
            "pending": [e.to_json() for e in self.pending],
            "event_log": [[k, *v] for k, v in self.event_log.items()],
            "superseded": self.superseded.state(),
            "retracted": self.retracted,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved_debias = state.get("config", {}).get("length_debias", "none")
        if saved_debias == self.cfg.length_debias:
            self.optimizer.load_state_dict(state["optimizer"])
        else:  # the length head comes or goes: AdamW's moments no longer match the parameters
            log.warning(
                "length_debias changed from %r to %r: the RM optimiser starts with fresh moments",
                saved_debias,
                self.cfg.length_debias,
            )
        for group in self.optimizer.param_groups:  # the settings of this run win over the checkpoint's
            group["lr"], group["weight_decay"] = self.cfg.lr, self.cfg.weight_decay
        self.step = state["step"]
        self.examples_seen = state["examples_seen"]
        self.pairs_seen = state["pairs_seen"]
        self.normalizer = ScoreNormalizer.from_state(state["normalizer"])
        self.normalizer.window, self.normalizer.clip = self.cfg.norm_window, self.cfg.norm_clip
        self.correct = deque(state["correct"], maxlen=self.cfg.accuracy_window)
        self.online_accuracy = sum(self.correct) / len(self.correct) if self.correct else 0.0
        self.dedup = EventDedup(self.cfg.dedup_capacity, state["dedup"])
        self.converter.load_state(state["converter"])
        self.buffer.load_state(state["buffer"])
        if "reliability" in state:  # absent in checkpoints from before rater reliability
            self.reliability.load_state_dict(state["reliability"])
            self.held = {r: [Example.from_json(x) for x in es] for r, es in state["held"].items()}
            self.pending = [Example.from_json(x) for x in state["pending"]]
            self.event_log = OrderedDict((k, (r, int(n), int(p))) for k, r, n, p in state["event_log"])
            self.superseded = EventDedup(self.cfg.dedup_capacity, state["superseded"])
            self.retracted = int(state["retracted"])
