"""The learner trains on users' own Feedback events (user_feedback), through the real broker:
their comparisons raise the chosen answer's margin (dpo), their thumbs-up answers get more
likely (distill), a meaningless event is dead-lettered with its reason while training goes
on, a SIGKILLed learner restarted from its checkpoint trains no feedback event twice, and
with user_feedback=none the feedback topic is not read at all."""

from __future__ import annotations

import contextlib
import signal
import statistics
import threading
import time

import pytest
from kafka import KafkaConsumer, TopicPartition
from prometheus_client import REGISTRY

from rlhf.bus import EventProducer, new_event
from rlhf.learner import Learner, LearnerConfig
from rlhf.models import chat_prompt_ids, load_causal_lm, load_tokenizer, sequence_logprobs
from rlhf.serving.client import sync_channel
from rlhf.testing.rollouts import TokenSetReward, sample_rollouts
from rlhf.v1 import common_pb2, events_pb2, learner_pb2, learner_pb2_grpc
from tests.integration.test_dead_letters import dead_letters, why
from tests.integration.test_learner_crash import learner_env, ledger_entries
from tests.procs import ServiceProcess, wait_for

BATCH = 4
TARGET = "Paris is the capital of France."  # the answer the users keep preferring
OTHERS = ["Lyon.", "I do not know.", "Berlin is nice.", "France has no capital."]


@pytest.fixture(scope="module")
def sampler(tiny_model_dir):
    """make(version, seed) → BATCH Rollout events sampled from the tiny base model."""
    tok = load_tokenizer(tiny_model_dir)
    lm = load_causal_lm(tiny_model_dir)
    reward = TokenSetReward(len(tok))
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": f"Question {i}?"}]) for i in range(BATCH)]

    def make(version: int = 0, seed: int = 0):
        return sample_rollouts(
            lm,
            lm,
            prompts,
            reward,
            version,
            max_new_tokens=4,
            pad_id=tok.pad_token_id,
            eos_id=tok.eos_token_id,
            seed=seed,
        )

    return make


def question(i: int) -> str:
    return f"Which city is the capital of France? ({i})"


def user_feedback(i: int, **kind) -> events_pb2.Feedback:
    return new_event(
        events_pb2.Feedback,
        conversation_id=f"conv-{i}",
        prompt=[common_pb2.ChatMessage(role="user", content=question(i))],
        source="simulated",
        **kind,
    )


def prefers_target(i: int) -> events_pb2.Feedback:
    return user_feedback(i, comparison=events_pb2.Comparison(chosen=TARGET, rejected=OTHERS[i % len(OTHERS)]))


def thumbs_up_target(i: int) -> events_pb2.Feedback:
    return user_feedback(i, rating=events_pb2.Rating(response=TARGET, value=1))


def publish(bootstrap: str, items) -> None:
    with EventProducer(bootstrap) as producer:
        producer.publish_many(items)


def config(**kw) -> LearnerConfig:
    base = dict(
        batch_size=BATCH,
        minibatch_size=2,
        micro_batch_size=2,
        ppo_epochs=2,
        max_policy_lag=1000,
        drift_max_new_tokens=4,
        drift_samples_per_prompt=1,
        drift_kl_budget=1e6,  # the gate is not what is tested: every version is promoted
        torch_threads=1,
        tracking="none",
    )
    return LearnerConfig(**(base | kw))


@contextlib.contextmanager
def training(learner: Learner):
    """The learner's loop on a thread, as the service runs it."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def run():
        try:
            learner.run(stop)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    thread = threading.Thread(target=run, name="test-learner-loop", daemon=True)
    thread.start()
    try:
        yield errors
    finally:
        stop.set()
        thread.join(120)
        assert not errors, errors


def log_likelihoods(learner: Learner, tok, answers: list[str], n: int) -> list[float]:
    """log π_θ(answer | question i) under the learner's current weights, one per answer."""
    out = []
    for i in range(n):
        prompt = chat_prompt_ids(tok, [{"role": "user", "content": question(i)}])
        ids = tok.apply_chat_template(
            [{"role": "user", "content": question(i)}, {"role": "assistant", "content": answers[i]}],
            tokenize=True,
            return_dict=False,
        )
        answer = ids[len(prompt) : ids.index(tok.eos_token_id, len(prompt)) + 1]
        out.append(float(sequence_logprobs(learner.policy.lm, prompt, answer).sum()))
    return out


