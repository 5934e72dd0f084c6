"""rlhf.generation without a server: validation, the version gate, weight checks, streamed
receipt, text deltas with stop strings, and the transformers backend in-process."""

from __future__ import annotations

import asyncio
import hashlib
import json
from contextlib import aclosing
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlhf.generation import Generator, Limits, SampleOut, Sampling, Served, VersionGate, WeightsRefused, make_backend
from rlhf.generation.params import sampling_from
from rlhf.generation.text import TextTracker
from rlhf.generation.types import InvalidRequest, NotPublished
from rlhf.generation.weights import (
    Announced,
    check_full,
    check_lora,
    max_update_bytes,
    published,
    receive_stream,
    store_version,
    tensor_shapes,
    verify_sha256,
)
from rlhf.models import build_tiny_model, load_causal_lm, load_tokenizer, sequence_logprobs
from rlhf.testing.lora import make_random_lora
from rlhf.weightstore import WeightStore

PROMOTED = {"promoted": True}  # what the learner writes into a version the drift gate passed

LIMITS = Limits(max_model_len=100, default_max_tokens=20, max_max_tokens=50, max_n=4)


def sampling(**kw):
    args = dict(n=0, temperature=None, top_p=None, max_tokens=0, stop=[], seed=None, prompt_len=10, limits=LIMITS)
    return sampling_from(**(args | kw))


# --- params -------------------------------------------------------------------------------


def test_sampling_defaults():
    assert sampling() == Sampling(n=1, temperature=1.0, top_p=1.0, max_tokens=20, stop=(), seed=None)
    # the default never overflows the context: it shrinks to the room left
    assert sampling(prompt_len=95).max_tokens == 5


@pytest.mark.parametrize(
    "kw,field,limit",
    [
        (dict(n=5), "params.n", "4"),
        (dict(temperature=-0.1), "params.temperature", "2"),
        (dict(top_p=0.0), "params.top_p", "(0, 1]"),
        (dict(max_tokens=51), "params.max_tokens", "50"),
        (dict(max_tokens=40, prompt_len=70), "params.max_tokens", "at most 30"),
        (dict(prompt_len=100), "prompt", "max_model_len is 100"),
        (dict(stop=[""]), "params.stop", "64"),
    ],
)
def test_sampling_limits_name_field_and_limit(kw, field, limit):
    with pytest.raises(InvalidRequest) as e:
        sampling(**kw)
    assert e.value.field == field and limit in str(e.value)


# --- text ----------------------------------------------------------------------------------


def test_text_tracker_cuts_at_stop_strings_and_never_takes_back(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    ids = tok.encode("one two three. four", add_special_tokens=False)
    tracker, parts = TextTracker(tok, stop=(". f",)), []
    for t in ids:
        parts.append(tracker.push(t))
        if tracker.stopped:
            break
    parts.append(tracker.finish())
    assert "".join(parts) == "one two three" and tracker.stopped
    plain = TextTracker(tok)
    assert "".join([plain.push(t) for t in ids] + [plain.finish()]) == "one two three. four"


# --- version gate --------------------------------------------------------------------------


def test_gate_drains_in_flight_and_holds_new_requests():
    async def scenario():
        gate, log = VersionGate(Served(0, "full")), []

        async def request(name: str, hold: float):
            async with gate.lease() as served:
                log.append((name, "start", served.version))
                await asyncio.sleep(hold)
                log.append((name, "end", served.version))

        async def swap():
            async with gate.drained():
                log.append(("swap", "start", gate.active))
                gate.set(Served(1, "full"))

        first = asyncio.create_task(request("a", 0.05))
        await asyncio.sleep(0.01)
        swapping = asyncio.create_task(swap())
        await asyncio.sleep(0.01)
        late = asyncio.create_task(request("b", 0.0))  # arrives while the swap waits for "a"
        await asyncio.gather(first, swapping, late)
        return log

    assert asyncio.run(scenario()) == [
        ("a", "start", 0),
        ("a", "end", 0),
        ("swap", "start", 0),
        ("b", "start", 1),
        ("b", "end", 1),
    ]


# --- weight checks -------------------------------------------------------------------------


def test_check_full_names_missing_unknown_and_wrong_shapes(tiny_model_dir, tmp_path):
    files = [tiny_model_dir / "model.safetensors"]
    base = tensor_shapes(files)
    check_full(files, base, tied=True)
    state = load_file(str(files[0]))
    name = "model.layers.0.mlp.up_proj.weight"
    for label, edit, needle in [
        ("missing", lambda s: s.pop(name), "missing ['model.layers.0.mlp.up_proj.weight']"),
        ("unknown", lambda s: s.update({"extra.weight": torch.zeros(1)}), "unknown ['extra.weight']"),
        ("shape", lambda s: s.update({name: torch.zeros(3, 3)}), f"tensor {name} has shape [3, 3]"),
    ]:
        bad = dict(state)
        edit(bad)
        save_file(bad, str(tmp_path / f"{label}.safetensors"))
        with pytest.raises(WeightsRefused, match=needle.replace("[", r"\[").replace("]", r"\]")):
            check_full([tmp_path / f"{label}.safetensors"], base, tied=True)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsRefused, match="not a readable safetensors"):
        check_full([tmp_path / "junk.safetensors"], base, tied=True)


