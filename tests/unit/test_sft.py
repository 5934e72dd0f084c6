"""`rlhf sft` with the tiny model: the shipped demo set, assistant-only labels, held-out loss
falls and greedy answers change, resume continues the step count (and matches a run that
was never stopped), examples from a real gateway outbox, bad input as one line, and the
written folder passes `rlhf up`'s model check and serves from the generator."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf.cli import main
from rlhf.models import chat_prompt_ids, greedy_reply, load_tokenizer
from rlhf.sft.data import DEMO_PATH, IGNORE, SFTDataError, read_feedback, read_jsonl, tokenize

TINY = ["--lr", "3e-3", "--batch-size", "8", "--no-progress", "--greedy-tokens", "0"]


def sft(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["sft", *argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def info(out: Path) -> dict:
    return json.loads((out / "rlhf_model.json").read_text())


# --- data ---------------------------------------------------------------------------------


def test_the_demo_set_is_valid_and_in_one_style(tiny_model_dir):
    examples = read_jsonl(DEMO_PATH)
    assert len(examples) >= 45
    answers = [ex.messages[i][1] for ex in examples for i in ex.targets]
    assert all(a.rstrip().endswith("?") for a in answers), "every answer ends with a short follow-up question"
    assert len({ex.messages[0][1] for ex in examples}) == len(examples), "no repeated question"
    tok = load_tokenizer(tiny_model_dir)
    for ex in examples:
        ids, labels = tokenize(tok, ex)
        assert len(ids) == len(labels) <= 256
    # labels are exactly the answers and their end-of-turn tokens; the prompt is what the generator sends
    ex = next(e for e in examples if len(e.messages) == 4)
    ids, labels = tokenize(tok, ex)
    target = [t for t, y in zip(ids, labels) if y != IGNORE]
    eos = tok.eos_token_id
    want = []
    for i in ex.targets:
        want += tok(ex.messages[i][1], add_special_tokens=False)["input_ids"] + [eos]
    assert target == want
    first = ex.targets[0]
    prompt = chat_prompt_ids(tok, ex.as_chat(first))
    assert ids[: len(prompt)] == prompt and all(y == IGNORE for y in labels[: len(prompt)])


BAD_LINES = [
    ("not-json", '{"messages": [', "not JSON"),
    ("no-messages", '{"prompt": "hi"}', 'expected an object with a "messages" list'),
    ("bad-role", '{"messages": [{"role": "bot", "content": "hi"}]}', "messages[0].role: 'bot' is not one of"),
    (
        "content-type",
        '{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}',
        "messages[0].content: must be a string",
    ),
    ("ends-with-user", '{"messages": [{"role": "user", "content": "hi"}]}', "the last message must be the assistant"),
    (
        "empty-answer",
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}',
        "messages[1].content: an assistant answer must not be empty",
    ),
]


@pytest.mark.parametrize("case,line,needle", BAD_LINES, ids=[c for c, _, _ in BAD_LINES])
def test_a_malformed_line_is_one_line_naming_file_and_line(capsys, tmp_path, tiny_model_dir, case, line, needle):
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello?"}]})
    data = tmp_path / f"{case}.jsonl"
    data.write_text(f"{good}\n\n{line}\n")
    rc, _, err = sft(capsys, "--data", str(data), "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"))
    assert rc == 1 and err.count("\n") == 1, err
    assert err.startswith(f"rlhf sft: {data}:3: ") and needle in err, err
    assert not (tmp_path / "o").exists()


def test_missing_file_and_bad_out_are_one_line(capsys, tmp_path, tiny_model_dir):
    rc, _, err = sft(
        capsys, "--data", str(tmp_path / "nope.jsonl"), "--model", str(tiny_model_dir), "--out", str(tmp_path / "o")
    )
    assert rc == 1 and "nope.jsonl: no such file" in err and err.count("\n") == 1
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    rc, _, err = sft(capsys, "--model", str(tiny_model_dir), "--out", str(busy), *TINY)
    assert rc == 1 and "holds files not written by rlhf sft" in err
    assert (busy / "notes.txt").read_text() == "mine"
    rc, _, err = sft(capsys, "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--steps", "0")
    assert rc == 1 and "--steps: must be ≥ 1" in err


# --- training -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_sft_on_the_demo_set_lowers_heldout_loss_and_changes_greedy_answers(capsys, tmp_path, tiny_model_dir, mode):
    out = tmp_path / mode
    extra = ["--lora", "--lr", "1e-2"] if mode == "lora" else []
    rc, stdout, _ = sft(capsys, "--model", str(tiny_model_dir), "--out", str(out), "--steps", "30", *TINY, *extra)
    assert rc == 0, stdout
    meta = info(out)
    assert meta["step"] == 30 and meta["n_eval"] == 5 and meta["n_train"] == 45
    # LoRA leaves the random tiny model's (tied) embeddings alone: it moves less than full
    assert meta["eval_loss_after"] < meta["eval_loss_before"] - (1.0 if mode == "full" else 0.05), meta
    assert f"held-out loss: {meta['eval_loss_before']:.4f} -> {meta['eval_loss_after']:.4f}" in stdout
    assert "tokens/s" in stdout
    # a plain transformers folder: LoRA merged, no adapter files, the chat template kept
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").is_file()
    tok = load_tokenizer(out)
    question = [{"role": "user", "content": "What is the capital of Italy?"}]
    assert chat_prompt_ids(tok, question) == chat_prompt_ids(load_tokenizer(tiny_model_dir), question)
    changed = [
        q
        for q in ("What is the capital of Italy?", "How many hours are in a day?")
        if greedy_reply(out, q, 16) != greedy_reply(tiny_model_dir, q, 16)
    ]
    assert changed, "SFT left every greedy answer as it was"


def test_resume_continues_the_step_count_and_matches_an_uninterrupted_run(capsys, tmp_path, tiny_model_dir):
    base = ["--model", str(tiny_model_dir), *TINY, "--save-every", "2"]
    a, b = tmp_path / "a", tmp_path / "b"
    rc, _, _ = sft(capsys, "--out", str(a), "--steps", "3", *base)
    assert rc == 0 and info(a)["step"] == 3
    rc, stdout, _ = sft(capsys, "--out", str(a), "--steps", "3", *base)
    assert rc == 0 and "already done" in stdout and "after 3 steps" in stdout
    rc, stdout, _ = sft(capsys, "--out", str(a), "--steps", "6", *base)
    assert rc == 0 and "resuming from step 3" in stdout and "steps 3->6" in stdout
    state = json.loads((a / ".sft-checkpoint" / "state.json").read_text())
    assert state["step"] == 6 and [s for s, _ in state["train_losses"]] == [1, 2, 3, 4, 5, 6]
    assert info(a)["step"] == 6 and info(a)["eval_loss_before"] == state["eval_loss_before"]
    # the same batches and optimizer state as a run that was never stopped
    rc, _, _ = sft(capsys, "--out", str(b), "--steps", "6", *base)
    assert rc == 0
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6
    # another run's options are refused, naming the option
    rc, _, err = sft(capsys, "--out", str(a), "--steps", "8", *base, "--lr", "1e-3")
    assert rc == 1 and "holds a checkpoint of another run (lr:" in err


# --- the live log -------------------------------------------------------------------------


def _gateway_outbox(path: Path, with_endorsements: bool = True) -> None:
    """Served answers and feedback written by the gateway's own store, as the HTTP API does."""
    from rlhf.bus import Topics
    from rlhf.outbox import Outbox
    from services.gateway.schemas import ComparisonIn, RatingIn
    from services.gateway.store import GatewayStore

    async def fill():
        box = Outbox(path)
        store = GatewayStore(box, Topics("rlhf"))
        q1 = [{"role": "user", "content": "Name a fruit."}]
        q2 = [{"role": "user", "content": "Name a colour."}]
        await store.record_completion("c1", q1, [("r1", "An apple. Another one?"), ("r2", "Fruit.")], 0)
        await store.record_completion("c2", q2, [("r3", "Blue. Want more?"), ("r4", "Red")], 0)
        await store.add_feedback(RatingIn(kind="rating", response_id="r2", value=-1))
        if with_endorsements:
            await store.add_feedback(RatingIn(kind="rating", response_id="r1", value=1))
            await store.add_feedback(RatingIn(kind="rating", response_id="r1", value=1))  # the same answer again
            await store.add_feedback(ComparisonIn(kind="comparison", chosen_id="r3", rejected_id="r4"))
            # a tie endorses neither answer
            await store.add_feedback(ComparisonIn(kind="comparison", chosen_id="r1", rejected_id="r2", outcome="tie"))
            await store.add_feedback(
                RatingIn(kind="rating", response_id="r4", value=-1, corrected_answer="Green. Shall I name another?")
            )
        store.close()
        box.close()

    asyncio.run(fill())


