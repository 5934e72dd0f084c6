"""Two versions served at once by one generator (issue 15), in-process on the tiny model with
the transformers backend: the stable version merged in the weights, a LoRA candidate applied
per row (rlhf/generation/adapters.py). A batch that mixes stable and candidate rows gives
each row the greedy tokens and log-probs (to ABS_TOL, as tests/unit/test_continuous_batching.py)
and the seeded samples it gets with its version served alone; loading a candidate drains no
stable request; promotion and dropping change what a version number means; a full-weight
candidate runs its rows on its own model copy in the same batches (and is refused, naming
the bytes needed and available, when memory does not cover the copy); what cannot be served
beside the stable version is refused with a reason."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf.generation import Generator, Limits, SampleOut, Sampling, make_backend
from rlhf.generation.adapters import RowAdapters
from rlhf.generation.gate import NotServed
from rlhf.generation.hf_backend import _Models
from rlhf.generation.types import WeightsRefused
from rlhf.models import build_tiny_model
from rlhf.testing.lora import make_random_lora
from rlhf.weightstore import WeightStore

ABS_TOL = 1e-4
PROMOTED = {"promoted": True}
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], list(range(300, 340)), [11, 12, 13, 14, 15, 16, 17]]
GREEDY = Sampling(temperature=0.0, max_tokens=24, ignore_eos=True)
SEEDED = Sampling(n=2, temperature=1.0, top_p=0.9, max_tokens=16, seed=5, ignore_eos=True)
STABLE_LORA, CANDIDATE, OTHER_CANDIDATE, FULL_OTHER = 1, 2, 3, 4


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """v1: a LoRA on q/v (rank 8); v2: a LoRA on q/k/v/o (rank 16), so the candidate's
    modules differ from the stable adapter's; v3: another LoRA; v4: other full weights."""
    tmp = tmp_path_factory.mktemp("canary")
    store = WeightStore(tmp / "weights")
    for version, seed, rank, targets in [
        (STABLE_LORA, 1, 8, ("q_proj", "v_proj")),
        (CANDIDATE, 2, 16, ("q_proj", "k_proj", "v_proj", "o_proj")),
        (OTHER_CANDIDATE, 3, 8, ("v_proj",)),
    ]:
        tensors, cfg = make_random_lora(
            tiny_model_dir, tmp / f"lora{version}", rank=rank, seed=seed, target_modules=targets
        )
        store.put(version, tensors, fmt="lora", adapter_config=cfg, meta=PROMOTED)
    other = build_tiny_model(tmp / "other", seed=1, initializer_range=0.2)
    store.put(FULL_OTHER, load_file(str(other / "model.safetensors")), meta=PROMOTED)
    return tmp


def run(model_dir: Path, store_dir: Path, tmp_path: Path, body, **backend):
    async def main():
        gen = Generator(
            make_backend("transformers", model_dir, **backend),
            model_dir,
            Limits(max_model_len=512, max_max_tokens=500),
            store_dir / "weights",
            tmp_path / "work",
        )
        await gen.start()
        try:
            return await body(gen)
        finally:
            await gen.stop()

    return asyncio.run(main())


async def collect(gen: Generator, ids: list[int], s: Sampling, version: int = 0) -> tuple[int, list[SampleOut]]:
    outs, served = [SampleOut(i) for i in range(s.n)], -1
    async with aclosing(gen.generate(ids, s, "t", version=version)) as stream:
        async for v, d in stream:
            served = v
            outs[d.index].add(d)
    return served, outs


def assert_same(got: list[SampleOut], want: list[SampleOut]) -> None:
    for a, b in zip(got, want, strict=True):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        worst = (torch.tensor(a.logprobs) - torch.tensor(b.logprobs)).abs().max().item()
        assert worst < ABS_TOL, f"log-probs differ by {worst:.2e}"


def mixed_forwards(monkeypatch) -> list[list[int]]:
    """Records the per-row adapter ids of every forward that mixed stable and candidate rows."""
    seen: list[list[int]] = []
    original = RowAdapters.rows

    def rows(self, ids):
        if ids is not None and bool((ids == 0).any()) and bool((ids != 0).any()):
            seen.append(ids.tolist())
        return original(self, ids)

    monkeypatch.setattr(RowAdapters, "rows", rows)
    return seen


async def alone(gen: Generator, version: int) -> list[list[SampleOut]]:
    """Every prompt, greedy and seeded, with `version` the only version served."""
    await gen.load_version(version)
    return [(await collect(gen, ids, s))[1] for ids in PROMPTS for s in (GREEDY, SEEDED)]