def test_check_lora_rank_and_shapes(tiny_model_dir, tmp_path):
    base = tensor_shapes([tiny_model_dir / "model.safetensors"])
    make_random_lora(tiny_model_dir, tmp_path / "a", rank=8)
    spec = check_lora(tmp_path / "a", base, max_rank=16)
    assert spec.rank == 8 and spec.scale == 2.0 and "model.layers.0.self_attn.q_proj" in spec.modules
    with pytest.raises(WeightsRefused, match="rank r=8 is outside 1..4"):
        check_lora(tmp_path / "a", base, max_rank=4)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg | {"r": 4}))
    with pytest.raises(WeightsRefused, match="do not fit"):
        check_lora(tmp_path / "a", base, max_rank=16)


def test_receive_stream_checks_size_and_sha(tmp_path):
    data = b"x" * 1000
    read = []

    async def chunks():
        for i in range(0, len(data), 300):
            read.append(i)
            yield data[i : i + 300]

    async def endless():
        while True:
            read.append(1)
            yield b"y" * (1 << 20)

    def receive(**kw):
        args = dict(
            header_version=3,
            fmt="full",
            sha256=hashlib.sha256(data).hexdigest(),
            total_bytes=len(data),
            adapter_config_json="",
            data=chunks(),
            work_dir=tmp_path,
            max_bytes=2000,
        )
        return asyncio.run(receive_stream(**(args | kw)))

    folder = receive()
    assert (folder / "model.safetensors").read_bytes() == data
    with pytest.raises(WeightsRefused, match="sha256 mismatch"):
        receive(sha256="ab" * 32)
    with pytest.raises(WeightsRefused, match="total_bytes=999"):
        receive(total_bytes=999)
    # refused on the header: not one block of the stream is read, not one byte written
    read.clear()
    with pytest.raises(WeightsRefused, match="header.adapter_config_json"):
        receive(fmt="lora", data=endless())
    with pytest.raises(WeightsRefused, match="header.adapter_config_json: not JSON"):
        receive(fmt="lora", adapter_config_json="{r: 8", data=endless())
    with pytest.raises(WeightsRefused, match="header.total_bytes: required"):
        receive(total_bytes=0, data=endless())
    with pytest.raises(WeightsRefused, match="header.total_bytes: 2001 is over 2000"):
        receive(total_bytes=2001, data=endless())
    assert read == []
    # a stream longer than it announced stops at the first block past the total
    with pytest.raises(WeightsRefused, match="more than header.total_bytes=1500"):
        receive(total_bytes=1500, data=endless())
    assert len(read) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # refused folders are removed


