"""The `rlhf` command: run the stack, check it, prepare models, run one service."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

SERVICES = ("generator", "reward", "reference", "learner", "rollout", "gateway")


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):  # noqa: ARG001
    raise _Stop()


def _state_dir(args) -> Path:
    from rlhf.serving.settings import default_state_dir

    return Path(args.state_dir) if args.state_dir else default_state_dir()


def cmd_up(args) -> int:
    from rlhf.broker import EmbeddedBroker
    from rlhf.bus.admin import ensure_topics
    from rlhf.bus.topics import Topics
    from rlhf.launcher import Stack, default_specs, endpoints_file, write_endpoints

    signal.signal(signal.SIGTERM, _raise_stop)
    state_dir = _state_dir(args)
    env = {"RLHF_STATE_DIR": str(state_dir), "RLHF_LOG_FORMAT": "json", "RLHF_TOPIC_PREFIX": args.topic_prefix}
    broker = stack = None
    try:
        # 1. models: prepared once, then every service loads the same folder
        if args.tiny:
            from rlhf.models.tiny import build_tiny_model

            model = state_dir / "models" / "tiny"
            if not (model / "config.json").exists():
                print(f"building tiny random model in {model}")
                build_tiny_model(model)
            env["RLHF_REWARD_BACKBONE"] = "tiny"
        elif args.model == "demo":
            from rlhf.models.prepare import prepare_demo_model

            model = prepare_demo_model(progress=lambda m: print(f"[models] {m}", flush=True))
        else:
            model = Path(args.model)
        env["RLHF_MODEL"] = str(model)

        # 2. broker: embedded unless one is given
        if args.kafka_bootstrap:
            bootstrap = args.kafka_bootstrap
        else:
            broker = EmbeddedBroker(port=args.broker_port, log_path=state_dir / "logs" / "broker.log")
            broker.start()
            bootstrap = broker.bootstrap
        env["RLHF_KAFKA_BOOTSTRAP"] = bootstrap
        ensure_topics(bootstrap, Topics(args.topic_prefix).all())
        print(f"kafka      {bootstrap}", flush=True)

        # 3. services, then wait until every one reports SERVING
        specs = default_specs(base_port=args.base_port, metrics_base=args.metrics_base_port, http_port=args.http_port)
        stack = Stack(specs, env, state_dir / "logs")
        stack.start()
        print(f"starting {len(specs)} services (logs in {state_dir / 'logs'})", flush=True)
        stack.wait_healthy(args.timeout, progress=lambda m: print(m, flush=True))
        write_endpoints(state_dir, specs, bootstrap)
        print("\nall services SERVING:")
        for s in specs:
            extra = f"   metrics http://127.0.0.1:{s.metrics_port}/metrics" if not s.http else f"   web chat {s.url}/"
            print(f"  {s.name:<10} {s.url:<24}{extra}")
        print("\nCtrl-C or SIGTERM stops everything.", flush=True)
        while True:
            dead = stack.dead()
            if dead:
                print(f"service exited: {', '.join(dead)}; stopping", file=sys.stderr)
                for name in dead:
                    print(stack.log_tail(name), file=sys.stderr)
                return 1
            time.sleep(1)
    except (_Stop, KeyboardInterrupt):
        print("\nstopping...", flush=True)
        return 0
    except (RuntimeError, TimeoutError, OSError) as e:
        print(f"rlhf up failed: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if stack:
            stack.stop()
        if broker:
            broker.stop()
        endpoints_file(state_dir).unlink(missing_ok=True)
        print("stopped.", flush=True)


def cmd_status(args) -> int:
    from rlhf.launcher import default_specs, health, read_endpoints
    from rlhf.status import service_version

    specs = read_endpoints(_state_dir(args)) or default_specs()
    ok = True
    print(f"{'service':<10} {'address':<24} {'health':<12} version")
    for spec in specs:
        status = health(spec)
        ok &= status == "SERVING"
        version = service_version(spec) if status == "SERVING" else "-"
        print(f"{spec.name:<10} {spec.url:<24} {status:<12} {version}")
    return 0 if ok else 1


def cmd_health(args) -> int:
    """Exit 0 when the address reports SERVING: what container health checks run."""
    from rlhf.launcher import http_ready
    from rlhf.serving.client import check_health

    if args.http:
        status = http_ready(f"http://{args.address}", timeout=args.timeout)
    else:
        status = check_health(args.address, service=args.service, timeout=args.timeout)
    print(status)
    return 0 if status == "SERVING" else 1


def cmd_topics(args) -> int:
    from rlhf.bus.admin import ensure_topics
    from rlhf.bus.topics import Topics

    created = ensure_topics(args.kafka_bootstrap, Topics(args.topic_prefix).all(), partitions=args.partitions,
                            replication_factor=args.replication_factor)
    print(f"created {len(created)} topics" + (f": {', '.join(created)}" if created else " (all existed)"))
    return 0


def cmd_broker(args) -> int:
    from rlhf.broker import run_broker_forever
    from rlhf.bus.topics import Topics

    return run_broker_forever(args.host, args.port, topics=Topics(args.topic_prefix).all()) or 0


def cmd_models(args) -> int:
    if args.models_cmd == "prepare":
        from rlhf.models.prepare import prepare_demo_model

        path = prepare_demo_model(force=args.force, progress=lambda m: print(f"[models] {m}", flush=True))
        print(path)
        return 0
    from rlhf.models.tiny import build_tiny_model

    print(build_tiny_model(Path(args.out), seed=args.seed))
    return 0


def cmd_serve(args) -> int:
    import importlib

    return importlib.import_module(f"services.{args.service}.main").main(args.args)


def cmd_config(args) -> int:
    """Every setting of every service: env var, default, description."""
    import importlib

    from rlhf.serving.settings import CommonSettings

    classes = {
        "generator": "GeneratorSettings", "reward": "RewardSettings", "reference": "ReferenceSettings",
        "learner": "LearnerSettings", "rollout": "RolloutSettings", "gateway": "GatewaySettings",
    }
    print("# all services")
    for name, f in CommonSettings.model_fields.items():
        print(f"RLHF_{name.upper():<28} {f.get_default(call_default_factory=True)!s:<24} {f.description}")
    for svc, cls_name in classes.items():
        cls = getattr(importlib.import_module(f"services.{svc}.main"), cls_name)
        print(f"\n# {svc}")
        for name, f in cls.model_fields.items():
            if name in CommonSettings.model_fields:
                continue
            print(f"RLHF_{name.upper():<28} {f.get_default(call_default_factory=True)!s:<24} {f.description}")
    return 0


def cmd_simulate(args) -> int:
    from rlhf.sim.simulate import main

    return main(args)


def cmd_eval(args) -> int:
    from rlhf.sim.evaluate import main

    return main(args)


def cmd_experiment(args) -> int:
    from rlhf.sim.experiment import main_kl_sweep

    return main_kl_sweep(args)


def cmd_win_rate(args) -> int:
    from rlhf.sim.live import main

    return main(args)


def _sim_arguments(command: str):
    """A sub-command's flags, from rlhf.sim.cli_args (light: no torch at parse time)."""
    from rlhf.sim import cli_args

    return getattr(cli_args, f"{command}_arguments")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhf", description="Online RLHF serving loop")
    sub = p.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", help="start the broker and every service locally, wait until all are SERVING")
    up.add_argument("--model", default=os.environ.get("RLHF_MODEL", "demo"), help='"demo" (SmolLM2-135M-Instruct) or a model folder')
    up.add_argument("--tiny", action="store_true", help="tiny random models (seconds to start; for smoke tests)")
    up.add_argument("--kafka-bootstrap", default=None, help="use this Kafka instead of the embedded broker")
    up.add_argument("--broker-port", type=int, default=9092, help="port of the embedded broker")
    up.add_argument("--http-port", type=int, default=8000, help="gateway HTTP port")
    up.add_argument("--base-port", type=int, default=50051, help="first gRPC port (generator; the others follow)")
    up.add_argument("--metrics-base-port", type=int, default=9101, help="first /metrics port (the others follow)")
    up.add_argument("--topic-prefix", default="rlhf", help="prefix of every topic name")
    up.add_argument("--timeout", type=float, default=900, help="seconds to wait for every service to be SERVING")
    up.add_argument("--state-dir", default=None, help="checkpoints, weights, outbox, logs (default $RLHF_HOME/state)")
    up.set_defaults(fn=cmd_up)

    st = sub.add_parser("status", help="health, address and version of each service; exit 0 only if all SERVING")
    st.add_argument("--state-dir", default=None)
    st.set_defaults(fn=cmd_status)

    he = sub.add_parser("health", help="exit 0 if a service reports SERVING (gRPC health, or --http /readyz)")
    he.add_argument("address", help="HOST:PORT")
    he.add_argument("--service", default="", help="gRPC service name to check (default: the whole server)")
    he.add_argument("--http", action="store_true", help="an HTTP service (the gateway): GET /readyz")
    he.add_argument("--timeout", type=float, default=3.0)
    he.set_defaults(fn=cmd_health)

    tp = sub.add_parser("topics", help="create the loop's topics (idempotent)")
    tp.add_argument("--kafka-bootstrap", default=os.environ.get("RLHF_KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    tp.add_argument("--topic-prefix", default=os.environ.get("RLHF_TOPIC_PREFIX", "rlhf"))
    tp.add_argument("--partitions", type=int, default=1, help="partitions per topic (consumer replicas scale up to this)")
    tp.add_argument("--replication-factor", type=int, default=1)
    tp.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the broker")
    tp.set_defaults(fn=cmd_topics)

    br = sub.add_parser("broker", help="run the embedded Kafka-protocol broker (Tansu) in the foreground")
    br.add_argument("--host", default="127.0.0.1")
    br.add_argument("--port", type=int, default=9092)
    br.add_argument("--topic-prefix", default="rlhf", help="create the loop's topics under this prefix")
    br.set_defaults(fn=cmd_broker)

    md = sub.add_parser("models", help="prepare the demo model or build a tiny one")
    msub = md.add_subparsers(dest="models_cmd", required=True)
    pr = msub.add_parser("prepare", help="convert SmolLM2-135M-Instruct (GGUF) into a cached safetensors folder")
    pr.add_argument("--force", action="store_true", help="rebuild even if prepared")
    ti = msub.add_parser("tiny", help="build a tiny random model with the real tokenizer")
    ti.add_argument("out")
    ti.add_argument("--seed", type=int, default=0)
    md.set_defaults(fn=cmd_models)

    sv = sub.add_parser("serve", help="run one service in the foreground (flags go to the service)")
    sv.add_argument("service", choices=SERVICES)
    sv.add_argument("args", nargs=argparse.REMAINDER)
    sv.set_defaults(fn=cmd_serve)

    si = sub.add_parser("simulate", help="simulated users chat through the gateway and give oracle feedback")
    _sim_arguments("simulate")(si)
    si.set_defaults(fn=cmd_simulate)

    ev = sub.add_parser("eval", help="win-rate vs the reference, KL, RM accuracy of the served policy (run folder, plots)")
    _sim_arguments("eval")(ev)
    ev.set_defaults(fn=cmd_eval)

    ex = sub.add_parser("experiment", help="experiments: kl-sweep (one process), win-rate (against `rlhf up`)")
    exsub = ex.add_subparsers(dest="experiment", required=True)
    kl = exsub.add_parser("kl-sweep", help="β = 0 / moderate / large: reward hacking, the drift gate, rollback")
    _sim_arguments("kl_sweep")(kl)
    kl.set_defaults(fn=cmd_experiment)
    wr = exsub.add_parser("win-rate", help="against `rlhf up`: simulated feedback until the served policy beats the reference")
    _sim_arguments("win_rate")(wr)
    wr.set_defaults(fn=cmd_win_rate)

    cf = sub.add_parser("config", help="list every setting (environment variable, default, description)")
    cf.set_defaults(fn=cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
