"""Generation throughput through our gRPC service vs the raw engine, and weight-swap latency.

    .venv/bin/python benchmarks/generation.py                      # both backends, demo model (SmolLM2-135M)
    .venv/bin/python benchmarks/generation.py --backends transformers --rounds 3
    .venv/bin/python benchmarks/generation.py --model tiny --rounds 1  # a smoke run in a minute

Throughput: the same 16 chat prompts (from the bundled prompt set) × exactly 64 new tokens
(ignore_eos), sampled at temperature 1 with per-token log-probs. "Raw" is the engine the
service wraps, driven in this process: HF `model.generate` on the left-padded batch
(top_k=0, min_new_tokens=64) or vLLM `LLM.generate` (same engine arguments as the service,
logprobs=0 as the service asks). "Service" is the generator from its real entrypoint, sent
the 16 prompts as 16 concurrent `Generate` calls from an asyncio client; the time runs from
the first call to the last answer. Raw and service rounds alternate, and so does which of
the two goes first in a round, so both see the same machine load; each figure is the median
of the rounds, and each round's figure and the load average are printed as it ends.

Swap latency: the service swaps a weight-store version in (LoadVersion: sha256 check,
name/shape check, load into the engine), or receives it over gRPC (UpdateWeights: stream,
sha256, checks, load), measured at the client; "raw load" reads the same file into tensors
in this process (`safetensors.torch.load(path.read_bytes())`: every byte read, as a swap
must; `load_file` alone only maps the file and reads nothing yet). A LoRA adapter: rank 8 on q/v (random, peft layout).

Batching (transformers backend): two generators from the real entrypoint, one with
`RLHF_BATCHING=static` and one with `continuous`, each sent the same mixed-length load:
`--clients` (32, = max_batch) asyncio clients, each sending 3 Generate calls back to back,
call k of client c asking for exactly LENGTHS[(c + k) % 5] new tokens (8 … 128, ignore_eos,
temperature 1) after prompt (c + k) % 16 of the prompt set. Throughput is all completion
tokens over the time from the first call to the last answer; the two services' rounds
alternate, median of the rounds.

    .venv/bin/python benchmarks/generation.py --sections batching --model tiny --rounds 1

Hardware ceiling (`--sections hardware`, on by default): this box's measured matmul FLOP/s
(fp32, and bf16 where the CPU has native bf16 or on CUDA; the best of a few 2048² products)
and memory bandwidth (a 256 MB tensor copy: bytes read + written over the time), turned into
the most tokens/s a decode step could give a batch of B rows: each step reads every weight
once (weight bytes / bandwidth) and does 2 · params · B FLOPs (/ FLOP/s); the step can be no
faster than the slower of the two, so the ceiling is B / max(both). KV-cache reads, attention
and sampling are left out (the ceiling is generous); each throughput row is printed as a
fraction of it. Peak RSS: each service's process tree (/proc VmHWM, vLLM's engine core
included), and the raw engines' (this process and its children other than the services).

Prints markdown tables; docs/generation.md records them.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

N_PROMPTS, NEW_TOKENS = 16, 64
LENGTHS = (8, 16, 32, 64, 128)  # mixed-length load: new tokens per call, cycled
CALLS_PER_CLIENT = 3
CONTROL_TOKEN = secrets.token_urlsafe(16)  # the benchmark's generator needs one for LoadVersion/UpdateWeights


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) of process `pid` and of every process below it, summed,
    in MB, from /proc (Linux). Shared pages (torch's libraries, a model file mapped by two
    processes) count in each process that maps them, so the sum is an upper bound."""
    total = 0.0
    for p in process_tree(pid):
        total += proc_status_kb(p, "VmHWM") / 1024
    return total


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (from /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def proc_status_kb(pid: int, field: str) -> int:
    """A `kB` field of /proc/<pid>/status (VmHWM: peak RSS, VmRSS: RSS now); 0 once gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def self_peak_rss_mb() -> float:
    """This process's peak RSS in MB (`resource.getrusage`: ru_maxrss is in kB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def raw_rss_mb(services: list["Service"]) -> float:
    """Peak RSS of this process and its children, the services' process trees left out: the
    raw engine run in-process (vLLM's engine core is a child)."""
    skip = {q for svc in services for q in process_tree(svc.stack.procs[svc.spec.name].pid)}
    return sum(proc_status_kb(q, "VmHWM") / 1024 for q in process_tree(os.getpid()) if q not in skip)


# --- the hardware's ceiling -----------------------------------------------------------


def hardware_limits(device: str = "cpu") -> dict:
    """Measured matmul FLOP/s per dtype and memory bandwidth (bytes/s) of `device`."""
    import torch

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def best(fn, reps: int) -> float:
        fn()  # warm-up
        sync()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return min(times)

    dtypes = [torch.float32]
    if device == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported():
        dtypes.append(torch.bfloat16)
    n = 2048
    flops = {}
    for dt in dtypes:
        a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
        flops[str(dt).removeprefix("torch.")] = 2 * n**3 / best(lambda a=a, b=b: a @ b, 5)
    src = torch.ones(64 << 20, device=device)  # 256 MB of fp32
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / best(lambda: dst.copy_(src), 5)
    return {"flops": flops, "bandwidth": bandwidth}


def decode_ceiling(limits: dict, params: int, weight_bytes: int, batch: int, dtype: str = "float32") -> float:
    """The most tokens/s decode steps of `batch` rows could give: B / max(weight bytes read per
    step / bandwidth, 2 · params · B FLOPs per step / FLOP/s)."""
    step = max(weight_bytes / limits["bandwidth"], 2 * params * batch / limits["flops"][dtype])
    return batch / step


def model_size(model_dir: Path) -> tuple[int, int]:
    """(parameters, bytes) of the model's safetensors weights (tied lm_head counted once)."""
    from safetensors import safe_open

    params = size = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                t = st.get_slice(k)
                count = 1
                for d in t.get_shape():
                    count *= d
                params += count
                size += count * {"F32": 4, "BF16": 2, "F16": 2}.get(t.get_dtype(), 4)
    return params, size


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompt_ids(model_dir: Path) -> list[list[int]]:
    from rlhf.models import chat_prompt_ids, load_tokenizer
    from rlhf.rollout import TRAIN, load_prompts

    tok = load_tokenizer(model_dir)
    return [chat_prompt_ids(tok, r["messages"]) for r in load_prompts(TRAIN)[:N_PROMPTS]]


# --- raw engines ----------------------------------------------------------------------


class RawHF:
    name = "HF generate"

    def __init__(self, model_dir: Path):
        import torch

        from rlhf.models import load_causal_lm, load_tokenizer

        self.torch = torch
        self.model = load_causal_lm(model_dir)
        self.pad = load_tokenizer(model_dir).pad_token_id

    def run(self, prompts: list[list[int]]) -> int:
        torch = self.torch
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
        with torch.no_grad():
            out = self.model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                pad_token_id=self.pad,
            )
        return int((out.shape[1] - width) * len(prompts))