def test_update_size_caps_come_from_the_model(tiny_model_dir, tmp_path):
    base = tensor_shapes([tiny_model_dir / "model.safetensors"])
    full_file = (tiny_model_dir / "model.safetensors").stat().st_size  # fp32, the model it replaces
    cap = max_update_bytes("full", base, "", 16)
    assert full_file <= cap < full_file * 1.5
    _, cfg = make_random_lora(tiny_model_dir, tmp_path / "lora", rank=8, seed=1)
    adapter = (tmp_path / "lora" / "adapter_model.safetensors").stat().st_size
    lora_cap = max_update_bytes("lora", base, json.dumps(cfg), 16)
    assert adapter <= lora_cap < cap
    assert max_update_bytes("lora", base, json.dumps(cfg | {"r": 2}), 16) < lora_cap  # the bound follows r
    for bad, needle in [(cfg | {"r": 32}, "outside 1..16"), (cfg | {"r": "8"}, "outside 1..16"), ({}, "integer r")]:
        with pytest.raises(WeightsRefused, match=needle):
            max_update_bytes("lora", base, json.dumps(bad), 16)
    with pytest.raises(WeightsRefused, match="needs it"):
        max_update_bytes("lora", base, "", 16)


def test_only_versions_the_learner_published_are_served(tiny_model_dir, tmp_path):
    tensors = load_file(str(tiny_model_dir / "model.safetensors"))
    store = WeightStore(tmp_path / "w")
    ok = store.put(1, tensors, meta={"promoted": True, "reason": ""})
    store.put(2, tensors, meta={"promoted": False, "reason": "KL 9.1 exceeds budget 5.0"})
    store.put(3, tensors)  # no verdict at all: not published either
    assert published(store, 1, {}) == (ok.sha256, "full")
    with pytest.raises(NotPublished, match=r"not promoted \(KL 9.1 exceeds budget 5.0\)"):
        published(store, 2, {})
    with pytest.raises(NotPublished, match="not promoted"):
        published(store, 3, {})
    with pytest.raises(NotPublished, match="version 999999 was never published"):  # with a store, only the store counts
        published(store, 999999, {999999: Announced("ab" * 32, "full")})
    with pytest.raises(WeightsRefused, match="version: must be ≥ 0"):
        published(store, -1, {})
    # no weight store here (a remote generator): what the follower saw announced is the lineage
    remote = WeightStore(tmp_path / "absent")
    assert published(remote, 7, {7: Announced("cd" * 32, "lora")}) == ("cd" * 32, "lora")
    with pytest.raises(NotPublished, match="has no weight store"):
        published(remote, 8, {7: Announced("cd" * 32, "lora")})
    # a malformed manifest names its file and field
    (store.folder(4)).mkdir()
    (store.folder(4) / "manifest.json").write_text("not json")
    with pytest.raises(WeightsRefused, match="v000004/manifest.json is not JSON"):
        published(store, 4, {})


def test_store_version_names_the_digests_to_check_and_the_uri(tiny_model_dir, tmp_path):
    store = WeightStore(tmp_path / "w")
    record = store.put(5, load_file(str(tiny_model_dir / "model.safetensors")), meta=PROMOTED)
    update = store_version(store, 5, sha256="AB" * 32)
    assert (update.version, update.fmt, update.folder) == (5, "full", Path(record.path))
    assert update.sha256 == (record.sha256, "AB" * 32)
    assert store_version(store, 5, uri=f"file://{record.path}").folder == Path(record.path)
    verify_sha256(update.files[0], record.sha256)
    with pytest.raises(WeightsRefused, match="sha256 mismatch"):
        verify_sha256(update.files[0], *update.sha256)
    # a uri outside this generator's store is refused: it serves only what the learner published there
    elsewhere = WeightStore(tmp_path / "elsewhere")
    elsewhere.put(5, load_file(str(tiny_model_dir / "model.safetensors")), meta=PROMOTED)
    with pytest.raises(WeightsRefused, match="uri: .* is not version 5's folder"):
        store_version(store, 5, uri=str(elsewhere.folder(5)))
    with pytest.raises(WeightsRefused, match="is not version 6's folder"):
        store_version(store, 6, uri=record.path)
    with pytest.raises(NotPublished, match="version 7 was never published"):
        store_version(store, 7)


def test_a_corrupt_store_version_is_refused_and_version_0_keeps_serving(tiny_model_dir, tmp_path):
    store = WeightStore(tmp_path / "weights")
    record = store.put(3, load_file(str(tiny_model_dir / "model.safetensors")), meta=PROMOTED)
    with open(record.weights_path, "r+b") as f:  # flip one byte after the manifest was written
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))

    async def body(gen):
        with pytest.raises(WeightsRefused, match="sha256 mismatch"):
            await gen.load_version(3)
        return gen.version

    assert run_generator(tiny_model_dir, tmp_path, body) == 0


