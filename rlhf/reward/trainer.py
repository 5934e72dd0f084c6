"""Online reward-model training: one step per batch of new examples, mixed with replay.

A step, in order:
  1. progressive validation: score the new examples with the current weights, before
     training on them; their accuracy is the online accuracy (rlhf_rm_accuracy_ratio)
  2. update the score normaliser with those (eval-mode) raw scores
  3. mix in a uniform sample of older examples from the replay buffer
  4. Bradley-Terry loss on pairs + pointwise logistic loss on lone ratings, one AdamW step
  5. remember the new examples in the replay buffer
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch

from rlhf.reward.config import TrainerConfig
from rlhf.reward.data import PAIR, EventDedup, Example, FeedbackConverter, FeedbackLimits, ReplayBuffer
from rlhf.reward.loss import bradley_terry_loss, odin_disentangle_loss, pointwise_logistic_loss
from rlhf.reward.model import RewardModel
from rlhf.reward.normalizer import ScoreNormalizer

log = logging.getLogger(__name__)


@dataclass
class Ingested:
    """What a batch of feedback events turned into."""

    examples: list[Example]
    kinds: dict[str, int]  # events per kind ("comparison", "thumbs", "unknown")
    duplicates: int
    invalid: dict[str, int]  # events without training signal, per reason class
    refused: list[tuple[int, str]] = field(default_factory=list)  # (index in the input, why): to dead-letter


class OnlineRewardTrainer:
    def __init__(self, model: RewardModel, cfg: TrainerConfig):
        self.model = model
        self.cfg = cfg
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
            kind, examples, problem = self.converter.convert(fb)
            out.kinds[kind] = out.kinds.get(kind, 0) + 1
            if problem is not None:
                out.invalid[problem.reason] = out.invalid.get(problem.reason, 0) + 1
                out.refused.append((i, str(problem)))
                log.warning("feedback event refused", extra={"event_id": fb.event_id, "reason": str(problem)})
            out.examples.extend(examples)
        return out

    def train(self, examples: list[Example]) -> Iterator[dict[str, float]]:
        """One step per `train_batch_size` new examples, lazily: the stats of each step as it is
        taken, so a caller can publish or checkpoint between steps."""
        bs = self.cfg.train_batch_size
        for i in range(0, len(examples), bs):
            yield self.train_step(examples[i : i + bs])

    def train_step(self, new: list[Example]) -> dict[str, float]:
        t0 = time.perf_counter()
        # 1. progressive validation, before the weights have seen these examples
        self.model.eval()
        with torch.no_grad():
            raw = self._scores(new)  # (n_texts,)
        right = self._correct(new, raw)
        self.correct.extend(right)
        self.online_accuracy = sum(self.correct) / len(self.correct)
        # 2. the normaliser follows the scores the current weights give
        self.normalizer.update(raw)
        # 3. replay: older examples keep the RM from forgetting them
        batch = new + self.buffer.sample(round(self.cfg.replay_ratio * len(new)))
        # 4. one optimiser step on the mixed batch
        self.model.train()
        if self.cfg.length_debias == "odin":
            loss, stats = self._odin_loss(batch)
        else:
            scores = self._scores(batch)  # (n_texts,) with grad
            loss, stats = self._loss(batch, scores)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.model.eval()
        # 5. remember
        self.buffer.extend(new)
        self.step += 1
        self.examples_seen += len(new)
        n_pairs = sum(e.kind == PAIR for e in new)
        self.pairs_seen += n_pairs
        out = {k: float(v) for k, v in stats.items()}
        out.update(
            loss=float(loss.detach()),
            grad_norm=float(grad_norm),
            new_examples=len(new),
            new_pairs=n_pairs,
            replayed=len(batch) - len(new),
            validation_accuracy=sum(right) / len(right),
            online_accuracy=self.online_accuracy,
            step_seconds=time.perf_counter() - t0,
        )
        return out

    def _scores(self, examples: list[Example]) -> torch.Tensor:
        prompts = [e.prompt for e in examples for _ in e.texts()]
        texts = [t for e in examples for t in e.texts()]
        return self.model.score_texts(prompts, texts)

    @staticmethod
    def _split(examples: list[Example], scores: torch.Tensor):
        """Scores laid out by _scores → (chosen (P,), rejected (P,), point scores (N,), labels (N,))."""
        chosen, rejected, points, labels, i = [], [], [], [], 0
        for e in examples:
            if e.kind == PAIR:
                chosen.append(i)
                rejected.append(i + 1)
                i += 2
            else:
                points.append(i)
                labels.append(float(e.label))
                i += 1
        idx = lambda xs: torch.tensor(xs, dtype=torch.long, device=scores.device)  # noqa: E731
        return (
            scores[idx(chosen)],
            scores[idx(rejected)],
            scores[idx(points)],
            torch.tensor(labels, device=scores.device),
        )

    def _correct(self, examples: list[Example], scores: torch.Tensor) -> list[int]:
        chosen, rejected, points, labels = self._split(examples, scores)
        pair_right = iter((chosen > rejected).tolist())
        point_right = iter((points * labels > 0).tolist())
        return [int(next(pair_right) if e.kind == PAIR else next(point_right)) for e in examples]

    def _loss(self, examples: list[Example], scores: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean over examples: each pair and each lone rating weighs the same."""
        chosen, rejected, points, labels = self._split(examples, scores)
        n_pairs, n_points = chosen.numel(), points.numel()
        loss = scores.new_zeros(())
        stats: dict[str, torch.Tensor] = {}
        if n_pairs:
            bt, s = bradley_terry_loss(chosen, rejected)
            loss = loss + bt * n_pairs
            stats.update(s)
        if n_points:
            pt, s = pointwise_logistic_loss(points, labels)
            loss = loss + pt * n_points
            stats.update(s)
        return loss / max(1, n_pairs + n_points), stats

    def _odin_loss(self, examples: list[Example]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """ODIN (rlhf.reward.loss.odin_disentangle_loss): the ranking and pointwise losses on
        r_Q + r_L, plus the terms that put length into r_L and keep it out of r_Q. Validation,
        the normaliser and serving see r_Q alone (RewardModel.forward)."""
        prompts = [e.prompt for e in examples for _ in e.texts()]
        texts = [t for e in examples for t in e.texts()]
        quality, length = self.model.score_heads(prompts, texts)  # (n_texts,) each, with grad
        loss, stats = self._loss(examples, quality + length)
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