class RawVllm:
    name = "vLLM LLM.generate"

    def __init__(self, model_dir: Path, engine_kwargs: dict):
        import vllm

        self.vllm = vllm
        self.llm = vllm.LLM(**engine_kwargs)

    def run(self, prompts: list[list[int]]) -> int:
        vllm = self.vllm
        params = vllm.SamplingParams(temperature=1.0, top_p=1.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
        outs = self.llm.generate([vllm.TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)


# --- the service ----------------------------------------------------------------------


class Service:
    def __init__(self, backend: str, model_dir: Path, work: Path, extra_env: dict[str, str], name: str = ""):
        from rlhf.launcher import ServiceSpec, Stack

        name = name or backend  # two services of one backend at once need two names
        self.spec = ServiceSpec(f"generator-{name}", "services.generator", free_port(), 0)
        env = {
            "RLHF_MODEL": str(model_dir),
            "RLHF_BACKEND": backend,
            "RLHF_FOLLOW_POLICY_UPDATES": "false",
            "RLHF_PORT": str(self.spec.port),
            "RLHF_METRICS_PORT": "0",
            "RLHF_STATE_DIR": str(work / name),
            "RLHF_WEIGHT_STORE": str(work / "weights"),
            "RLHF_LOG_FORMAT": "text",
            "RLHF_DRAIN_SECONDS": "1",
            "RLHF_CONTROL_TOKEN": CONTROL_TOKEN,
            **extra_env,
        }
        self.stack = Stack([self.spec], env, work / f"logs-{name}", drain_seconds=1)

    def __enter__(self):
        self.stack.start()
        t0 = time.perf_counter()
        self.stack.wait_healthy(900, progress=lambda _m: None)
        self.start_s = time.perf_counter() - t0
        return self

    def __exit__(self, *exc):
        self.peak_rss_mb = self.rss_mb()
        self.stack.stop()

    def rss_mb(self) -> float:
        """Peak RSS so far of the service's process tree (the vLLM engine core included)."""
        proc = self.stack.procs[self.spec.name]
        return peak_rss_mb(proc.pid)

    def run(self, prompts: list[list[int]]) -> int:
        return asyncio.run(self._run(prompts))

    async def _run(self, prompts: list[list[int]]) -> int:
        from rlhf.serving.client import aio_channel
        from rlhf.v1 import common_pb2, generation_pb2, generation_pb2_grpc

        async with aio_channel(self.spec.address) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            params = generation_pb2.SamplingParams(temperature=1.0, top_p=1.0, max_tokens=NEW_TOKENS, ignore_eos=True)
            calls = [
                stub.Generate(
                    generation_pb2.GenerateRequest(prompt_token_ids=common_pb2.TokenIds(ids=p), params=params),
                    timeout=600,
                )
                for p in prompts
            ]
            return sum(r.usage.completion_tokens for r in await asyncio.gather(*calls))

    def run_mixed(self, prompts: list[list[int]], clients: int) -> int:
        return asyncio.run(self._run_mixed(prompts, clients))

    async def _run_mixed(self, prompts: list[list[int]], clients: int) -> int:
        from rlhf.serving.client import aio_channel
        from rlhf.v1 import common_pb2, generation_pb2, generation_pb2_grpc

        async with aio_channel(self.spec.address) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)

            async def client(c: int) -> int:
                tokens = 0
                for k in range(CALLS_PER_CLIENT):
                    new = LENGTHS[(c + k) % len(LENGTHS)]
                    params = generation_pb2.SamplingParams(temperature=1.0, max_tokens=new, ignore_eos=True)
                    ids = common_pb2.TokenIds(ids=prompts[(c + k) % len(prompts)])
                    r = await stub.Generate(
                        generation_pb2.GenerateRequest(prompt_token_ids=ids, params=params), timeout=900
                    )
                    assert r.usage.completion_tokens == new, (r.usage.completion_tokens, new)
                    tokens += new
                return tokens

            return sum(await asyncio.gather(*(client(c) for c in range(clients))))

    def stub(self):
        from rlhf.serving.client import sync_channel
        from rlhf.v1 import generation_pb2_grpc

        return generation_pb2_grpc.GenerationServiceStub(
            sync_channel(self.spec.address, max_message_mb=1024, control_token=CONTROL_TOKEN)
        )


def timed(fn, *args) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = fn(*args)
    return time.perf_counter() - t0, n


def throughput(raw, service: Service, prompts: list[list[int]], rounds: int) -> dict:
    """Median tok/s of each arm. Rounds alternate the order (raw first, then service first):
    on a loaded box the second arm of a pair otherwise always meets what the first left behind
    (another engineer's job starting, the page cache, the other engine's idle threads)."""
    raw.run(prompts[:2]), service.run(prompts[:2])  # warm-up: first-call costs are not throughput
    rates: dict[str, list[float]] = {"raw": [], "service": []}
    arms = {"raw": raw.run, "service": service.run}
    for i in range(rounds):
        for arm in ("raw", "service") if i % 2 == 0 else ("service", "raw"):
            dt, n = timed(arms[arm], prompts)
            assert n == N_PROMPTS * NEW_TOKENS, n
            rates[arm].append(n / dt)
            print(f"  round {i} {arm}: {n / dt:.1f} tok/s, load average {os.getloadavg()[0]:.1f}", flush=True)
    return {arm: statistics.median(v) for arm, v in rates.items()} | {"rounds": rates}


def vllm_engine_kwargs(model_dir: Path, enforce_eager: bool) -> dict:
    """The raw engine's arguments: the service's own (`VllmBackend.engine_kwargs`, with the
    service's settings from `Service`), so raw and service differ only in what wraps the
    engine. An earlier copy by hand had max_loras 2 against the service's 3."""
    from rlhf.generation.vllm_backend import VllmBackend

    return VllmBackend(
        model_dir, max_model_len=2048, max_batch=32, dtype="float32", max_lora_rank=16, enforce_eager=enforce_eager
    ).engine_kwargs


def swap_latency(service: Service, store, versions: dict, rounds: int) -> dict:
    """Median client-side seconds of each kind of swap, and of the raw load of the same file."""
    from safetensors.torch import load as read_tensors

    from rlhf.v1 import common_pb2, generation_pb2

    stub = service.stub()
    full = store.get(versions["full"])
    lora = store.get(versions["lora"])
    data = full.weights_path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    chunk = 4 << 20

    def stream(version: int):
        yield generation_pb2.WeightChunk(
            header=generation_pb2.WeightHeader(
                version=version, format=common_pb2.WEIGHT_FORMAT_FULL, sha256=sha, total_bytes=len(data)
            )
        )
        for i in range(0, len(data), chunk):
            yield generation_pb2.WeightChunk(data=data[i : i + chunk])

    def load(version: int) -> float:
        t0 = time.perf_counter()
        stub.LoadVersion(generation_pb2.LoadVersionRequest(version=version), timeout=600)
        return time.perf_counter() - t0

    out = {k: [] for k in ("lora", "full", "stream", "raw_full", "raw_lora")}
    load(0)
    for _ in range(rounds):
        out["lora"].append(load(versions["lora"]))
        load(0)
        out["full"].append(load(versions["full"]))
        load(0)
        t0 = time.perf_counter()
        stub.UpdateWeights(stream(versions["full"]), timeout=600)  # a published version: the only kind accepted
        out["stream"].append(time.perf_counter() - t0)
        load(0)
        out["raw_full"].append(timed(lambda: read_tensors(full.weights_path.read_bytes()))[0])
        out["raw_lora"].append(timed(lambda: read_tensors(lora.weights_path.read_bytes()))[0])
    return {k: statistics.median(v) for k, v in out.items()} | {
        "full_mb": len(data) / 1e6,
        "lora_mb": lora.weights_path.stat().st_size / 1e6,
    }


def batching(model_dir: Path, work: Path, prompts: list[list[int]], clients: int, rounds: int) -> dict:
    """tok/s of the mixed-length load on a static and a continuous transformers generator."""
    env = {"RLHF_MAX_MODEL_LEN": "2048", "RLHF_MAX_BATCH": str(clients)}
    modes = ("static", "continuous")
    with (
        Service("transformers", model_dir, work, env | {"RLHF_BATCHING": "static"}, name="static") as static,
        Service("transformers", model_dir, work, env | {"RLHF_BATCHING": "continuous"}, name="continuous") as cont,
    ):
        services = dict(zip(modes, (static, cont)))
        for svc in services.values():
            svc.run(prompts[:2])  # warm-up
        out: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(rounds):
            for mode, svc in services.items():
                dt, n = timed(svc.run_mixed, prompts, clients)
                out[mode].append(n / dt)
                print(f"batching {mode}: {n} tokens in {dt:.1f} s = {n / dt:.1f} tok/s", flush=True)
    return {m: statistics.median(v) for m, v in out.items()}


# --- main -----------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo", help='"demo" (SmolLM2-135M-Instruct), "tiny", or a folder')
    ap.add_argument("--backends", default="transformers,vllm")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--vllm-enforce-eager", default="true", choices=["true", "false"])
    ap.add_argument(
        "--sections",
        default="hardware,throughput,batching",
        help="hardware (the ceiling), throughput (and swaps, per backend), batching",
    )
    ap.add_argument("--clients", type=int, default=32, help="batching: concurrent clients (= max_batch)")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="bench-generation-"))
    try:
        run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # a few GB: versions, received streams