def measure(learner: Learner, tok, mode: str, n: int) -> float:
    """dpo: mean log π(TARGET) − log π(other); distill: mean log π(TARGET), over the n prompts."""
    learner.pause()  # a barrier: no step runs while we read the weights
    try:
        target = log_likelihoods(learner, tok, [TARGET] * n, n)
        if mode == "distill":
            return statistics.mean(target)
        other = log_likelihoods(learner, tok, [OTHERS[i % len(OTHERS)] for i in range(n)], n)
        return statistics.mean(t - o for t, o in zip(target, other))
    finally:
        learner.resume()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dpo", "distill"])
def test_users_feedback_moves_the_policy_toward_their_answer(broker, topics, tiny_model_dir, tmp_path, sampler, mode):
    per_step, steps = 4, 4
    cfg = config(finetune="lora", lr=1e-2, user_feedback=mode, user_feedback_coef=1.0, dpo_beta=0.5)
    cfg = cfg.model_copy(update={"user_feedback_max_per_step": per_step})
    make = prefers_target if mode == "dpo" else thumbs_up_target
    learner = Learner(cfg, tiny_model_dir, tmp_path / "state", broker.bootstrap, topics.prefix)
    learner.start()
    tok = learner.tokenizer
    try:
        with training(learner):
            curve = [measure(learner, tok, mode, per_step)]
            for step in range(1, steps + 1):
                events = [make(i) for i in range(per_step)]  # the same people's answers, step after step
                publish(broker.bootstrap, [(topics.feedback, e, e.conversation_id) for e in events])
                wait_for(lambda: len(learner.feedback.intake) == per_step, 60, "feedback buffered")
                rollouts = sampler(seed=step)
                publish(broker.bootstrap, [(topics.rollouts, r, r.prompt_id) for r in rollouts])
                wait_for(lambda step=step: learner.state.step == step, 120, f"step {step}")
                curve.append(measure(learner, tok, mode, per_step))
        print(f"{mode}: {'margin' if mode == 'dpo' else 'log π(target)'} per step: {[round(c, 3) for c in curve]}")
        assert all(c > curve[0] + 0.5 for c in curve[1:]), curve  # up after the first step, and stays up
        assert curve[-1] > curve[1], curve  # and still higher after more of them
        s = learner.state
        kind = "pairs" if mode == "dpo" else "answers"
        assert s.feedback_trained == per_step * steps and getattr(s, f"feedback_{kind}_trained") == per_step * steps
        stats = learner.last_stats
        assert stats[f"user_feedback_{kind}"] == per_step
        if mode == "dpo":
            assert stats["user_dpo_accuracy"] == 1.0 and stats["user_dpo_reward_margin"] > 0
        else:
            assert stats["user_distill_loss"] > 0
        ledger = learner.ledger.entries()
        trained = [i for e in ledger for i in e["feedback"]]
        assert len(trained) == len(set(trained)) == per_step * steps
        assert ledger[-1]["feedback_offsets"] == [[topics.feedback, 0, per_step * steps]]
    finally:
        learner.close()


def test_feedback_alone_steps_train_users_pairs_before_any_rollout(broker, topics, tiny_model_dir, tmp_path, sampler):
    """user_feedback_alone: a full step of comparisons trains with no rollout at all, and
    publishes a version; fewer than a step's worth wait for the next rollout batch."""
    per_step = 4
    cfg = config(
        lr=1e-2,
        user_feedback="dpo",
        user_feedback_coef=1.0,
        dpo_beta=0.5,
        user_feedback_max_per_step=per_step,
        user_feedback_alone=True,
        publish_every=1,
    )
    before = REGISTRY.get_sample_value("rlhf_learner_feedback_alone_steps_total") or 0
    learner = Learner(cfg, tiny_model_dir, tmp_path / "state", broker.bootstrap, topics.prefix)
    learner.start()
    tok = learner.tokenizer
    try:
        with training(learner):
            start = measure(learner, tok, "dpo", per_step)
            events = [prefers_target(i % per_step) for i in range(2 * per_step + 1)]
            publish(broker.bootstrap, [(topics.feedback, e, e.conversation_id) for e in events])
            wait_for(lambda: learner.state.step == 2 and len(learner.feedback.intake) == 1, 120, "two feedback steps")
            after = measure(learner, tok, "dpo", per_step)
            assert learner.state.step == 2  # the ninth event alone is no step
            publish(broker.bootstrap, [(topics.rollouts, r, r.prompt_id) for r in sampler(seed=5)])
            wait_for(lambda: learner.state.step == 3, 120, "a rollout step")
        assert after > start + 0.5, (start, after)
        first, second, third = learner.ledger.entries()
        assert first["trained"] == second["trained"] == [] and len(third["trained"]) == BATCH
        assert [len(e["feedback"]) for e in (first, second, third)] == [per_step, per_step, 1]
        assert sorted(i for e in (first, second, third) for i in e["feedback"]) == sorted(e.event_id for e in events)
        s = learner.state
        assert (s.rollouts_trained, s.feedback_pairs_trained) == (BATCH, 2 * per_step + 1)
        assert learner.state.lineage[-1] >= 2, learner.state.lineage  # the feedback steps published versions
        assert REGISTRY.get_sample_value("rlhf_learner_feedback_alone_steps_total") == before + 2
    finally:
        learner.close()