# --- transformers backend, in-process ------------------------------------------------------


def run_generator(model_dir: Path, tmp_path: Path, body):
    async def main():
        gen = Generator(
            make_backend("transformers", model_dir),
            model_dir,
            Limits(max_model_len=256),
            tmp_path / "weights",
            tmp_path / "work",
        )
        await gen.start()
        try:
            return await body(gen)
        finally:
            await gen.stop()

    return asyncio.run(main())


async def collect(gen: Generator, ids: list[int], s: Sampling) -> tuple[int, list[SampleOut]]:
    outs, version = [SampleOut(i) for i in range(s.n)], -1
    async with aclosing(gen.generate(ids, s, "t")) as stream:
        async for chunk_version, d in stream:
            version = chunk_version
            outs[d.index].add(d)
    return version, outs


def test_seeded_sampling_repeats_and_samples_differ(tiny_model_dir, tmp_path):
    async def body(gen):
        ids = gen.chat_ids([{"role": "user", "content": "hi"}])
        s = Sampling(n=3, temperature=1.0, top_p=0.8, max_tokens=12, seed=11)
        _, a = await collect(gen, ids, s)
        _, b = await collect(gen, ids, s)
        return a, b

    a, b = run_generator(tiny_model_dir, tmp_path, body)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert len({tuple(x.token_ids) for x in a}) == 3


def test_merged_lora_matches_peft_and_base_is_restored(tiny_model_dir, tmp_path):
    """The transformers backend merges an adapter into the weights (W + α/r·BA); its log-probs
    must equal peft's unmerged forward on the initial weights, also when a full version
    served before it, and going back to version 0 must restore the base."""
    from peft import PeftModel

    tensors, cfg = make_random_lora(tiny_model_dir, tmp_path / "lora", rank=8, seed=1)
    store = WeightStore(tmp_path / "weights")
    store.put(1, tensors, fmt="lora", adapter_config=cfg, meta=PROMOTED)
    other = build_tiny_model(tmp_path / "other", seed=1, initializer_range=0.2)
    store.put(2, load_file(str(other / "model.safetensors")), meta=PROMOTED)

    async def body(gen):
        ids = gen.chat_ids([{"role": "user", "content": "hi"}])
        greedy = Sampling(temperature=0.0, max_tokens=16)
        _, base = await collect(gen, ids, greedy)
        await gen.load_version(2)
        await gen.load_version(1)
        v1, lora = await collect(gen, ids, greedy)
        await gen.load_version(0)
        v0, again = await collect(gen, ids, greedy)
        return ids, base[0], (v1, lora[0]), (v0, again[0])

    ids, base, (v1, lora), (v0, again) = run_generator(tiny_model_dir, tmp_path, body)
    peft_model = PeftModel.from_pretrained(load_causal_lm(tiny_model_dir), tmp_path / "lora").eval()
    ref = sequence_logprobs(peft_model, ids, lora.token_ids)
    assert v1 == 1 and (ref - torch.tensor(lora.logprobs)).abs().max() < 1e-4
    assert lora.token_ids != base.token_ids
    assert (v0, again.token_ids, again.logprobs) == (0, base.token_ids, base.logprobs)


def test_closing_a_request_early_frees_its_lease(tiny_model_dir, tmp_path):
    async def body(gen):
        ids = gen.chat_ids([{"role": "user", "content": "hi"}])
        async with aclosing(gen.generate(ids, Sampling(temperature=0.0, max_tokens=40), "early")) as stream:
            async for _ in stream:
                break
        assert gen.gate.active == 0
        # a swap does not wait for the abandoned request, and the next one runs normally
        await asyncio.wait_for(gen.load_version(0), timeout=30)
        return await collect(gen, ids, Sampling(temperature=0.0, max_tokens=5))

    version, outs = run_generator(tiny_model_dir, tmp_path, body)
    assert version == 0 and len(outs[0].token_ids) == 5