def run(args, work: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from rlhf.models import build_tiny_model, resolve_model
    from rlhf.testing.lora import make_random_lora
    from rlhf.weightstore import WeightStore

    model_dir = build_tiny_model(work / "tiny") if args.model == "tiny" else resolve_model(args.model)
    prompts = prompt_ids(model_dir)
    # swap targets: a full version (the same weights, perturbed) and a LoRA adapter
    store = WeightStore(work / "weights")
    base = load_file(str(model_dir / "model.safetensors"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        store.put(1, {k: v + 1e-3 * torch.randn_like(v) for k, v in base.items()}, meta={"promoted": True})
    del base
    tensors, cfg = make_random_lora(model_dir, work / "lora", rank=8, seed=0)
    store.put(2, tensors, fmt="lora", adapter_config=cfg, meta={"promoted": True})  # generators serve only these

    print(
        f"model {model_dir} · {N_PROMPTS} prompts × {NEW_TOKENS} new tokens · median of {args.rounds} rounds · "
        f"torch threads {torch.get_num_threads()}\n"
    )
    sections = set(args.sections.split(","))
    ceiling = None
    if "hardware" in sections:
        limits = hardware_limits()
        params, weight_bytes = model_size(model_dir)
        ceiling = {b: decode_ceiling(limits, params, weight_bytes, b) for b in (1, N_PROMPTS, args.clients)}
        flops = ", ".join(f"{dt} {v / 1e9:.0f} GFLOP/s" for dt, v in limits["flops"].items())
        print(
            f"hardware: matmul {flops}; memory bandwidth {limits['bandwidth'] / 1e9:.1f} GB/s (copy); "
            f"model {params / 1e6:.1f} M parameters, {weight_bytes / 1e6:.0f} MB\n"
        )
        print("| decode batch | weights read per step (ms) | FLOPs per step (ms) | ceiling tok/s |")
        print("|---:|---:|---:|---:|")
        for b, c in ceiling.items():
            print(
                f"| {b} | {1e3 * weight_bytes / limits['bandwidth']:.1f} | "
                f"{1e3 * 2 * params * b / limits['flops']['float32']:.1f} | {c:.0f} |"
            )
        print()
    results = []
    for backend in args.backends.split(",") if "throughput" in sections else []:
        env = {"RLHF_VLLM_ENFORCE_EAGER": args.vllm_enforce_eager, "RLHF_MAX_MODEL_LEN": "2048", "RLHF_MAX_BATCH": "32"}
        with Service(backend, model_dir, work, env) as service:
            if backend == "vllm":
                raw = RawVllm(model_dir, vllm_engine_kwargs(model_dir, args.vllm_enforce_eager == "true"))
            else:
                raw = RawHF(model_dir)
            tp = throughput(raw, service, prompts, args.rounds)
            tp["service_rss_mb"], tp["raw_rss_mb"] = service.rss_mb(), raw_rss_mb([service])
            print(
                f"{backend}: raw {raw.name} {tp['raw']:.1f} tok/s, service {tp['service']:.1f} tok/s "
                f"(ratio of medians {tp['service'] / tp['raw']:.3f}), service start {service.start_s:.0f} s, "
                f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}",
                flush=True,
            )
            sw = swap_latency(service, store, {"full": 1, "lora": 2}, args.rounds)
            print(f"{backend}: swaps {json.dumps({k: round(v, 4) for k, v in sw.items()})}", flush=True)
            results.append((backend, raw.name, tp, service.start_s, sw))
            del raw

    if results:
        print_throughput(results, ceiling and ceiling[N_PROMPTS])
    if "batching" in sections:
        tp = batching(model_dir, work, prompts, args.clients, args.rounds)
        print(
            f"\nmixed lengths {LENGTHS} × {CALLS_PER_CLIENT} calls per client, {args.clients} clients, "
            f"max_batch {args.clients}\n"
        )
        top = ceiling and ceiling[args.clients]
        print(f"| transformers batching | mixed-length tok/s | vs static | of the {args.clients}-row ceiling |")
        print("|---|---:|---:|---:|")
        for mode, v in tp.items():
            print(f"| {mode} | {v:.1f} | {v / tp['static']:.2f}× | {f'{v / top:.1%}' if top else '–'} |")


def print_throughput(results: list, ceiling: float | None) -> None:
    print(
        "\n| backend | raw engine | raw tok/s | service tok/s | service / raw | raw, service of the "
        f"{N_PROMPTS}-row ceiling | service start (s) | peak RSS raw, service (MB) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for backend, name, tp, start, _ in results:
        of = f"{tp['raw'] / ceiling:.1%}, {tp['service'] / ceiling:.1%}" if ceiling else "–"
        print(
            f"| {backend} | {name} | {tp['raw']:.1f} | {tp['service']:.1f} | "
            f"{tp['service'] / tp['raw']:.2f} | {of} | {start:.0f} | "
            f"{tp['raw_rss_mb']:.0f}, {tp['service_rss_mb']:.0f} |"
        )
    print()
    print(
        "| backend | LoRA swap (s) | full swap, store (s) | full swap, gRPC stream (s) | raw read full (s) "
        "| full swap / raw | raw read LoRA (s) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for backend, _, _, _, s in results:
        print(
            f"| {backend} | {s['lora']:.3f} | {s['full']:.2f} | {s['stream']:.2f} | {s['raw_full']:.2f} | "
            f"{s['full'] / s['raw_full']:.1f} | {s['raw_lora']:.4f} |"
        )
    sw = results[0][4]
    print(f"\nfull weights {sw['full_mb']:.0f} MB, LoRA adapter {sw['lora_mb']:.1f} MB")


if __name__ == "__main__":
    main()
