"""The `rlhf` command: run the stack, check it, prepare models, run one service."""

from __future__ import annotations

import argparse
import os
import signal
import sys
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
    """Preflight (model folder, state-dir lock, ports), then broker, topics, services,
    supervised until Ctrl-C/SIGTERM or a crash loop. Each failure is one line on stderr."""
    from rlhf.launcher import default_specs
    from rlhf.preflight import PreflightError, StateDirLock, check_model_dir, check_ports, planned_ports

    state_dir = _state_dir(args)
    specs = default_specs(base_port=args.base_port, metrics_base=args.metrics_base_port, http_port=args.http_port)
    try:
        model = None if args.tiny or args.model == "demo" else check_model_dir(args.model)
        with StateDirLock(state_dir):
            check_ports(planned_ports(specs, None if args.kafka_bootstrap else args.broker_port))
            return _run_stack(args, state_dir, specs, model)
    except PreflightError as e:
        print(f"rlhf up: {e}", file=sys.stderr)
        return 1


def _run_stack(args, state_dir: Path, specs, model: Path | None) -> int:
    from rlhf.broker import BrokerError, EmbeddedBroker
    from rlhf.bus.admin import BrokerUnavailable, ensure_topics
    from rlhf.bus.topics import Topics
    from rlhf.launcher import CrashLoop, RestartPolicy, Stack, endpoints_file, write_endpoints
    from rlhf.preflight import control_token
    from rlhf.profile import resolve

    signal.signal(signal.SIGTERM, _raise_stop)
    # the machine profile's defaults, for every variable the user has not exported
    profile = resolve(args.profile)
    applied, kept = profile.split(os.environ)
    for line in profile.startup_lines(applied, kept):
        print(line, flush=True)
    env = {
        **applied,
        "RLHF_STATE_DIR": str(state_dir),
        "RLHF_LOG_FORMAT": "json",
        "RLHF_TOPIC_PREFIX": args.topic_prefix,
        "RLHF_CONTROL_TOKEN": control_token(state_dir),
    }
    topics = Topics(args.topic_prefix).all()
    broker = stack = None
    phase = "starting"

    def say(message: str) -> None:
        print(message, flush=True)

    try:
        # 1. models: prepared once, then every service loads the same folder
        if args.tiny:
            from rlhf.models.tiny import build_tiny_model

            model = state_dir / "models" / "tiny"
            if not (model / "config.json").exists():
                say(f"building tiny random model in {model}")
                build_tiny_model(model)
            env["RLHF_REWARD_BACKBONE"] = "tiny"
        elif model is None:
            from rlhf.models.prepare import prepare_demo_model

            model = prepare_demo_model(progress=lambda m: say(f"[models] {m}"))
        env["RLHF_MODEL"] = str(model)

        # 2. broker: embedded unless one is given
        if args.kafka_bootstrap:
            bootstrap = args.kafka_bootstrap
        else:
            broker = EmbeddedBroker(port=args.broker_port, log_path=state_dir / "logs" / "broker.log")
            broker.start()
            bootstrap = broker.bootstrap
        env["RLHF_KAFKA_BOOTSTRAP"] = bootstrap
        ensure_topics(bootstrap, topics)
        say(f"kafka      {bootstrap}")

        # 3. services, supervised (restarted with backoff) until every one reports SERVING
        policy = RestartPolicy(
            max_restarts=args.max_restarts, window_s=args.restart_window, backoff_s=args.restart_backoff
        )
        stack = Stack(
            specs,
            env,
            state_dir / "logs",
            policy=policy,
            broker=broker,
            topics=topics,
            on_change=lambda: write_endpoints(state_dir, stack, bootstrap, phase),
        )
        stack.start()
        say(f"starting {len(specs)} services (logs in {state_dir / 'logs'})")
        stack.wait_healthy(args.timeout, progress=say)
        phase = "serving"
        write_endpoints(state_dir, stack, bootstrap, phase)
        say("\nall services SERVING:")
        for s in specs:
            extra = f"   metrics http://127.0.0.1:{s.metrics_port}/metrics" if not s.http else f"   web chat {s.url}/"
            say(f"  {s.name:<10} {s.url:<24}{extra}")
        say(
            f"\nrestarts: up to {policy.max_restarts} per process in {policy.window_s:g}s. "
            "Ctrl-C or SIGTERM stops everything."
        )
        stack.watch(progress=say)
        return 1  # watch() returns only by raising
    except (_Stop, KeyboardInterrupt):
        say("\nstopping...")
        return 0
    except (CrashLoop, BrokerError, BrokerUnavailable, RuntimeError, TimeoutError, OSError) as e:
        print(f"rlhf up failed: {_one_line(e)}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if stack:
            stack.stop()
        if broker:
            broker.stop()
        endpoints_file(state_dir).unlink(missing_ok=True)  # ours: we hold the state dir's lock
        say("stopped.")


def _one_line(e: BaseException) -> str:
    """An error's message on one line: BrokerError and friends append a log tail, of
    which the last meaningful line is what to show."""
    from rlhf._proc import last_log_line

    head, _, rest = str(e).partition("\n")
    return f"{head} {last_log_line(rest)}" if rest.strip() else head


def cmd_status(args) -> int:
    from rlhf.status import run

    if args.watch:
        return _watch_status(_state_dir(args), args.interval)
    return run(_state_dir(args))


def _watch_status(state_dir: Path, interval: float) -> int:
    """`rlhf status --watch`: the table again every `interval` seconds (on a terminal, in
    place of the last one) until Ctrl-C, which ends it with exit code 0; so does a reader
    that hangs up (`| head`)."""
    import time

    from rlhf.status import collect, render

    # Ctrl-C even where SIGINT came in ignored (a shell's background job): a watch is stopped by it
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        while True:
            rows, notes = collect(state_dir)
            if sys.stdout.isatty():
                print("\033[H\033[2J", end="")  # clear the screen, as watch(1) does
            print(f"{time.strftime('%H:%M:%S')}  every {interval:g} s, Ctrl-C stops")
            for line in render(rows, notes):
                print(line)
            print(flush=True)
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python would flush into it at exit
        return 0


def cmd_pause(args) -> int:
    from rlhf.control import run

    return run(args.cmd, _state_dir(args), args.learner, args.token, args.timeout)


def cmd_versions(args) -> int:
    """`rlhf versions | promote N | rollback N | canary`: the learner's versions and canary (rlhf/control.py)."""
    from rlhf.control import run_versions_command

    enabled = True if getattr(args, "on", False) else False if getattr(args, "off", False) else None
    return run_versions_command(
        args.cmd,
        _state_dir(args),
        args.learner,
        args.token,
        args.timeout,
        version=getattr(args, "version", None),
        share=getattr(args, "share", None),
        enabled=enabled,
    )


def cmd_raters(args) -> int:
    """`rlhf raters [--release RATER]`: rater reliability on the reward service (rlhf/reward/control.py)."""
    from rlhf.reward.control import run_raters

    return run_raters(_state_dir(args), args.reward, args.token, args.timeout, args.release)


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

    created = ensure_topics(
        args.kafka_bootstrap,
        Topics(args.topic_prefix).all(),
        partitions=args.partitions,
        replication_factor=args.replication_factor,
    )
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


def settings_classes() -> dict[str, type]:
    """{service: its settings class}, the one source of every setting of that service."""
    import importlib

    names = {
        "generator": "GeneratorSettings",
        "reward": "RewardSettings",
        "reference": "ReferenceSettings",
        "learner": "LearnerSettings",
        "rollout": "RolloutSettings",
        "gateway": "GatewaySettings",
    }
    return {svc: getattr(importlib.import_module(f"services.{svc}.settings"), cls) for svc, cls in names.items()}


def _shown(value) -> str:
    """A setting's value as `rlhf config` prints it; a secret (SecretStr) stays masked."""
    from pydantic import SecretStr

    if isinstance(value, SecretStr):
        return "**********" if value.get_secret_value() else '""'  # as pydantic prints a SecretStr
    return '""' if value == "" else str(value)


def _effective(cls) -> tuple[object | None, list[str]]:
    """The settings `cls` reads from this environment, or None and one line per refused field."""
    from pydantic import ValidationError

    try:
        return cls(), []
    except ValidationError as e:
        out = []
        for err in e.errors():
            var = f"RLHF_{str(err['loc'][0]).upper()}" if err["loc"] else ""
            out.append(f"{var}={os.environ.get(var, '')!r}: {err['msg']}" if var else err["msg"])
        return None, out


def cmd_config(args) -> int:
    """Every setting of every service: env var, the value this environment gives it (RLHF_*
    applied), its default, description; then the old names still read. A setting the
    environment sets to something refused is one line on stderr, and exit code 1. A reader
    that hangs up (`rlhf config | head -1`) ends the output, not the exit code."""
    from rlhf.serving.settings import CommonSettings

    errors: dict[str, list[str]] = {}  # refused field: message → the settings classes refusing it

    def rows(cls, names):
        settings, refused = _effective(cls)
        for line in refused:
            errors.setdefault(line, []).append(cls.__name__)
        for name in names:
            f = cls.model_fields[name]
            default = _shown(f.get_default(call_default_factory=True))
            value = _shown(getattr(settings, name)) if settings is not None else os.environ.get(f"RLHF_{name.upper()}")
            yield f"RLHF_{name.upper():<28} {value or default:<24} {default:<24} {f.description}"

    try:
        print("# value: what each service reads from this environment (RLHF_* applied, secrets hidden)")
        print(f"{'# variable':<33} {'value':<24} {'default':<24} description")
        print("\n# all services")
        for line in rows(CommonSettings, list(CommonSettings.model_fields)):
            print(line)
        for svc, cls in settings_classes().items():
            print(f"\n# {svc}")
            for line in rows(cls, [n for n in cls.model_fields if n not in CommonSettings.model_fields]):
                print(line)
            for old, new in cls.renamed.items():
                value = os.environ.get(f"RLHF_{old.upper()}", "-")
                note = f"read as RLHF_{new.upper()} when that is unset"
                print(f"RLHF_{old.upper():<28} {value:<24} {'(renamed)':<24} {note}")
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python would flush into it at exit
    for line, classes in errors.items():
        print(f"rlhf config: {line} ({', '.join(classes)})", file=sys.stderr)
    return 1 if errors else 0


def cmd_simulate(args) -> int:
    from rlhf.experiments.simulate import main

    return main(args)


def cmd_eval(args) -> int:
    from rlhf.experiments.evaluate import main

    return main(args)


def cmd_experiment(args) -> int:
    from rlhf.experiments.experiment import main_kl_sweep

    return main_kl_sweep(args)


def cmd_base_rates(args) -> int:
    from rlhf.experiments.base_rates import main

    return main(args)


def cmd_win_rate(args) -> int:
    from rlhf.experiments.live import main

    return main(args)


def cmd_poisoning(args) -> int:
    from rlhf.experiments.poisoning import main

    return main(args)


def cmd_canary_experiment(args) -> int:
    from rlhf.experiments.canary import main

    return main(args)


def cmd_sft(args) -> int:
    from rlhf.sft.command import main_sft

    return main_sft(args)


def cmd_export(args) -> int:
    from rlhf.sft.command import main_export

    return main_export(args)


def _sim_arguments(command: str):
    """A sub-command's flags, from rlhf.experiments.cli_args (light: no torch at parse time)."""
    from rlhf.experiments import cli_args

    return getattr(cli_args, f"{command}_arguments")


def build_parser() -> argparse.ArgumentParser:
    from rlhf import __version__
    from rlhf.profile import CHOICES

    p = argparse.ArgumentParser(prog="rlhf", description="Online RLHF serving loop")
    p.add_argument("--version", action="version", version=f"rlhf {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", help="start the broker and every service locally, wait until all are SERVING")
    up.add_argument(
        "--model", default=os.environ.get("RLHF_MODEL", "demo"), help='"demo" (SmolLM2-135M-Instruct) or a model folder'
    )
    up.add_argument("--tiny", action="store_true", help="tiny random models (seconds to start; for smoke tests)")
    up.add_argument(
        "--profile",
        choices=CHOICES,
        default="auto",
        help="auto: this machine's defaults (precision, threads, learning settings) for every RLHF_* "
        "variable not exported; feedback: auto plus GRPO + best-of-n with the users' feedback in the "
        "policy (docs/configuration.md); none: the settings' own defaults",
    )
    up.add_argument("--kafka-bootstrap", default=None, help="use this Kafka instead of the embedded broker")
    up.add_argument("--broker-port", type=int, default=9092, help="port of the embedded broker")
    up.add_argument("--http-port", type=int, default=8000, help="gateway HTTP port")
    up.add_argument("--base-port", type=int, default=50051, help="first gRPC port (generator; the others follow)")
    up.add_argument("--metrics-base-port", type=int, default=9101, help="first /metrics port (the others follow)")
    up.add_argument("--topic-prefix", default="rlhf", help="prefix of every topic name")
    up.add_argument("--timeout", type=float, default=900, help="seconds to wait for every service to be SERVING")
    up.add_argument("--state-dir", default=None, help="checkpoints, weights, outbox, logs (default $RLHF_HOME/state)")
    up.add_argument(
        "--max-restarts",
        type=int,
        default=5,
        help="restarts of one process within --restart-window before the stack stops (a crash loop)",
    )
    up.add_argument("--restart-window", type=float, default=300.0, help="seconds over which restarts count")
    up.add_argument(
        "--restart-backoff",
        type=float,
        default=1.0,
        help="seconds before the first restart; doubles per recent restart, up to 30 s",
    )
    up.set_defaults(fn=cmd_up)

    st = sub.add_parser(
        "status", help="broker and each service: health, kafka, restarts, version; exit 0 only if all SERVING"
    )
    st.add_argument("--state-dir", default=None)
    st.add_argument("--watch", action="store_true", help="print the table again every --interval until Ctrl-C")
    st.add_argument("--interval", type=float, default=2.0, help="seconds between two tables with --watch")
    st.set_defaults(fn=cmd_status)

    for action, what in (("pause", "stop training after the step in flight"), ("resume", "train again")):
        pa = sub.add_parser(action, help=f"the learner: {what} (control RPC; prints its new status)")
        pa.add_argument("--state-dir", default=None, help="the `rlhf up` state dir: its up.json and control.token")
        pa.add_argument("--learner", default=None, help="HOST:PORT of the learner (default: from up.json)")
        pa.add_argument(
            "--token",
            default=None,
            help="control token (default $RLHF_CONTROL_TOKEN, else <state_dir>/control.token); a flag shows in "
            "`ps`, so prefer the variable",
        )
        pa.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the learner's answer")
        pa.set_defaults(fn=cmd_pause)

    for action, what in (
        ("versions", "list the policy versions: drift gate verdict, which is stable, candidate, queued"),
        ("promote", "make version N stable now (ends a running canary; control RPC)"),
        ("rollback", "serve version N again, a version that passed the drift gate (control RPC)"),
        ("canary", "the canary's state; --share S and/or --on/--off change it (control RPC)"),
    ):
        vp = sub.add_parser(action, help=f"the learner: {what}")
        if action in ("promote", "rollback"):
            vp.add_argument("version", type=int, help="the version number (see `rlhf versions`)")
        if action == "canary":
            vp.add_argument("--share", type=float, default=None, help="share of new conversations for the candidate")
            onoff = vp.add_mutually_exclusive_group()
            onoff.add_argument("--on", action="store_true", help="turn canaries on")
            onoff.add_argument("--off", action="store_true", help="turn canaries off (refused while one runs)")
        vp.add_argument("--state-dir", default=None, help="the `rlhf up` state dir: its up.json and control.token")
        vp.add_argument("--learner", default=None, help="HOST:PORT of the learner (default: from up.json)")
        vp.add_argument("--token", default=None, help="control token (default $RLHF_CONTROL_TOKEN, else the file)")
        vp.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the learner's answer")
        vp.set_defaults(fn=cmd_versions)

    ra = sub.add_parser("raters", help="raters' reliability and who is quarantined; --release RATER (control RPC)")
    ra.add_argument("--release", default=None, metavar="RATER", help="release a quarantined rater, e.g. header:alice")
    ra.add_argument("--state-dir", default=None, help="the `rlhf up` state dir: its up.json and control.token")
    ra.add_argument("--reward", default=None, help="HOST:PORT of the reward service (default: from up.json)")
    ra.add_argument("--token", default=None, help="control token (default $RLHF_CONTROL_TOKEN, else the file)")
    ra.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the reward service's answer")
    ra.set_defaults(fn=cmd_raters)

    he = sub.add_parser("health", help="exit 0 if a service reports SERVING (gRPC health, or --http /readyz)")
    he.add_argument("address", help="HOST:PORT")
    he.add_argument("--service", default="", help="gRPC service name to check (default: the whole server)")
    he.add_argument("--http", action="store_true", help="an HTTP service (the gateway): GET /readyz")
    he.add_argument("--timeout", type=float, default=3.0)
    he.set_defaults(fn=cmd_health)

    tp = sub.add_parser("topics", help="create the loop's topics (idempotent)")
    tp.add_argument("--kafka-bootstrap", default=os.environ.get("RLHF_KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    tp.add_argument("--topic-prefix", default=os.environ.get("RLHF_TOPIC_PREFIX", "rlhf"))
    tp.add_argument(
        "--partitions", type=int, default=1, help="partitions per topic (consumer replicas scale up to this)"
    )
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

    ev = sub.add_parser(
        "eval", help="win-rate vs the reference, KL, RM accuracy of the served policy (run folder, plots)"
    )
    _sim_arguments("eval")(ev)
    ev.set_defaults(fn=cmd_eval)

    ex = sub.add_parser(
        "experiment", help="experiments: kl-sweep (one process), win-rate and canary (against `rlhf up`)"
    )
    exsub = ex.add_subparsers(dest="experiment", required=True)
    kl = exsub.add_parser("kl-sweep", help="β = 0 / moderate / large: reward hacking, the drift gate, rollback")
    _sim_arguments("kl_sweep")(kl)
    kl.set_defaults(fn=cmd_experiment)
    wr = exsub.add_parser(
        "win-rate", help="against `rlhf up`: simulated feedback until the served policy beats the reference"
    )
    _sim_arguments("win_rate")(wr)
    wr.set_defaults(fn=cmd_win_rate)
    br = exsub.add_parser("base-rates", help="how often the model already shows each oracle's behaviour")
    _sim_arguments("base_rates")(br)
    br.set_defaults(fn=cmd_base_rates)
    from rlhf.experiments.canary import add_arguments as canary_arguments  # light: argparse only

    cx = exsub.add_parser(
        "canary", help="against `rlhf up` with canaries on: simulated users until the canary promotes or rolls back"
    )
    canary_arguments(cx)
    cx.set_defaults(fn=cmd_canary_experiment)
    from rlhf.experiments.poisoning import add_arguments as poisoning_arguments  # light: no torch, no httpx

    po = exsub.add_parser(
        "poisoning",
        help="adversarial raters through the gateway: RM held-out accuracy with rater reliability on and off",
    )
    poisoning_arguments(po)
    po.set_defaults(fn=cmd_poisoning)

    from rlhf.sft.command import export_arguments, sft_arguments  # light: argparse only

    sf = sub.add_parser(
        "sft",
        help="supervised fine-tuning on chat examples (a file, the demo set, or users' "
        "endorsed answers): a model folder for `rlhf up --model`",
    )
    sft_arguments(sf)
    sf.set_defaults(fn=cmd_sft)

    xp = sub.add_parser(
        "export", help="a weight-store version, LoRA merged, as a Hugging Face folder (transformers, vLLM)"
    )
    export_arguments(xp)
    xp.set_defaults(fn=cmd_export)

    cf = sub.add_parser(
        "config", help="list every setting: environment variable, value (environment applied), default, description"
    )
    cf.set_defaults(fn=cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
