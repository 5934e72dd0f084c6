"""What gRPC costs the reward and reference services, and how fast the RM trains.

    .venv/bin/python benchmarks/reward_reference.py                          # MiniLM RM, SmolLM2-135M reference
    .venv/bin/python benchmarks/reward_reference.py --reward-backbone tiny --reference-model tiny   # seconds

Starts an embedded broker and the two services as real processes (loopback), and loads
the same weights in this process. For each round, the same batch goes once through gRPC
(Score / LogProbs: protobuf, the micro-batcher, the worker thread) and once straight to
the model in-process (RewardModel.score / ReferenceModel.logprobs), alternating so both
see the same machine load; overhead = gRPC time / direct time − 1. "Concurrent" splits
the batch over C clients at once, which the micro-batcher merges back into model calls.
RM training: OnlineRewardTrainer steps in-process on synthetic comparisons, and the
service end to end (publish N Feedback events to the broker → pairs_seen reaches N).
Prints markdown tables (docs/reward.md records them).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from rlhf.broker import EmbeddedBroker  # noqa: E402
from rlhf.bus import EventProducer, Topics, ensure_topics  # noqa: E402
from rlhf.launcher import ServiceSpec, Stack  # noqa: E402
from rlhf.reward import OnlineRewardTrainer, TrainerConfig, load_reward_model, messages_of, resolve_backbone  # noqa: E402
from rlhf.serving.client import sync_channel  # noqa: E402
from rlhf.testing.preferences import SyntheticPreference  # noqa: E402
from rlhf.v1 import common_pb2, reference_pb2, reference_pb2_grpc, reward_pb2, reward_pb2_grpc  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(grpc_fn, direct_fn, rounds: int, warmup: int = 2) -> tuple[float, float]:
    """Median seconds per call of each, alternating calls."""
    for _ in range(warmup):
        grpc_fn(), direct_fn()
    g, d = [], []
    for _ in range(rounds):
        g.append(timed(grpc_fn))
        d.append(timed(direct_fn))
    return statistics.median(g), statistics.median(d)


def concurrent(fn, parts: list, clients: int, rounds: int) -> float:
    """Median seconds for `clients` threads to send one part each, all at once."""
    times = []
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(fn, parts))  # warm-up
        for _ in range(rounds):
            times.append(timed(lambda: list(pool.map(fn, parts))))
    return statistics.median(times)


def requests_per_call(spec: ServiceSpec, name: str) -> tuple[float, float]:
    """(sum, count) of the service's rlhf_batcher_batch_requests histogram."""
    import re
    import urllib.request

    body = urllib.request.urlopen(f"http://127.0.0.1:{spec.metrics_port}/metrics", timeout=5).read().decode()

    def get(suffix: str) -> float:
        return float(re.search(rf'^rlhf_batcher_batch_requests_{suffix}{{name="{name}"}} (\S+)$', body, re.M).group(1))

    return get("sum"), get("count")


def concurrent_row(spec, name, fn, parts, args) -> tuple[float, float]:
    """(median seconds of the concurrent rounds, mean requests merged per model call)."""
    s0, c0 = requests_per_call(spec, name)
    seconds = concurrent(fn, parts, args.clients, args.rounds)
    s1, c1 = requests_per_call(spec, name)
    return seconds, (s1 - s0) / max(1.0, c1 - c0)