def test_examples_from_the_gateway_outbox(capsys, tmp_path, tiny_model_dir):
    state = tmp_path / "state"
    _gateway_outbox(state / "gateway" / "outbox.db")
    examples, counts = read_feedback(state / "gateway" / "outbox.db")
    got = {(ex.kind, ex.messages[0][1], ex.messages[-1][1]) for ex in examples}
    assert got == {
        ("thumbs-up answer", "Name a fruit.", "An apple. Another one?"),
        ("preferred answer", "Name a colour.", "Blue. Want more?"),
        ("corrected answer", "Name a colour.", "Green. Shall I name another?"),
    }
    assert all(ex.targets == (len(ex.messages) - 1,) for ex in examples)
    assert (counts["thumbs-down"], counts["duplicates"], counts["interactions"]) == (1, 1, 2)
    assert counts["ties and both-bad"] == 1
    rc, stdout, _ = sft(
        capsys,
        "--from-feedback",
        "--state-dir",
        str(state),
        "--model",
        str(tiny_model_dir),
        "--out",
        str(tmp_path / "o"),
        "--steps",
        "2",
        *TINY,
    )
    assert rc == 0, stdout
    assert "1 thumbs-up answer, 1 preferred answer, 1 corrected answer, from 6 feedback events" in stdout
    assert info(tmp_path / "o")["n_train"] + info(tmp_path / "o")["n_eval"] == 3


