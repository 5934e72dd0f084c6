"""Writes the Grafana dashboards of the loop (deploy/grafana/dashboards/*.json).

The panels are declared here, compactly, and rendered to Grafana's JSON model with the
builders of grafana-foundation-sdk (Grafana's own typed model of a dashboard), so the
queries stay reviewable in one place and the JSON follows Grafana's schema. Edit this file, then run

    python deploy/grafana/build_dashboards.py

tests/integration/test_deploy_grafana.py fails when the JSON and this file disagree, and
tests/integration/test_prometheus_live.py checks that every query uses only metric names
the running services export.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from grafana_foundation_sdk.builders import common, dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_models
from grafana_foundation_sdk.models import dashboard as dashboard_models

OUT = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = dashboard_models.DataSourceRef(type_val="prometheus", uid="${datasource}")
RI = "$__rate_interval"


@dataclass
class Panel:
    title: str
    targets: list[tuple[str, str]]  # (PromQL, legend)
    unit: str = "short"
    kind: str = "timeseries"  # timeseries | stat
    width: int = 8
    height: int = 8
    description: str = ""
    min: float | None = None
    max: float | None = None


@dataclass
class Row:
    title: str


@dataclass
class Dashboard:
    uid: str
    title: str
    description: str
    items: list[Panel | Row] = field(default_factory=list)
    annotations: list[tuple[str, str, str]] = field(default_factory=list)  # (name, PromQL, colour)


def _panel(p: Panel, pid: int, x: int, y: int) -> cogbuilder.Builder:
    if p.kind == "timeseries":
        builder = (
            timeseries.Panel()
            .legend(
                common.VizLegendOptions()
                .show_legend(True)
                .display_mode(common_models.LegendDisplayMode.LIST)
                .placement(common_models.LegendPlacement.BOTTOM)
            )
            .tooltip(
                common.VizTooltipOptions()
                .mode(common_models.TooltipDisplayMode.MULTI)
                .sort(common_models.SortOrder.NONE)
            )
        )
    else:
        builder = (
            stat.Panel()
            .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False))
            .color_mode(common_models.BigValueColorMode.VALUE)
        )
    builder = (
        builder.id(pid)
        .title(p.title)
        .description(p.description)
        .datasource(DATASOURCE)
        .grid_pos(dashboard_models.GridPos(h=p.height, w=p.width, x=x, y=y))
        .unit(p.unit)
    )
    if p.min is not None:
        builder = builder.min(p.min)
    if p.max is not None:
        builder = builder.max(p.max)
    for i, (expr, legend) in enumerate(p.targets):
        builder = builder.with_target(
            prometheus.Dataquery()
            .ref_id(chr(ord("A") + i))
            .datasource(DATASOURCE)
            .expr(expr)
            .legend_format(legend)
            .range()
        )
    return builder


def render(d: Dashboard) -> dashboard_models.Dashboard:
    """The dashboard built with grafana-foundation-sdk's builders. Positions are computed
    here (left to right, a new line when a panel would overflow the 24 columns, a row
    starting below the tallest panel above it), so the SDK's own placement keeps them."""
    out = (
        dashboard.Dashboard(d.title)
        .uid(d.uid)
        .description(d.description)
        .tags(["rlhf"])
        .readonly()
        .tooltip(dashboard_models.DashboardCursorSync.CROSSHAIR)
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("")
        .version(1)
        .annotations(
            [
                dashboard.AnnotationQuery()
                .name(name)
                .datasource(DATASOURCE)
                .expr(expr)
                .enable(True)
                .hide(False)
                .icon_color(colour)
                for name, expr, colour in d.annotations
            ]
        )
        .link(
            dashboard.DashboardLink("RLHF dashboards")
            .type(dashboard_models.DashboardLinkType.DASHBOARDS)
            .tags(["rlhf"])
            .as_dropdown(True)
        )
        .with_variable(
            dashboard.DatasourceVariable("datasource")
            .label("Prometheus")
            .type("prometheus")
            .current(dashboard_models.VariableOption(text="Prometheus", value="prometheus"))
            .hide(dashboard_models.VariableHide.DONT_HIDE)
        )
    )
    pid, x, y, row_h = 1, 0, 0, 0
    for item in d.items:
        if isinstance(item, Row):
            y += row_h
            x, row_h = 0, 0
            out = out.with_row(
                dashboard.Row(item.title).id(pid).grid_pos(dashboard_models.GridPos(h=1, w=24, x=0, y=y))
            )
            pid, y = pid + 1, y + 1
            continue
        if x + item.width > 24:
            x, y, row_h = 0, y + row_h, 0
        out = out.with_panel(_panel(item, pid, x, y))
        pid, x, row_h = pid + 1, x + item.width, max(row_h, item.height)
    return out.build()