def test_meaningless_feedback_is_dead_lettered_with_its_reason_and_training_goes_on(
    broker, topics, tiny_model_dir, tmp_path, sampler
):
    cfg = config(user_feedback="both", user_feedback_max_prompt_tokens=48)
    bad = {
        "identical_responses": user_feedback(0, comparison=events_pb2.Comparison(chosen="Same.", rejected="Same.")),
        "empty_response": user_feedback(1, comparison=events_pb2.Comparison(chosen="  ", rejected="Lyon.")),
        "too_long": new_event(
            events_pb2.Feedback,
            prompt=[common_pb2.ChatMessage(role="user", content="capital " * 100)],
            rating=events_pb2.Rating(response="Paris.", value=1),
        ),
        "empty_prompt": new_event(events_pb2.Feedback, comparison=events_pb2.Comparison(chosen="a", rejected="b")),
    }
    expected = {
        "identical_responses": "identical_responses: comparison: chosen and rejected are the same text",
        "empty_response": "empty_response: comparison.chosen is only whitespace",
        "too_long": "too_long: prompt: ",
        "empty_prompt": "empty_prompt: prompt: no messages",
    }
    good = [prefers_target(0), thumbs_up_target(1)]
    thumbs_down = user_feedback(2, rating=events_pb2.Rating(response="Lyon.", value=-1))  # the RM's, not ours
    before = {r: REGISTRY.get_sample_value("rlhf_learner_feedback_invalid_total", {"reason": r}) or 0 for r in bad}
    learner = Learner(cfg, tiny_model_dir, tmp_path / "state", broker.bootstrap, topics.prefix)
    learner.start()
    try:
        with training(learner):
            events = [*bad.values(), *good, thumbs_down]
            publish(broker.bootstrap, [(topics.feedback, e, e.conversation_id or "x") for e in events])
            s = learner.state
            wait_for(
                lambda: (s.feedback_invalid, s.feedback_skipped, len(learner.feedback.intake)) == (len(bad), 1, 2),
                60,
                "every feedback event read",
            )
            publish(broker.bootstrap, [(topics.rollouts, r, r.prompt_id) for r in sampler(seed=1)])
            wait_for(lambda: learner.state.step == 1, 120, "step 1 past the bad feedback")
            publish(broker.bootstrap, [(topics.rollouts, r, r.prompt_id) for r in sampler(seed=2)])
            wait_for(lambda: learner.state.step == 2, 120, "step 2")

        dead = {m.value: m for m in dead_letters(broker.bootstrap, topics.feedback, len(bad))}
        for reason, event in bad.items():
            message = dead[event.SerializeToString()]  # byte for byte
            assert why(message).startswith(expected[reason]), (reason, why(message))
            assert dict(message.headers)["dlq.group"] == b"learner"
            assert (
                REGISTRY.get_sample_value("rlhf_learner_feedback_invalid_total", {"reason": reason})
                == before[reason] + 1
            )
        assert "> limit 48 (RLHF_LEARNER_USER_FEEDBACK_MAX_PROMPT_TOKENS)" in why(
            dead[bad["too_long"].SerializeToString()]
        )
        s = learner.state
        assert (s.feedback_invalid, s.feedback_skipped, s.feedback_trained) == (4, 1, 2)
        assert (s.feedback_pairs_trained, s.feedback_answers_trained) == (1, 1)
        [first, second] = learner.ledger.entries()
        assert sorted(first["feedback"]) == sorted(e.event_id for e in good) and second["feedback"] == []
        assert sorted(first["feedback_invalid"]) == sorted(e.event_id for e in bad.values())
        assert first["feedback_skipped"] == [thumbs_down.event_id]
        assert first["feedback_offsets"] == [[topics.feedback, 0, len(events)]]  # a restart reads none of them again
        assert learner.status()["user_feedback"]["invalid"] == 4
    finally:
        learner.close()