@pytest.mark.parametrize("stable", [0, STABLE_LORA], ids=["base-stable", "lora-stable"])
def test_a_mixed_batch_gives_each_row_what_its_version_gives_alone(
    tiny_model_dir, store_dir, tmp_path, monkeypatch, stable
):
    mixed = mixed_forwards(monkeypatch)

    async def body(gen):
        want = {CANDIDATE: await alone(gen, CANDIDATE), stable: await alone(gen, stable)}
        assert gen.candidate_version == 0
        await gen.load_candidate(CANDIDATE)
        assert (gen.version, gen.candidate_version) == (stable, CANDIDATE)
        # every request at once, versions alternating: one batch, rows of both versions
        jobs = [
            (ids, s, (CANDIDATE, stable)[(p + k) % 2])
            for p, ids in enumerate(PROMPTS)
            for k, s in enumerate((GREEDY, SEEDED))
        ]
        got = await asyncio.gather(*(collect(gen, ids, s, version=v) for ids, s, v in jobs))
        # a stable row running while candidate rows join it mid-batch, and the reverse
        joined = []
        for first, then in [(stable, CANDIDATE), (CANDIDATE, 0)]:
            long = Sampling(temperature=0.0, max_tokens=200, ignore_eos=True)
            running = asyncio.create_task(collect(gen, PROMPTS[0], long, version=first))
            while not gen.gate.active:
                await asyncio.sleep(0.001)
            late = await collect(gen, PROMPTS[1], GREEDY, version=then)
            assert not running.done(), "the running request ended before the joiner: make it longer"
            await running
            joined.append((then or stable, late))
        return want, jobs, got, joined

    want, jobs, got, joined = run(tiny_model_dir, store_dir, tmp_path, body)
    assert mixed, "no forward pass mixed stable and candidate rows"
    for i, ((_, _, version), (served, outs)) in enumerate(zip(jobs, got)):
        assert served == version
        assert_same(outs, want[version][i])
    for version, (served, outs) in joined:
        assert served == version
        assert_same(outs, want[version][2])  # PROMPTS[1], greedy
    assert want[CANDIDATE][0][0].token_ids != want[stable][0][0].token_ids  # the versions differ


def test_loading_a_candidate_drains_no_stable_request(tiny_model_dir, store_dir, tmp_path):
    async def body(gen):
        long = Sampling(temperature=0.0, max_tokens=400, ignore_eos=True)
        running = asyncio.create_task(collect(gen, PROMPTS[0], long))
        while not gen.gate.active:
            await asyncio.sleep(0.001)
        await gen.load_candidate(CANDIDATE)
        still_running = not running.done()
        served, outs = await running
        return still_running, served, len(outs[0].token_ids)

    still_running, served, n = run(tiny_model_dir, store_dir, tmp_path, body)
    assert still_running, "load_candidate waited for the stable request to end"
    assert (served, n) == (0, 400)


def test_promote_replace_and_drop_change_what_is_served(tiny_model_dir, store_dir, tmp_path):
    async def body(gen):
        ids = PROMPTS[3]
        await gen.load_version(CANDIDATE)
        _, cand_alone = await collect(gen, ids, GREEDY)
        await gen.load_version(OTHER_CANDIDATE)
        _, other_alone = await collect(gen, ids, GREEDY)
        await gen.load_version(0)
        await gen.load_candidate(CANDIDATE)
        gen.set_canary_share(0.25)
        assert gen.canary_share == 0.25
        with pytest.raises(NotServed, match=r"version 7 is not served .* stable v0 and candidate v2"):
            await collect(gen, ids, GREEDY, version=7)
        # a new candidate replaces the old one
        await gen.load_candidate(OTHER_CANDIDATE)
        with pytest.raises(NotServed):
            await collect(gen, ids, GREEDY, version=CANDIDATE)
        served, other = await collect(gen, ids, GREEDY, version=OTHER_CANDIDATE)
        assert served == OTHER_CANDIDATE
        assert_same(other, other_alone)
        # promotion: the candidate is the stable version, no candidate any more
        await gen.promote_candidate()
        assert (gen.version, gen.candidate_version, gen.canary_share) == (OTHER_CANDIDATE, 0, 0.0)
        served, promoted = await collect(gen, ids, GREEDY)
        assert served == OTHER_CANDIDATE
        assert_same(promoted, other_alone)
        # a candidate beside a LoRA stable version, then dropped: the stable serves alone
        await gen.load_candidate(CANDIDATE)
        _, cand = await collect(gen, ids, GREEDY, version=CANDIDATE)
        assert_same(cand, cand_alone)
        await gen.drop_candidate("test")
        with pytest.raises(NotServed):
            await collect(gen, ids, GREEDY, version=CANDIDATE)
        _, stable = await collect(gen, ids, GREEDY)
        assert_same(stable, other_alone)
        await asyncio.sleep(0.05)  # the dropped adapter is freed once its requests ended
        assert set(RowAdapters.of(gen.backend.model)._own) <= {gen.gate.candidate and gen.gate.candidate.handle}

    run(tiny_model_dir, store_dir, tmp_path, body)