def q(metric_expr: str, quantile: float, by: str = "") -> str:
    """histogram_quantile over a histogram's buckets, summed `by` extra labels."""
    labels = f"le, {by}" if by else "le"
    return f"histogram_quantile({quantile}, sum by ({labels}) (rate({metric_expr}[{RI}])))"


LOOP = Dashboard(
    uid="rlhf-loop",
    title="RLHF loop",
    description="Is the loop learning from people without drifting? Feedback in, reward model, PPO, policy versions.",
    items=[
        Row("Feedback and reward model"),
        Panel(
            "Feedback accepted by the gateway",
            [
                (f'sum by (kind) (rate(rlhf_feedback_events_total{{job="gateway"}}[{RI}]))', "{{kind}}"),
            ],
            unit="reqps",
            description="Ratings and comparisons committed to the outbox, per second.",
        ),
        Panel(
            "Feedback consumed by the reward model",
            [
                (f'sum by (kind) (rate(rlhf_reward_feedback_events_total{{job="reward"}}[{RI}]))', "{{kind}}"),
                (f"sum(rate(rlhf_feedback_duplicates_total[{RI}]))", "duplicates dropped"),
            ],
            unit="reqps",
        ),
        Panel(
            "Quarantined raters",
            [
                ('max(rlhf_reward_quarantined_raters{job="reward"})', "raters quarantined"),
                (f'sum(rate(rlhf_reward_quarantined_events_total{{job="reward"}}[{RI}]))', "their events/s"),
            ],
            description="Raters whose estimated reliability fell below the threshold: their feedback is held "
            "on the quarantine topic, not trained on, until they recover or an operator releases them. "
            "The alert is RlhfRaterQuarantined.",
        ),
        Panel(
            "RM online accuracy",
            [
                ("rlhf_rm_accuracy_ratio", "progressive validation"),
            ],
            unit="percentunit",
            min=0,
            max=1,
            description="Share of new feedback the RM judged right before training on it. "
            "Falling while the RM score rises is reward hacking.",
        ),
        Panel(
            "RM training",
            [
                ("rlhf_rm_loss", "loss"),
                (f"rate(rlhf_rm_pairs_total[{RI}])", "pairs/s"),
                (f"rate(rlhf_rm_pointwise_total[{RI}])", "pointwise/s"),
                (f"sum by (job) (rate(rlhf_rm_loop_errors_total[{RI}]))", "loop errors/s"),
            ],
            description="A training-loop error is logged and retried; RlhfRewardModelTrainingErrors fires on any.",
        ),
        Panel("RM version", [("rlhf_rm_version", "RM version")], kind="stat", width=4),
        Panel(
            "RM score normaliser",
            [
                ("rlhf_rm_score_mean", "mean"),
                ("rlhf_rm_score_std", "std"),
            ],
            width=12,
        ),
        Panel(
            "RM publish time (p95)",
            [
                (q("rlhf_rm_publish_seconds_bucket", 0.95), "p95"),
            ],
            unit="s",
            width=8,
        ),
        Row("Policy (PPO) and KL control"),
        Panel(
            "Reward and RM score",
            [
                ("rlhf_learner_score_mean", "RM score"),
                ("rlhf_learner_reward_mean", "total reward (score − β·KL)"),
            ],
            description="Per PPO batch. RM score rising while RM accuracy falls: reward hacking.",
        ),
        Panel(
            "KL to the reference",
            [
                ("rlhf_learner_kl_nats", "training batch"),
                ("rlhf_learner_drift_kl_nats", "held-out (drift gate)"),
                ("rlhf_learner_drift_kl_budget_nats", "budget"),
            ],
            unit="short",
            description="KL(π‖π_ref) per response, nats.",
        ),
        Panel(
            "β (KL coefficient)",
            [
                ("rlhf_learner_kl_coef", "β"),
            ],
            description="Adaptive KL controller, Ziegler et al. 2019.",
        ),
        Panel(
            "Policy version",
            [
                ("rlhf_learner_policy_version", "trained"),
                ("rlhf_learner_serving_version", "promoted"),
                ("rlhf_generator_policy_version", "served by {{instance}}"),
            ],
        ),
        Panel(
            "Staleness",
            [
                ("rlhf_learner_staleness_versions", "mean version lag of a batch"),
                (f"rate(rlhf_learner_rollouts_dropped_stale_total[{RI}])", "stale rollouts dropped/s"),
            ],
            description="How many versions behind the learner the rollouts it trains on were generated.",
        ),
        Panel(
            "Weight sync time",
            [
                (q("rlhf_weight_sync_seconds_bucket", 0.5, "format"), "p50 {{format}}"),
                (q("rlhf_weight_sync_seconds_bucket", 0.95, "format"), "p95 {{format}}"),
            ],
            unit="s",
            description="From a weight update's arrival at a generator to serving it.",
        ),
        Panel(
            "Drift-gate decisions",
            [
                (f"sum(increase(rlhf_learner_versions_published_total[{RI}]))", "versions published"),
                (f"sum(increase(rlhf_learner_drift_gate_rejections_total[{RI}]))", "refused by the gate"),
                (f"sum(increase(rlhf_learner_rollbacks_total[{RI}]))", "rolled back"),
            ],
        ),
        Panel(
            "PPO diagnostics",
            [
                ("rlhf_learner_entropy_nats", "entropy (nats/token)"),
                ("rlhf_learner_clipped_tokens_ratio", "clip fraction"),
                ("rlhf_learner_approx_kl_nats", "approx KL old→new"),
            ],
        ),
        Panel(
            "Critic",
            [
                ("rlhf_learner_value_loss", "value loss"),
                ("rlhf_learner_explained_variance", "explained variance"),
            ],
        ),
        Panel(
            "Learner throughput",
            [
                ("rlhf_learner_tokens_per_second", "tokens/s"),
                (f"rate(rlhf_learner_rollouts_trained_total[{RI}])", "rollouts/s"),
            ],
            width=8,
        ),
        Panel(
            "Response length",
            [
                ("rlhf_learner_response_length_tokens", "mean tokens"),
            ],
            width=8,
        ),
        Panel(
            "PPO step time",
            [
                (q("rlhf_learner_step_seconds_bucket", 0.5), "p50"),
                (q("rlhf_learner_step_seconds_bucket", 0.95), "p95"),
            ],
            unit="s",
            width=8,
        ),
        Panel("Learner paused", [("rlhf_learner_paused", "paused")], kind="stat", width=4),
        Panel(
            "Log-prob mismatch rollout vs learner",
            [
                ("rlhf_learner_logprob_mismatch_nats", "mean |Δ log π| per token"),
            ],
            width=10,
            description="Staleness plus engine numerics (vLLM vs training forward); a jump means the engines disagree.",
        ),
        Panel(
            "Gradient norms",
            [
                ("rlhf_learner_grad_norm", "policy (before clipping)"),
                ("rlhf_rm_grad_norm", "reward model"),
            ],
            width=10,
        ),
        Row("Canary: users' feedback decides promotion (docs/canary.md)"),
        Panel(
            "Canary versions",
            [
                ("rlhf_learner_canary_stable_version", "stable"),
                ("rlhf_learner_canary_candidate_version", "candidate (0: none)"),
                ("rlhf_learner_canary_queued", "queued"),
                ("rlhf_learner_canary_enabled", "canaries on"),
            ],
            kind="stat",
            width=6,
            description="The stable version, the candidate in canary and those waiting; decisions are annotations.",
        ),
        Panel(
            "Traffic share per version",
            [
                (
                    f"sum by (role) (rate(rlhf_gateway_requests_by_version_total[{RI}])) / ignoring (role) "
                    f"group_left sum(rate(rlhf_gateway_requests_by_version_total[{RI}]))",
                    "{{role}} (served)",
                ),
                ("rlhf_learner_canary_share_ratio", "candidate share (configured)"),
            ],
            unit="percentunit",
            min=0,
            max=1,
            width=9,
            description="Completions answered by each version's role at the gateway (a cross-version comparison "
            "counts for both), against the share the learner set.",
        ),
        Panel(
            "Thumbs-up rate per version (95 % Wilson interval)",
            [
                ("rlhf_learner_canary_thumbs_up_ratio", "{{role}}"),
                ("rlhf_learner_canary_thumbs_up_lower_ratio", "{{role}} lower"),
                ("rlhf_learner_canary_thumbs_up_upper_ratio", "{{role}} upper"),
            ],
            unit="percentunit",
            min=0,
            max=1,
            width=9,
            description="In the running canary. The interval is for reading; the decision is the sequential test's.",
        ),
        Panel(
            "Head-to-head win rate of the candidate",
            [
                ("rlhf_learner_canary_win_ratio", "candidate wins"),
                ("rlhf_learner_canary_win_lower_ratio", "lower"),
                ("rlhf_learner_canary_win_upper_ratio", "upper"),
            ],
            unit="percentunit",
            min=0,
            max=1,
            description="Comparisons candidate vs stable, ties left out (95 % Wilson interval).",
        ),
        Panel(
            "Canary evidence",
            [
                ("rlhf_learner_canary_log_e_value", "log e-value {{side}}"),
                ("rlhf_learner_canary_log_e_threshold", "threshold {{side}}"),
                ("rlhf_learner_canary_thumbs_down_alert", "thumbs-down alert"),
            ],
            description="A side decides when its log e-value reaches log(1/alpha) and each version has the "
            "minimum sample; the alert is RlhfCanaryThumbsDown.",
        ),
        Panel(
            "Canary feedback and decisions",
            [
                (f"sum by (outcome) (rate(rlhf_learner_canary_feedback_total[{RI}]))", "{{outcome}}"),
                ("sum by (verdict, by) (rlhf_learner_canary_decisions_total)", "decided: {{verdict}} by {{by}}"),
            ],
            description="Feedback events the canary read (observed, or why not), and the canaries decided.",
        ),
    ],
    annotations=[
        (
            "Canary decisions",
            "sum by (verdict, by) (increase(rlhf_learner_canary_decisions_total[1m])) > 0",
            "orange",
        ),
    ],
)