def split(xs: list, n: int) -> list[list]:
    k = -(-len(xs) // n)
    return [xs[i : i + k] for i in range(0, len(xs), k)]


def row(name: str, unit: str, g: float, d: float, work: float, merged: float | None = None) -> str:
    note = f" ({merged:.1f} calls per model call)" if merged is not None else ""
    return f"| {name}{note} | {work / g:,.1f} {unit} | {work / d:,.1f} {unit} | {100 * (g / d - 1):+.1f}% |"


def bench_reward(args, spec: ServiceSpec) -> list[str]:
    gen = SyntheticPreference(seed=7)
    pairs = [gen.pair() for _ in range(args.score_pairs)]
    items = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    stub = reward_pb2_grpc.RewardServiceStub(sync_channel(spec.address))

    def request(part):
        return reward_pb2.ScoreRequest(
            items=[reward_pb2.ScoreItem(prompt=[common_pb2.ChatMessage(**m) for m in p], response=r) for p, r in part]
        )

    whole = request(items)
    model = load_reward_model(resolve_backbone(args.reward_backbone, cache_dir=None), max_tokens=args.reward_max_tokens)
    prompts, texts = [messages_of(p) for p, _ in items], [r for _, r in items]
    g, d = interleaved(
        lambda: stub.Score(whole, timeout=120), lambda: model.score(prompts, texts, batch_size=64), args.rounds
    )
    parts = [request(x) for x in split(items, args.clients)]
    c, merged = concurrent_row(spec, "reward", lambda r: stub.Score(r, timeout=120), parts, args)
    n = len(pairs)
    return [
        row(f"Score, {2 * n} items in 1 call", "pairs/s", g, d, n),
        row(f"Score, {2 * n} items over {args.clients} concurrent calls", "pairs/s", c, d, n, merged),
    ]


def bench_reference(args, spec: ServiceSpec, model_dir: str, batching: str) -> list[str]:
    from rlhf.reference import ReferenceModel

    g = torch.Generator().manual_seed(0)
    ref = ReferenceModel(model_dir, batching=batching)
    vocab = ref.vocab_size
    lengths = [
        (int(torch.randint(16, 49, (1,), generator=g)), int(torch.randint(16, 65, (1,), generator=g)))
        for _ in range(args.logprob_items)
    ]
    prompts = [torch.randint(0, vocab, (p,), generator=g).tolist() for p, _ in lengths]
    responses = [torch.randint(0, vocab, (r,), generator=g).tolist() for _, r in lengths]
    tokens = sum(p + r for p, r in lengths)
    stub = reference_pb2_grpc.ReferenceServiceStub(sync_channel(spec.address))

    def request(idx):
        return reference_pb2.LogProbsRequest(
            items=[
                reference_pb2.LogProbsItem(prompt_token_ids=prompts[i], response_token_ids=responses[i]) for i in idx
            ]
        )

    whole = request(range(len(prompts)))
    gt, dt = interleaved(
        lambda: stub.LogProbs(whole, timeout=300), lambda: ref.logprobs(prompts, responses), args.rounds
    )
    parts = [request(x) for x in split(list(range(len(prompts))), args.clients)]
    c, merged = concurrent_row(spec, "reference", lambda r: stub.LogProbs(r, timeout=300), parts, args)
    b = batching
    return [
        row(f"LogProbs ({b}), {len(prompts)} items / {tokens} tokens in 1 call", "tokens/s", gt, dt, tokens),
        row(f"LogProbs ({b}), same over {args.clients} concurrent calls", "tokens/s", c, dt, tokens, merged),
    ]


def bench_training(args, reward: ServiceSpec, topics: Topics, bootstrap: str) -> list[str]:
    """Alternating rounds of `train_pairs` comparisons: in-process trainer, then the service."""
    gen = SyntheticPreference(seed=11)
    model = load_reward_model(resolve_backbone(args.reward_backbone, cache_dir=None), max_tokens=args.reward_max_tokens)
    trainer = OnlineRewardTrainer(model, TrainerConfig(lr=args.lr, train_batch_size=16))
    list(trainer.train(trainer.ingest([gen.comparison_event() for _ in range(32)]).examples))  # replay buffer warm
    stub = reward_pb2_grpc.RewardServiceStub(sync_channel(reward.address))
    pairs_seen = lambda: stub.GetInfo(reward_pb2.RewardInfoRequest(), timeout=10).pairs_seen  # noqa: E731
    n, direct, service = args.train_pairs, [], []
    with EventProducer(bootstrap) as producer:
        for _ in range(args.train_rounds):
            # in-process: the trainer alone, every step 16 new + 16 replayed pairs
            examples = trainer.ingest([gen.comparison_event() for _ in range(n)]).examples
            direct.append(timed(lambda examples=examples: list(trainer.train(examples))))
            # the service: broker → consumer → de-dup → steps (versions, swaps) → pairs_seen
            start, events = pairs_seen(), [gen.comparison_event() for _ in range(n)]
            t0 = time.perf_counter()
            producer.publish_many([(topics.feedback, e, e.conversation_id) for e in events])
            while pairs_seen() < start + n:
                time.sleep(0.05)
            service.append(time.perf_counter() - t0)
            time.sleep(1.5)  # let the idle checkpoint finish outside the next round
    d, s = statistics.median(direct), statistics.median(service)
    return [
        f"| RM training, in-process (16 new + 16 replayed pairs per step) | {n / d:,.1f} pairs/s |",
        f"| RM training, service end to end (publish to Kafka → trained) | {n / s:,.1f} pairs/s |",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reward-backbone", default="minilm", help="minilm | tiny | a folder")
    ap.add_argument("--reward-max-tokens", type=int, default=128, help="RM truncation length")
    ap.add_argument("--reference-model", default="demo", help="demo | tiny | a folder")
    ap.add_argument("--score-pairs", type=int, default=32, help="pairs per Score batch (2 items each)")
    ap.add_argument("--logprob-items", type=int, default=16, help="(prompt, response) items per LogProbs batch")
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients for the batched rows")
    ap.add_argument("--rounds", type=int, default=10, help="timed calls per row (median reported)")
    ap.add_argument("--train-pairs", type=int, default=128, help="comparisons per training round")
    ap.add_argument("--train-rounds", type=int, default=3, help="training rounds per row (median reported)")
    ap.add_argument("--lr", type=float, default=2e-5, help="RM learning rate")
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch threads, here and in each service (1: a shared 2-core box thrashes with more)",
    )
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    torch.set_num_threads(args.torch_threads)

    work = Path(tempfile.mkdtemp(prefix="bench-rr-"))
    model_dir = args.reference_model
    if model_dir == "tiny":
        from rlhf.models import build_tiny_model

        model_dir = str(build_tiny_model(work / "tiny-policy"))
    elif model_dir == "demo":
        from rlhf.models import resolve_model

        model_dir = str(resolve_model("demo"))

    broker = EmbeddedBroker(log_path=work / "broker.log")
    broker.start()
    topics = Topics("bench")
    ensure_topics(broker.bootstrap, topics.all())
    reward = ServiceSpec("reward", "services.reward", free_port(), free_port())
    references = {
        b: ServiceSpec(f"reference-{b}", "services.reference", free_port(), free_port()) for b in ("exact", "padded")
    }
    common = {
        "RLHF_STATE_DIR": str(work / "state"),
        "RLHF_KAFKA_BOOTSTRAP": broker.bootstrap,
        "RLHF_TOPIC_PREFIX": topics.prefix,
        "RLHF_LOG_FORMAT": "text",
    }
    reward.env.update(
        {
            "RLHF_PORT": str(reward.port),
            "RLHF_METRICS_PORT": str(reward.metrics_port),
            "RLHF_REWARD_BACKBONE": args.reward_backbone,
            "RLHF_REWARD_MAX_TOKENS": str(args.reward_max_tokens),
            "RLHF_REWARD_LR": str(args.lr),
            "RLHF_REWARD_MAX_ITEMS": "1024",
            "RLHF_REWARD_TORCH_THREADS": str(args.torch_threads),
        }
    )
    for batching, spec in references.items():
        spec.env.update(
            {
                "RLHF_PORT": str(spec.port),
                "RLHF_METRICS_PORT": str(spec.metrics_port),
                "RLHF_MODEL": model_dir,
                "RLHF_REFERENCE_BATCHING": batching,
                "RLHF_REFERENCE_TORCH_THREADS": str(args.torch_threads),
            }
        )
    stack = Stack([reward, *references.values()], common, work / "logs", drain_seconds=2)
    try:
        stack.start()
        stack.wait_healthy(timeout=300, progress=lambda *_: None)
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
            f"RM backbone {args.reward_backbone} (max {args.reward_max_tokens} tokens), "
            f"reference {args.reference_model}; median of {args.rounds} rounds\n"
        )
        print("| path | through gRPC | direct in-process | gRPC overhead |")
        print("|---|---|---|---|")
        for line in bench_reward(args, reward):
            print(line, flush=True)
        for batching, spec in references.items():
            for line in bench_reference(args, spec, model_dir, batching):
                print(line, flush=True)
        print("\n| RM training | throughput |")
        print("|---|---|")
        for line in bench_training(args, reward, topics, broker.bootstrap):
            print(line, flush=True)
    finally:
        stack.stop()
        broker.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