def test_user_feedback_none_leaves_the_feedback_topic_unread(broker, topics, tiny_model_dir, tmp_path, sampler):
    publish(broker.bootstrap, [(topics.feedback, prefers_target(0), "c")])
    learner = Learner(config(), tiny_model_dir, tmp_path / "state", broker.bootstrap, topics.prefix)
    learner.start()
    try:
        assert learner.feedback is None
        with training(learner):
            publish(broker.bootstrap, [(topics.rollouts, r, r.prompt_id) for r in sampler(seed=3)])
            wait_for(lambda: learner.state.step == 1, 120, "step 1")
        [line] = learner.ledger.entries()
        assert not any(key.startswith("feedback") for key in line)  # the ledger line of before user_feedback
        assert learner.last_stats.get("user_feedback_pairs") is None
    finally:
        learner.close()
    # nothing of the learner's group was ever committed on the feedback topic
    probe = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id="learner", enable_auto_commit=False)
    try:
        assert probe.committed(TopicPartition(topics.feedback, 0)) is None
    finally:
        probe.close()


@pytest.mark.slow
@pytest.mark.parametrize("alone", [False, True], ids=["rollout-steps", "feedback-alone-steps"])
def test_sigkill_and_restart_train_each_feedback_event_exactly_once(
    broker, topics, tiny_model_dir, tmp_path, sampler, alone
):
    """`alone`: no rollout at all, every step is a feedback-alone step (user_feedback_alone)."""
    feedback = [prefers_target(i) if i % 2 else thumbs_up_target(i) for i in range(12)]
    bad = user_feedback(99, comparison=events_pb2.Comparison(chosen="x", rejected="x"))
    publish(broker.bootstrap, [(topics.feedback, e, e.conversation_id) for e in feedback[:6] + [bad] + feedback[6:]])
    batches = 0

    def more_rollouts(n: int) -> None:
        nonlocal batches
        rollouts = [r for b in range(n) for r in sampler(seed=100 + batches + b)]
        batches += n
        publish(broker.bootstrap, [(topics.rollouts, r, r.prompt_id) for r in rollouts])

    if not alone:
        more_rollouts(8)
    state_dir = tmp_path / "state"
    env = learner_env(
        broker,
        topics,
        tiny_model_dir,
        state_dir,
        user_feedback="both",
        user_feedback_max_per_step=2,
        user_feedback_alone=alone,
        tracking="none",
    )
    port, log = int(env["RLHF_PORT"]), tmp_path / "learner.log"

    def trained_feedback() -> list[str]:
        return [i for e in ledger_entries(state_dir) for i in e.get("feedback", [])]

    # 1. kill it twice, each time soon after a step that trained feedback (the next step's
    #    take from the buffer, its checkpoint or its commit may be cut short)
    for delay in (0.0, 0.5):
        svc = ServiceProcess("learner", env, log, port, 0).start()
        try:
            svc.wait_serving(180)
            done = len(trained_feedback())
            wait_for(lambda done=done: len(trained_feedback()) > done, 120, "a step with feedback", detail=svc.log)
            time.sleep(delay)
        finally:
            svc.proc.send_signal(signal.SIGKILL)
            svc.proc.wait(30)

    # 2. the last incarnation trains until every good feedback event is in the ledger
    svc = ServiceProcess("learner", env, log, port, 0).start()
    try:
        svc.wait_serving(180)
        stub = learner_pb2_grpc.LearnerServiceStub(sync_channel(svc.address))

        def all_trained() -> bool:
            if set(trained_feedback()) >= {e.event_id for e in feedback}:
                return True
            if not alone and stub.GetStatus(learner_pb2.GetStatusRequest()).rollouts_trained >= batches * BATCH:
                more_rollouts(1)  # the steps are driven by rollouts: give it another one
            return False

        wait_for(all_trained, 300, "every feedback event trained", every=0.5, detail=svc.log)
    finally:
        assert svc.stop(signal.SIGTERM) == 0, svc.log()

    # 3. the ledger (the restored model's history): each event once, the bad one never
    trained = trained_feedback()
    assert len(trained) == len(set(trained)), "a feedback event was trained twice"
    assert set(trained) == {e.event_id for e in feedback} and bad.event_id not in trained
    entries = ledger_entries(state_dir)
    assert [e["step"] for e in entries] == list(range(1, len(entries) + 1))
    if alone:
        assert all(e["trained"] == [] for e in entries)
    assert "restored checkpoint" in log.read_text()