SERVING = Dashboard(
    uid="rlhf-serving",
    title="RLHF serving",
    description="What people see: gateway latency and errors, tokens served, gRPC services, the feedback outbox.",
    items=[
        Row("Gateway"),
        Panel(
            "Requests by route and code",
            [
                (f"sum by (route, code) (rate(rlhf_gateway_requests_total[{RI}]))", "{{route}} {{code}}"),
            ],
            unit="reqps",
        ),
        Panel(
            "Latency by route",
            [
                (q("rlhf_gateway_request_seconds_bucket", 0.5, "route"), "p50 {{route}}"),
                (q("rlhf_gateway_request_seconds_bucket", 0.99, "route"), "p99 {{route}}"),
            ],
            unit="s",
        ),
        Panel(
            "5xx ratio",
            [
                (
                    f'sum(rate(rlhf_gateway_requests_total{{code=~"5.."}}[{RI}])) '
                    f"/ sum(rate(rlhf_gateway_requests_total[{RI}]))",
                    "5xx",
                ),
            ],
            unit="percentunit",
            min=0,
        ),
        Panel(
            "Completion tokens served",
            [
                (f"sum(rate(rlhf_gateway_completion_tokens_total[{RI}]))", "all"),
                (f"sum(rate(rlhf_gateway_tokens_streamed_total[{RI}]))", "streamed"),
            ],
            unit="short",
            description="Tokens per second sent to clients.",
        ),
        Panel(
            "Generator errors seen by the gateway",
            [
                (f"sum by (code) (rate(rlhf_gateway_generator_errors_total[{RI}]))", "{{code}}"),
            ],
            unit="reqps",
        ),
        Panel(
            "Live prompts queued for training",
            [
                (f"sum(rate(rlhf_gateway_interactions_total[{RI}]))", "interactions/s"),
            ],
            unit="reqps",
        ),
        Row("Generator"),
        Panel(
            "Generator tokens",
            [
                (f"sum by (kind) (rate(rlhf_generation_tokens_total[{RI}]))", "{{kind}} tokens/s"),
            ],
            unit="short",
        ),
        Panel(
            "Time to first token",
            [
                (q("rlhf_generation_time_to_first_token_seconds_bucket", 0.5), "p50"),
                (q("rlhf_generation_time_to_first_token_seconds_bucket", 0.99), "p99"),
            ],
            unit="s",
        ),
        Panel(
            "Requests in flight",
            [
                ("rlhf_generation_requests_in_flight", "{{instance}}"),
            ],
        ),
        Panel(
            "Time per output token",
            [
                (q("rlhf_generator_time_per_output_token_seconds_bucket", 0.5), "p50"),
                (q("rlhf_generator_time_per_output_token_seconds_bucket", 0.99), "p99"),
            ],
            unit="s",
            description="Decode time per generated token after the first (vLLM's time_per_output_token).",
        ),
        Panel(
            "Queue time by priority",
            [
                (q("rlhf_generator_queue_time_seconds_bucket", 0.5, "priority"), "p50 {{priority}}"),
                (q("rlhf_generator_queue_time_seconds_bucket", 0.99, "priority"), "p99 {{priority}}"),
            ],
            unit="s",
            description="Arrival to the first decode step: chats should not wait behind rollouts.",
        ),
        Panel(
            "Waiting and running requests",
            [
                ("sum by (priority) (rlhf_generator_requests_waiting)", "waiting {{priority}}"),
                ("sum by (priority) (rlhf_generator_requests_running)", "running {{priority}}"),
            ],
        ),
        Panel(
            "Finished samples by reason",
            [
                (f"sum by (finish_reason) (rate(rlhf_generator_finished_total[{RI}]))", "{{finish_reason}}"),
            ],
            unit="reqps",
            description="stop, length, cancelled (the client went away), error.",
        ),
        Panel(
            "Weight updates",
            [
                (f"sum by (format, result) (increase(rlhf_weight_updates_total[{RI}]))", "{{format}} {{result}}"),
            ],
            width=12,
            description="refused: bad sha256 or shapes; the old version keeps serving.",
        ),
        Panel(
            "Micro-batching (reward, reference)",
            [
                (q("rlhf_batcher_batch_items_bucket", 0.5, "name"), "items per call {{name}}"),
                (q("rlhf_batcher_queue_seconds_bucket", 0.99, "name"), "p99 queue wait (s) {{name}}"),
                (f"sum by (name) (rate(rlhf_batcher_failed_batches_total[{RI}]))", "failed batches/s {{name}}"),
            ],
            width=12,
        ),
        Row("gRPC services"),
        Panel(
            "Ready (SERVING)",
            [
                ("rlhf_service_ready", "{{service}}"),
            ],
            kind="stat",
            width=12,
            description="1 while the standard gRPC health service reports SERVING.",
        ),
        Panel(
            "Scrape up",
            [
                ('up{job!="prometheus"}', "{{job}}"),
            ],
            kind="stat",
            width=12,
        ),
        Panel(
            "RPCs by method and code",
            [
                (
                    f"sum by (job, method, code) (rate(rlhf_grpc_server_handled_total[{RI}]))",
                    "{{job}} {{method}} {{code}}",
                ),
            ],
            unit="reqps",
        ),
        Panel(
            "RPC latency p99",
            [
                (q("rlhf_grpc_server_handling_seconds_bucket", 0.99, "job, method"), "{{job}} {{method}}"),
            ],
            unit="s",
        ),
        Panel(
            "Items scored by the reward service",
            [
                (f"sum(rate(rlhf_reward_scored_items_total[{RI}]))", "items/s"),
            ],
            unit="short",
        ),
        Row("Feedback outbox"),
        Panel(
            "Outbox backlog",
            [
                ("rlhf_outbox_backlog", "events not yet acknowledged by Kafka"),
            ],
            unit="short",
        ),
        Panel(
            "Oldest pending event",
            [
                ("rlhf_outbox_oldest_age_seconds", "age"),
            ],
            unit="s",
        ),
        Panel(
            "Relay",
            [
                (f"sum by (topic) (rate(rlhf_outbox_relayed_total[{RI}]))", "{{topic}}"),
                (f"rate(rlhf_outbox_relay_errors_total[{RI}])", "relay errors"),
            ],
            unit="short",
        ),
        Row("Processes"),
        Panel(
            "CPU",
            [
                (
                    f'rate(process_cpu_seconds_total{{job!="prometheus"}}[{RI}])',
                    "{{job}}",
                ),
            ],
            unit="percentunit",
            width=12,
        ),
        Panel(
            "Resident memory",
            [
                ('process_resident_memory_bytes{job!="prometheus"}', "{{job}}"),
            ],
            unit="bytes",
            width=12,
        ),
    ],
)