def test_no_endorsed_answer_in_the_outbox_is_refused_in_one_line(capsys, tmp_path, tiny_model_dir):
    state = tmp_path / "state"
    _gateway_outbox(state / "gateway" / "outbox.db", with_endorsements=False)
    rc, stdout, err = sft(
        capsys,
        "--from-feedback",
        "--state-dir",
        str(state),
        "--model",
        str(tiny_model_dir),
        "--out",
        str(tmp_path / "o"),
    )
    assert rc == 1 and err.count("\n") == 1 and "no SFT examples in" in err, err
    assert "0 thumbs-up answers" in stdout and "1 thumbs-down" in stdout
    rc, _, err = sft(
        capsys,
        "--from-feedback",
        "--state-dir",
        str(tmp_path / "nowhere"),
        "--model",
        str(tiny_model_dir),
        "--out",
        str(tmp_path / "o"),
    )
    assert rc == 1 and "no gateway outbox at" in err
    with pytest.raises(SFTDataError, match="no gateway outbox"):
        read_feedback(tmp_path / "missing.db")


# --- the folder is a model for `rlhf up --model` ---------------------------------------


def test_the_sft_folder_passes_rlhf_up_and_serves_from_the_generator(capsys, tmp_path, tiny_model_dir):
    from rlhf.generation import Generator, Limits, SampleOut, Sampling, make_backend
    from rlhf.preflight import check_model_dir

    out = tmp_path / "sft"
    rc, _, _ = sft(capsys, "--model", str(tiny_model_dir), "--out", str(out), "--steps", "20", *TINY)
    assert rc == 0
    assert check_model_dir(out) == out.resolve()

    async def serve():
        gen = Generator(
            make_backend("transformers", out), out, Limits(max_model_len=256), tmp_path / "weights", tmp_path / "work"
        )
        await gen.start()
        try:
            ids = gen.chat_ids([{"role": "user", "content": "What is the capital of Italy?"}])
            sample = SampleOut(0)
            async for chunk_version, d in gen.generate(ids, Sampling(temperature=0.0, max_tokens=16), "t"):
                version = chunk_version
                sample.add(d)
            return ids, version, sample
        finally:
            await gen.stop()

    ids, version, sample = asyncio.run(serve())
    assert version == 0 and sample.token_ids
    # what the generator serves is the SFT'd weights: its log-probs are the folder's own
    from rlhf.models import load_causal_lm, sequence_logprobs

    ref = sequence_logprobs(load_causal_lm(out), ids, sample.token_ids)
    assert (ref - torch.tensor(sample.logprobs)).abs().max() < 1e-4
