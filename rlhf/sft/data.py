"""SFT examples: chat-format JSONL files, or what people endorsed in the gateway's outbox,
tokenised with the model's own chat template, the loss on assistant tokens only.

A line of a file is `{"messages": [{"role": "user", "content": "..."}, {"role":
"assistant", "content": "..."}, ...]}`; every assistant message is a target. From the
outbox, an example is the conversation a person judged plus the answer they endorsed: a
thumbs-up answer, the chosen answer of a comparison, or their `corrected_answer` (which wins
over the served one); only that last answer is a target.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rlhf.models.loading import chat_prompt_ids

ROLES = ("system", "user", "assistant")
DEMO = "demo"
DEMO_PATH = Path(__file__).resolve().parents[1] / "data" / "sft_demo.jsonl"
IGNORE = -100  # label of a token without loss (torch cross_entropy's ignore_index)

# example kinds from the live log, in the order they are reported
THUMBS_UP, PREFERRED, CORRECTED = "thumbs-up answer", "preferred answer", "corrected answer"


class SFTDataError(ValueError):
    """Unusable SFT input; the message is one line naming the file:line (or the outbox) and the problem."""


@dataclass(frozen=True)
class Example:
    messages: tuple[tuple[str, str], ...]  # (role, content), the whole conversation
    targets: tuple[int, ...]  # indices of the assistant messages the loss is on
    kind: str = "file"

    def as_chat(self, upto: int | None = None) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages[:upto]]


def resolve_data(data: str | Path) -> Path:
    """`"demo"` → the shipped demonstration set; anything else is a path."""
    return DEMO_PATH if str(data) == DEMO else Path(data).expanduser()


def read_jsonl(path: str | Path) -> list[Example]:
    """Every example of a chat JSONL file (blank lines allowed); SFTDataError at the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise SFTDataError(f"{path}: no such file (pass --data FILE.jsonl, or --data demo for the shipped set)")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SFTDataError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict) or "messages" not in obj:
                raise SFTDataError(f'{where}: expected an object with a "messages" list, got {_short(obj)}')
            messages = check_messages(obj["messages"], where)
            out.append(Example(messages, tuple(i for i, (r, _) in enumerate(messages) if r == "assistant")))
    if not out:
        raise SFTDataError(f"{path}: no examples (one JSON object per line)")
    return out