KAFKA = Dashboard(
    uid="rlhf-kafka",
    title="RLHF Kafka",
    description="Events through Kafka: produced, consumed, backlog growth, dead letters.",
    items=[
        Row("Throughput"),
        Panel(
            "Produced (acknowledged) by topic",
            [
                (f"sum by (topic) (rate(rlhf_kafka_produced_events_total[{RI}]))", "{{topic}}"),
            ],
            unit="short",
            width=12,
        ),
        Panel(
            "Consumed by service and topic",
            [
                (f"sum by (job, topic) (rate(rlhf_kafka_consumed_events_total[{RI}]))", "{{job}} ← {{topic}}"),
            ],
            unit="short",
            width=12,
        ),
        Row("Lag and dead letters"),
        Panel(
            "Consumer lag by group and topic",
            [
                ("max by (job, group, topic) (rlhf_kafka_consumer_lag_messages)", "{{job}} {{group}} ← {{topic}}"),
            ],
            unit="short",
            width=24,
            min=0,
            description="Records not yet consumed (end offset − position), summed over the group's partitions. "
            "RlhfConsumerLagHigh fires above 1000 for 15 minutes.",
        ),
        Panel(
            "Backlog growth: produced − consumed",
            [
                (
                    f"sum by (topic) (rate(rlhf_kafka_produced_events_total[{RI}])) "
                    f"- sum by (topic) (rate(rlhf_kafka_consumed_events_total[{RI}]))",
                    "{{topic}}",
                ),
            ],
            unit="short",
            width=12,
            description="Events per second that reach a topic faster than its consumers read them; "
            "above zero for long means lag grows.",
        ),
        Panel(
            "Dead-lettered messages",
            [
                (f"sum by (job, topic) (increase(rlhf_kafka_dlq_messages_total[{RI}]))", "{{job}} {{topic}}"),
            ],
            unit="short",
            width=12,
            description="Undecodable messages moved to <topic>.dlq.",
        ),
        Panel(
            "Policy updates seen by generators",
            [
                (
                    f"sum by (action, outcome) (increase(rlhf_generator_policy_events_total[{RI}]))",
                    "{{action}} {{outcome}}",
                ),
            ],
            unit="short",
            width=12,
        ),
        Panel(
            "Rollouts trained by the learner",
            [
                (f"rate(rlhf_learner_rollouts_trained_total[{RI}])", "trained/s"),
                (f"rate(rlhf_learner_rollouts_dropped_stale_total[{RI}])", "dropped stale/s"),
                (f"rate(rlhf_learner_rollouts_invalid_total[{RI}])", "dropped invalid/s"),
            ],
            unit="short",
            width=12,
        ),
        Panel(
            "Feedback: relayed to Kafka vs consumed by the RM",
            [
                (f'sum(rate(rlhf_outbox_relayed_total{{topic=~".+\\\\.feedback"}}[{RI}]))', "relayed by the gateway"),
                (
                    f'sum(rate(rlhf_kafka_consumed_events_total{{job="reward", topic=~".+\\\\.feedback"}}[{RI}]))',
                    "consumed by reward",
                ),
            ],
            unit="short",
            width=24,
        ),
        Row("Broker"),
        Panel(
            "Connected to the broker",
            [
                ("max by (job, service) (rlhf_kafka_connected)", "{{job}}"),
            ],
            kind="stat",
            width=12,
            description="1 while the process's last Metadata request succeeded; "
            "RlhfKafkaDown fires after 1 minute at 0.",
        ),
        Panel(
            "Topic logs found lost",
            [
                (f"sum by (job, topic) (increase(rlhf_kafka_log_resets_total[{RI}]))", "{{job}} {{topic}}"),
            ],
            unit="short",
            width=12,
            description="A topic recreated under a consumer or the outbox (a new cluster or topic id): "
            "its consumers start over from the new log; RlhfKafkaLogLost fires on any.",
        ),
    ],
)

DASHBOARDS = {"rlhf-loop.json": LOOP, "rlhf-serving.json": SERVING, "rlhf-kafka.json": KAFKA}


def rendered() -> dict[str, str]:
    return {
        name: json.dumps(render(d), cls=JSONEncoder, indent=2, ensure_ascii=False) + "\n"
        for name, d in DASHBOARDS.items()
    }


def main() -> int:
    OUT.mkdir(exist_ok=True)
    for name, text in rendered().items():
        (OUT / name).write_text(text)
        print(OUT / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