def test_priority_out_of_range_is_refused_with_the_limit():
    with pytest.raises(InvalidRequest) as e:
        sampling(priority=101)
    assert e.value.field == "params.priority" and "100" in str(e.value)
    assert sampling(priority=10).priority == 10


@pytest.mark.parametrize(
    ("preemption", "order"),
    [
        (False, ["background-running", "person", "background-1", "background-2"]),
        # pre-emption parks the running background row while the person's chat decodes
        (True, ["person", "background-running", "background-1", "background-2"]),
    ],
)
def test_waiting_people_go_before_queued_background_work(tiny_model_dir, preemption, order):
    """max_batch=1: one request decodes at a time. While a long background request runs,
    two more background requests queue, then a priority-0 one (a person's chat): it must be
    the next to run, ahead of the background ones that arrived before it, which keep their
    arrival order; with pre-emption it does not even wait for the running one."""
    from rlhf.generation.hf_backend import TransformersBackend

    async def body():
        backend = TransformersBackend(tiny_model_dir, max_batch=1, batch_wait_ms=1, preemption=preemption)
        await backend.start()
        finished: list[str] = []
        first_token = asyncio.Event()

        async def run(name: str, priority: int, max_tokens: int):
            s = Sampling(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, priority=priority)
            async for _ in backend.generate([1, 2, 3], s, name, None):
                first_token.set()
            finished.append(name)

        try:
            long = asyncio.create_task(run("background-running", 10, 200))
            await first_token.wait()
            queued = [asyncio.create_task(run("background-1", 10, 2))]
            await asyncio.sleep(0.01)
            queued.append(asyncio.create_task(run("background-2", 10, 2)))
            await asyncio.sleep(0.01)
            queued.append(asyncio.create_task(run("person", 0, 2)))
            assert not long.done(), "the running request ended before the others queued: make it longer"
            await asyncio.gather(long, *queued)
        finally:
            await backend.stop()
        return finished

    assert asyncio.run(body()) == order


def test_the_follower_believes_only_what_the_store_confirms(tiny_model_dir, tmp_path):
    """PolicyFollower.check on real (unstarted) generators: with a weight store, an event must
    match a promoted manifest; without one, a well-formed announcement joins the lineage
    that UpdateWeights is checked against."""
    from rlhf.generation.follower import PolicyFollower
    from rlhf.v1 import common_pb2, events_pb2

    def follower(store_root: Path) -> PolicyFollower:
        gen = Generator(
            make_backend("transformers", tiny_model_dir),
            tiny_model_dir,
            Limits(max_model_len=256),
            store_root,
            tmp_path / "work",
        )
        return PolicyFollower(gen, bootstrap="127.0.0.1:1", topic="unused")

    def event(**kw):
        return events_pb2.PolicyUpdate(
            **{"action": events_pb2.POLICY_ACTION_PROMOTED, "format": common_pb2.WEIGHT_FORMAT_FULL, **kw}
        )

    store = WeightStore(tmp_path / "weights")
    tensors = load_file(str(tiny_model_dir / "model.safetensors"))
    good = store.put(1, tensors, meta=PROMOTED)
    store.put(2, tensors, meta={"promoted": False})
    f = follower(store.root)
    assert f.check(event(version=1, sha256=good.sha256)) is None
    assert f.check(event(version=0)) is None  # the initial weights, no store entry
    for ev, reason in [
        (event(version=-1, sha256=good.sha256), "negative_version"),
        (event(version=999999, sha256=good.sha256), "not_in_store"),
        (event(version=2, sha256=store.get(2).sha256), "not_promoted"),
        (event(version=1, sha256="0" * 64), "sha256_mismatch"),
        (event(version=1, sha256=good.sha256, format=common_pb2.WEIGHT_FORMAT_LORA), "format_mismatch"),
    ]:
        assert f.check(ev)[0] == reason, reason
    assert f.gen.announced == {}

    remote = follower(tmp_path / "no-store-here")
    assert remote.check(event(version=7, sha256="AB" * 32)) is None
    assert remote.check(event(version=8, sha256="short"))[0] == "bad_sha256"
    assert remote.gen.announced == {7: Announced("ab" * 32, "full")}
    assert published(remote.gen.store, 7, remote.gen.announced) == ("ab" * 32, "full")
