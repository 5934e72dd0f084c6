"""`rlhf sft`: supervised fine-tuning (InstructGPT's stage 1) of a local causal LM on chat
examples, LoRA or full, resumable, ending in a merged model folder for `rlhf up --model`.

    OUT/                      the model folder (rlhf.models.export.write_model_folder)
    OUT/.sft-checkpoint/      trainable.safetensors (adapter or all weights), optimizer.pt,
                              rng.pt, state.json (step, run fingerprint, losses)

The loss is the token-mean NLL of the assistant answers (rlhf.sft.data.tokenize). The data
order is a function of (seed, step) alone, so a run resumed from its checkpoint takes the
same batches, with the same optimizer state, as one that was never stopped.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from rlhf.sft.config import SFTConfig
from rlhf.sft.data import IGNORE, Example, SFTDataError, tokenize

CHECKPOINT = ".sft-checkpoint"
# fields a resumed run must share with its checkpoint (steps, save_every, eval_every may change)
_SAME_RUN = (
    "base_model",
    "data_sha256",
    "lora",
    "lora_r",
    "lora_alpha",
    "lora_target_modules",
    "lr",
    "batch_size",
    "eval_fraction",
    "max_length",
    "seed",
)


@dataclass
class SFTResult:
    out: Path
    step: int
    resumed_from: int  # 0: a fresh run
    done_already: bool = False  # the folder was complete; nothing trained
    n_train: int = 0
    n_eval: int = 0
    eval_loss_before: float | None = None  # token-mean NLL (nats) on the held-out answers
    eval_loss_after: float | None = None
    tokens_per_s: float = 0.0  # tokens through forward+backward per second, this process
    losses: list[float] = field(default_factory=list)  # train loss of each step of this process
    held_out: list[Example] = field(default_factory=list)


def split(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Seeded (train, held-out); held-out gets round(fraction·n), at least 1 when n ≥ 2."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = 0 if len(examples) < 2 or eval_fraction <= 0 else max(1, round(eval_fraction * len(examples)))
    n_eval = min(n_eval, len(examples) - 1)
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


def _batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """The examples of optimizer step `step` (0-based): epochs of seeded permutations."""
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(k, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perm[pos]))
    return out


def _collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, ...]:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, L) right-padded
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)  # (B, L)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, L) 1 = real token
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids, labels, mask


def answer_nll(lm, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(summed NLL over the labelled tokens, their count). Logits only where a label is: the
    49k-word head over every position would be most of the cost."""
    hidden = lm.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, H)
    target = labels[:, 1:]  # (B, L-1): position t predicts token t+1
    keep = target != IGNORE
    logits = lm.get_output_embeddings()(hidden[:, :-1][keep])  # (N, V)
    return F.cross_entropy(logits.float(), target[keep], reduction="sum"), int(keep.sum())


@torch.no_grad()
def eval_loss(lm, rows: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int) -> float | None:
    """Token-mean NLL (nats) of the held-out answers; None without held-out examples."""
    if not rows:
        return None
    was_training = lm.training
    lm.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        s, n = answer_nll(lm, *_collate(rows[i : i + batch_size], pad_id))
        total, count = total + s.item(), count + n
    lm.train(was_training)
    return total / max(count, 1)