def check_messages(messages: object, where: str) -> tuple[tuple[str, str], ...]:
    """The conversation as (role, content) pairs, or SFTDataError naming the bad field."""
    if not isinstance(messages, list) or not messages:
        raise SFTDataError(f"{where}: messages: must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise SFTDataError(f"{where}: messages[{i}]: must be an object with role and content, got {_short(m)}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise SFTDataError(f"{where}: messages[{i}].role: {_short(role)} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise SFTDataError(f"{where}: messages[{i}].content: must be a string, got {_short(content)}")
        if role == "assistant" and not content.strip():
            raise SFTDataError(f"{where}: messages[{i}].content: an assistant answer must not be empty")
        out.append((role, content))
    if out[0][0] == "assistant":
        raise SFTDataError(f"{where}: messages[0].role: a conversation starts with a system or user message")
    if out[-1][0] != "assistant":
        raise SFTDataError(
            f"{where}: messages[{len(out) - 1}].role: the last message must be the assistant's "
            "answer (the text to learn)"
        )
    return tuple(out)


def _short(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# --- the live log -------------------------------------------------------------------------


def outbox_path(state_dir: str | Path) -> Path:
    """Where the gateway keeps its outbox by default (its setting outbox_path, RLHF_OUTBOX_PATH)."""
    return Path(state_dir).expanduser() / "gateway" / "outbox.db"


def read_feedback(outbox: str | Path, topic_prefix: str = "rlhf") -> tuple[list[Example], Counter]:
    """Examples from every Feedback event still in the gateway's outbox, and a count of each
    kind (THUMBS_UP, PREFERRED, CORRECTED; also "thumbs-down", "interactions" and
    "undecodable", which give no example). The outbox keeps acknowledged events for the
    gateway's outbox_retention_seconds (1 h by default): older feedback is no longer there."""
    from rlhf.bus import DecodeError, Topics, decode
    from rlhf.v1 import events_pb2

    outbox = Path(outbox)
    if not outbox.is_file():
        raise SFTDataError(
            f"no gateway outbox at {outbox}: pass the --state-dir of a stack whose gateway took "
            "feedback (or --outbox PATH)"
        )
    topics = Topics(topic_prefix)
    conn = sqlite3.connect(f"file:{outbox}?mode=ro", uri=True)  # read-only: the gateway may be running
    try:
        rows = conn.execute("SELECT payload FROM outbox WHERE topic = ? ORDER BY seq", (topics.feedback,)).fetchall()
        interactions = conn.execute("SELECT count(*) FROM outbox WHERE topic = ?", (topics.interactions,)).fetchone()[0]
    except sqlite3.DatabaseError as e:
        raise SFTDataError(f"{outbox}: not a gateway outbox ({e})") from None
    finally:
        conn.close()
    counts: Counter = Counter({"feedback events": len(rows), "interactions": interactions})
    out: list[Example] = []
    seen: set[tuple] = set()
    for (payload,) in rows:
        try:
            fb = decode(events_pb2.Feedback, payload)
        except DecodeError:
            counts["undecodable"] += 1
            continue
        kind = fb.WhichOneof("kind")
        if fb.corrected_answer.strip():
            kind, answer = CORRECTED, fb.corrected_answer
        elif kind == "rating" and fb.rating.value > 0:
            kind, answer = THUMBS_UP, fb.rating.response
        elif kind == "comparison" and fb.comparison.outcome == events_pb2.COMPARISON_OUTCOME_CHOSEN:
            kind, answer = PREFERRED, fb.comparison.chosen
        elif kind == "comparison":  # a tie or both bad: neither answer is endorsed
            counts["ties and both-bad"] += 1
            continue
        else:
            counts["thumbs-down"] += 1
            continue
        chat = [{"role": m.role, "content": m.content} for m in fb.prompt] + [{"role": "assistant", "content": answer}]
        try:
            messages = check_messages(chat, f"outbox event {fb.event_id}")
        except SFTDataError:
            counts["invalid"] += 1
            continue
        if messages in seen:  # the same answer endorsed twice is one example
            counts["duplicates"] += 1
            continue
        seen.add(messages)
        counts[kind] += 1
        out.append(Example(messages, (len(messages) - 1,), kind))
    return out, counts


def describe_feedback(counts: Counter, outbox: Path) -> str:
    found = ", ".join(f"{counts[k]} {k}{'s' if counts[k] != 1 else ''}" for k in (THUMBS_UP, PREFERRED, CORRECTED))
    unused = [f"{counts[k]} {k}" for k in ("thumbs-down", "duplicates", "invalid", "undecodable") if counts[k]]
    unused.append(f"{counts['interactions']} interactions (no judgement)")
    return f"{outbox}: {found}, from {counts['feedback events']} feedback events (not used: {', '.join(unused)})"


# --- tokens ---------------------------------------------------------------------------------


def tokenize(tokenizer, ex: Example) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of the whole conversation rendered by the chat template; labels
    are IGNORE except on each target answer, up to and including its end-of-turn token."""
    chat = ex.as_chat()
    full = _render(tokenizer, chat)
    labels = [IGNORE] * len(full)
    for i in ex.targets:
        prompt = chat_prompt_ids(tokenizer, chat[:i])  # what the generator sends: ends with the assistant header
        upto = _render(tokenizer, chat[: i + 1])
        if upto[: len(prompt)] != prompt or full[: len(upto)] != upto:
            raise SFTDataError(
                "the model's chat template renders a conversation differently from its prefix; "
                "SFT needs a template whose turns only append (as ChatML's)"
            )
        start, end = len(prompt), len(upto)
        # what follows the end-of-turn token (ChatML's newline) is never generated: no loss on it
        eos = tokenizer.eos_token_id
        if eos in full[start:end]:
            end = full.index(eos, start) + 1
        labels[start:end] = full[start:end]
    return full, labels


def _render(tokenizer, chat: list[dict[str, str]]) -> list[int]:
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=False, tokenize=True, return_dict=False)
    return [int(i) for i in ids]