def full_forwards(monkeypatch) -> list[list[int]]:
    """Records the per-row ids of every forward that ran rows on a full-weight candidate's
    copy beside stable rows (hf_backend._Models)."""
    seen: list[list[int]] = []
    original = _Models.__call__

    def call(self, *args, **kw):
        ids = self._ids
        if ids is not None and bool((ids < 0).any()) and bool((ids >= 0).any()):
            seen.append(ids.tolist())
        return original(self, *args, **kw)

    monkeypatch.setattr(_Models, "__call__", call)
    return seen


@pytest.mark.parametrize("stable", [0, STABLE_LORA], ids=["base-stable", "lora-stable"])
def test_a_full_weight_candidate_runs_on_its_own_copy_in_a_mixed_batch(
    tiny_model_dir, store_dir, tmp_path, monkeypatch, stable
):
    mixed = full_forwards(monkeypatch)

    async def body(gen):
        want = {FULL_OTHER: await alone(gen, FULL_OTHER), stable: await alone(gen, stable)}
        await gen.load_candidate(FULL_OTHER)
        assert (gen.version, gen.candidate_version) == (stable, FULL_OTHER)
        assert len(gen.backend._full) == 1
        jobs = [
            (ids, s, (FULL_OTHER, stable)[(p + k) % 2])
            for p, ids in enumerate(PROMPTS)
            for k, s in enumerate((GREEDY, SEEDED))
        ]
        got = await asyncio.gather(*(collect(gen, ids, s, version=v) for ids, s, v in jobs))
        # a stable row running while a candidate row joins it mid-batch
        long = Sampling(temperature=0.0, max_tokens=200, ignore_eos=True)
        running = asyncio.create_task(collect(gen, PROMPTS[0], long, version=stable))
        while not gen.gate.active:
            await asyncio.sleep(0.001)
        late = await collect(gen, PROMPTS[1], GREEDY, version=FULL_OTHER)
        assert not running.done(), "the running request ended before the joiner: make it longer"
        await running
        # promoted: its weights become the model's, its copy is freed, it serves as stable
        await gen.promote_candidate()
        assert (gen.version, gen.candidate_version, gen.backend._full) == (FULL_OTHER, 0, {})
        promoted = await collect(gen, PROMPTS[1], GREEDY)
        return want, jobs, got, late, promoted

    want, jobs, got, late, promoted = run(tiny_model_dir, store_dir, tmp_path, body)
    assert mixed, "no forward pass ran full-candidate and stable rows together"
    for i, ((_, _, version), (served, outs)) in enumerate(zip(jobs, got)):
        assert served == version
        assert_same(outs, want[version][i])
    for served, outs in (late, promoted):
        assert served == FULL_OTHER
        assert_same(outs, want[FULL_OTHER][2])  # PROMPTS[1], greedy
    assert want[FULL_OTHER][0][0].token_ids != want[stable][0][0].token_ids  # the versions differ


def test_a_full_weight_candidate_is_refused_when_memory_does_not_cover_a_copy(tiny_model_dir, store_dir, tmp_path):
    async def body(gen):
        need = gen.backend.candidate_bytes() + 2**30  # the default margin
        with pytest.raises(WeightsRefused, match="full-weight candidate: a second model copy needs") as err:
            await gen.load_candidate(FULL_OTHER)
        assert f"needs {need:,} bytes" in str(err.value) and f"{2**20:,} are available" in str(err.value)
        assert (gen.candidate_version, gen.backend._full) == (0, {})

    run(tiny_model_dir, store_dir, tmp_path, body, candidate_memory_limit_gib=1 / 1024)  # 1 MiB


def test_what_cannot_be_served_beside_the_stable_version_is_refused(tiny_model_dir, store_dir, tmp_path):
    async def body(gen):
        with pytest.raises(WeightsRefused, match="is the stable version"):
            await gen.load_candidate(0)
        await gen.load_candidate(CANDIDATE)
        # other full weights as the stable version end the candidate (it is a LoRA of v0)
        await gen.load_version(FULL_OTHER)
        assert (gen.version, gen.candidate_version) == (FULL_OTHER, 0)
        with pytest.raises(WeightsRefused, match="other full weights"):
            await gen.load_candidate(CANDIDATE)
        assert gen.candidate_version == 0

    run(tiny_model_dir, store_dir, tmp_path, body)