def run_sft(
    examples: list[Example],
    base_model: Path,
    out: Path,
    cfg: SFTConfig,
    data_label: str = "",
    say: Callable[[str], None] = print,
    progress_bar: bool = True,
) -> SFTResult:
    """Train (or resume, or find done) and write the merged model folder `out`."""
    from tqdm import tqdm

    from rlhf.models import runtime
    from rlhf.models.export import INFO_FILE, write_model_folder
    from rlhf.models.loading import load_causal_lm, load_tokenizer

    out, base_model = Path(out).expanduser(), Path(base_model)
    ckpt = out / CHECKPOINT
    _check_out(out, base_model)
    tokenizer = load_tokenizer(base_model)
    pad_id = runtime.pad_id(tokenizer)
    rows, too_long = [], 0
    for ex in examples:
        ids, labels = tokenize(tokenizer, ex)
        if len(ids) > cfg.max_length:
            too_long += 1
            continue
        rows.append((ex, ids, labels))
    if too_long:
        say(f"left out {too_long} examples longer than max_length={cfg.max_length} tokens")
    if not rows:
        raise SFTDataError(f"no example fits max_length={cfg.max_length} tokens")
    train, held = split([r[0] for r in rows], cfg.eval_fraction, cfg.seed)
    tok_of = {id(ex): (ids, labels) for ex, ids, labels in rows}
    train_rows = [tok_of[id(ex)] for ex in train]
    eval_rows = [tok_of[id(ex)] for ex in held]
    fingerprint = {
        **{k: v for k, v in asdict(cfg).items() if k in _SAME_RUN},
        "lr": cfg.learning_rate(),
        "lora_target_modules": list(cfg.lora_target_modules),
        "base_model": str(base_model.resolve()),
        "data_sha256": _data_sha(train_rows + eval_rows),
    }

    state = _read_state(ckpt)
    if state is not None:
        differs = [k for k in _SAME_RUN if state["fingerprint"].get(k) != fingerprint[k]]
        if differs:
            k = differs[0]
            raise SFTDataError(
                f"{out} holds a checkpoint of another run ({k}: checkpoint "
                f"{state['fingerprint'].get(k)!r}, now {fingerprint[k]!r}); pass the same options, "
                f"another --out, or remove {ckpt}"
            )
        info = json.loads((out / INFO_FILE).read_text()) if (out / INFO_FILE).is_file() else {}
        if state["step"] >= cfg.steps and info.get("step") == state["step"]:
            say(
                f"rlhf sft: already done: {out} holds the model after {state['step']} steps "
                f"(pass --steps > {state['step']} to train further)"
            )
            return SFTResult(
                out,
                state["step"],
                state["step"],
                done_already=True,
                n_train=len(train_rows),
                n_eval=len(eval_rows),
                eval_loss_before=state.get("eval_loss_before"),
                eval_loss_after=state.get("eval_loss_last"),
            )

    # 1. model: the base, LoRA-wrapped or not; the checkpoint's weights and optimizer if resuming
    torch.manual_seed(cfg.seed)
    lm = load_causal_lm(base_model)
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        lm = get_peft_model(
            lm,
            LoraConfig(
                r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=list(cfg.lora_target_modules)
            ),
        )
    params = [p for p in lm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate(), weight_decay=0.0)
    step, resumed_from = 0, 0
    if state is not None:
        _load_checkpoint(ckpt, lm, opt, cfg.lora)
        step = resumed_from = state["step"]
        say(f"resuming from step {step} of the checkpoint in {ckpt}")
    else:
        state = {"fingerprint": fingerprint, "step": 0, "eval_losses": [], "train_losses": []}
    inner = lm.get_base_model() if cfg.lora else lm
    n_params = sum(p.numel() for p in params)
    say(
        f"sft {data_label}: {len(train_rows)} train / {len(eval_rows)} held-out examples, "
        f"{'LoRA r=' + str(cfg.lora_r) if cfg.lora else 'full'} ({n_params / 1e6:.2f} M trainable), "
        f"lr {cfg.learning_rate():g}, batch {cfg.batch_size}, steps {step}->{cfg.steps}"
    )

    def evaluate() -> float | None:
        loss = eval_loss(inner, eval_rows, pad_id, cfg.batch_size)
        if loss is not None:
            state["eval_losses"].append([step, loss])
            state["eval_loss_last"] = loss
        return loss

    if step == 0:
        state["eval_loss_before"] = evaluate()
        if state["eval_loss_before"] is not None:
            say(f"held-out loss before: {state['eval_loss_before']:.4f}")

    # 2. the loop
    result = SFTResult(
        out,
        step,
        resumed_from,
        n_train=len(train_rows),
        n_eval=len(eval_rows),
        eval_loss_before=state.get("eval_loss_before"),
        held_out=held,
    )
    lm.train()
    tokens, t0 = 0, time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=step, desc="sft", unit="step", disable=not progress_bar, mininterval=1.0)
    try:
        while step < cfg.steps:
            ids, labels, mask = _collate(
                [train_rows[i] for i in _batch_indices(step, len(train_rows), cfg.batch_size, cfg.seed)], pad_id
            )
            nll, n = answer_nll(inner, ids, labels, mask)
            loss = nll / max(n, 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            step += 1
            tokens += int(mask.sum())
            result.losses.append(loss.item())
            state["train_losses"].append([step, loss.item()])
            result.tokens_per_s = tokens / (time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{result.tokens_per_s:.0f}")
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                bar.write(f"step {step}: held-out loss {evaluate():.4f}")
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                state["step"] = step
                _save_checkpoint(ckpt, lm, opt, cfg.lora, state)
    except KeyboardInterrupt:
        bar.close()
        state["step"] = step
        _save_checkpoint(ckpt, lm, opt, cfg.lora, state)
        say(f"interrupted at step {step}/{cfg.steps}; checkpoint saved in {ckpt}: run the same command to resume")
        raise
    bar.close()

    # 3. checkpoint, held-out loss, merged folder
    state["step"] = result.step = step
    result.eval_loss_after = evaluate()
    _save_checkpoint(ckpt, lm, opt, cfg.lora, state)
    merged = lm.merge_and_unload() if cfg.lora else lm
    info = {
        "source": "rlhf sft",
        "base_model": str(base_model.resolve()),
        "data": data_label,
        "step": step,
        "n_train": len(train_rows),
        "n_eval": len(eval_rows),
        "config": {**asdict(cfg), "lr": cfg.learning_rate()},
        "eval_loss_before": state.get("eval_loss_before"),
        "eval_loss_after": result.eval_loss_after,
    }
    write_model_folder(merged.eval(), tokenizer, out, info, keep=(CHECKPOINT,))
    if result.eval_loss_after is not None:
        say(f"held-out loss: {state.get('eval_loss_before'):.4f} -> {result.eval_loss_after:.4f}")
    say(f"{step} steps, {result.tokens_per_s:.0f} tokens/s; model folder {out} (rlhf up --model {out})")
    return result


def _check_out(out: Path, base_model: Path) -> None:
    """Refuse an --out that would replace something that is not ours: write_model_folder
    replaces the whole folder."""
    if out.resolve() == base_model.resolve():
        raise SFTDataError(f"--out {out} is the base model's folder; pass a new folder")
    if out.exists() and not out.is_dir():
        raise SFTDataError(f"--out {out} is a file; pass a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / CHECKPOINT).is_dir():
        raise SFTDataError(f"--out {out} holds files not written by rlhf sft; pass a new or empty folder")


def _data_sha(rows: list[tuple[list[int], list[int]]]) -> str:
    h = hashlib.sha256()
    for ids, labels in rows:
        h.update(json.dumps([ids, labels]).encode())
    return h.hexdigest()


def _read_state(ckpt: Path) -> dict | None:
    from rlhf.models._fs import is_complete

    if not is_complete(ckpt):
        return None
    return json.loads((ckpt / "state.json").read_text())


def _save_checkpoint(ckpt: Path, lm, opt: torch.optim.Optimizer, lora: bool, state: dict) -> None:
    from safetensors.torch import save_file

    from rlhf.models._fs import atomic_folder

    if lora:
        from peft import get_peft_model_state_dict

        tensors = get_peft_model_state_dict(lm)
    else:
        tensors = lm.state_dict()
        if lm.config.tie_word_embeddings:  # the embedding matrix, a second time
            tensors.pop("lm_head.weight", None)
    # clones: safetensors refuses tensors sharing memory
    tensors = {k: v.detach().clone().contiguous() for k, v in tensors.items()}
    with atomic_folder(ckpt) as tmp:
        save_file(tensors, str(tmp / "trainable.safetensors"))
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state))


def _load_checkpoint(ckpt: Path, lm, opt: torch.optim.Optimizer, lora: bool) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(ckpt / "trainable.safetensors"))
    if lora:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(lm, tensors)
    else:
        missing, unexpected = lm.load_state_dict(tensors, strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise SFTDataError(
                f"{ckpt}: the checkpoint does not fit the base model (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}); remove it to start over"
            )
        lm.tie_weights()
    opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    rng = torch.load(ckpt / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
