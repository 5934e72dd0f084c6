"""The kl-sweep's figures (one per β, and all β together) and its markdown report."""

from __future__ import annotations

from pathlib import Path

from rlhf.experiments import oracles as oracle_fns
from rlhf.experiments.runlog import RunFolder, line_plot, table
from rlhf.experiments.sweep_config import SweepConfig


def plot_beta(out: RunFolder, beta: float, kl_budget: float, png: Path) -> Path:
    """The seed's figure for one β (RM score, −β·KL, total reward), the gold oracle under
    it, and KL with the drift gate's verdicts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in out.read("steps") if r["beta"] == beta]
    gates = [g for g in out.read("gate") if g["beta"] == beta and g["reason"] != "rollback"]
    rollback = [g for g in out.read("gate") if g["beta"] == beta and g["reason"] == "rollback"]
    x = [r["step"] for r in rows]
    gx = [g["step"] for g in gates]
    served_oracle, best = [], float("nan")  # held-out oracle of the version being served
    for g in gates:
        best = g["heldout_oracle"] if g["promoted"] else best
        served_oracle.append(best)
    refused = [g["step"] for g in gates if not g["promoted"]]

    fig, axes = plt.subplots(3, 1, figsize=(7.5, 10), sharex=True)
    ax = axes[0]
    ax.plot(x, [r["rm_score"] for r in rows], label="RM score r_φ", linewidth=1.6)
    ax.plot(x, [r["neg_beta_kl"] for r in rows], label="−β·KL", linewidth=1.6)
    ax.plot(
        x,
        [r["total_reward"] for r in rows],
        "--",
        label="total reward r_φ − β·KL" + (" (= RM score at β=0)" if beta == 0 else ""),
        linewidth=1.6,
    )
    ax.set_title(f"β = {beta:g}: RM score, −β·KL and total reward (per answer)", fontsize=10)
    ax = axes[1]
    ax.plot(x, [r["oracle"] for r in rows], label="gold oracle, training answers", linewidth=1.6, color="tab:green")
    if gates:
        ax.plot(
            gx,
            [g["heldout_oracle"] for g in gates],
            "o-",
            markersize=3,
            color="tab:olive",
            label="gold oracle, held-out, trained version",
        )
        ax.plot(
            gx, served_oracle, "s--", markersize=3, color="tab:purple", label="gold oracle, held-out, served version"
        )
    ax.set_title("the gold oracle (what people want)", fontsize=10)
    ax = axes[2]
    ax.plot(x, [r["kl"] for r in rows], label="training KL (k1)", linewidth=1.6, color="tab:red")
    if gates:
        ax.plot(
            gx,
            [g["gate_kl"] for g in gates],
            "o-",
            markersize=3,
            color="tab:orange",
            label="drift gate KL (held-out prompts)",
        )
    ax.axhline(kl_budget, color="black", linestyle="--", linewidth=1, label=f"KL budget {kl_budget:g}")
    if rollback:
        ax.plot(
            [rollback[0]["step"]],
            [rollback[0]["gate_kl"]],
            "*",
            markersize=12,
            color="tab:purple",
            label=f"after Rollback to v{rollback[0]['version']}",
        )
    ax.set_title(
        "KL(π‖π_ref) per answer, nats" + ("  (dotted: gate refused the version)" if refused else ""), fontsize=10
    )
    ax.set_xlabel("PPO step")
    for ax in axes:
        for mx in refused:
            ax.axvline(mx, color="grey", linestyle=":", linewidth=0.8)
        ax.axhline(0, color="black", linewidth=0.5, alpha=0.4)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return Path(png)


def plot_summary(out: RunFolder, betas: list[float], png: Path) -> Path:
    rows = out.read("steps")
    x = sorted({r["step"] for r in rows})
    by = {b: [r for r in rows if r["beta"] == b] for b in betas}
    return line_plot(
        png,
        "RM score (what PPO optimises)",
        x,
        [(f"β={b:g}", [r["rm_score"] for r in by[b]]) for b in betas],
        panels=[
            ("gold oracle score (what people want)", [(f"β={b:g}", [r["oracle"] for r in by[b]]) for b in betas]),
            ("KL(π‖π_ref) per answer, nats", [(f"β={b:g}", [r["kl"] for r in by[b]]) for b in betas]),
            ("answer length, words", [(f"β={b:g}", [r["words"] for r in by[b]]) for b in betas]),
        ],
    )


def regime(first: dict, last: dict) -> str:
    d_rm, d_oracle = last["rm_score"] - first["rm_score"], last["oracle"] - first["oracle"]
    if d_rm > 0.5 and d_oracle < -0.2:
        return "reward hacking: RM score up, gold oracle down"
    if d_oracle > 0.1:
        return "aligned: gold oracle up with bounded KL"
    if abs(d_rm) < 0.5 and abs(d_oracle) <= 0.1:
        return "barely moves"
    return "mixed"


def report(
    out: RunFolder,
    cfg: SweepConfig,
    world_stats: dict,
    summaries: list[dict],
    pngs: dict,
    wall: float,
    device: str = "cpu",
) -> str:
    rows = out.read("steps")
    k = max(1, cfg.steps // 10)  # average the first and last k steps: single batches are noisy
    table_rows = []
    for s in summaries:
        b = s["beta"]
        mine = [r for r in rows if r["beta"] == b]
        first = {
            key: sum(r[key] for r in mine[:k]) / k for key in ("rm_score", "oracle", "kl", "words", "keyword_rate")
        }
        last = {
            key: sum(r[key] for r in mine[-k:]) / k for key in ("rm_score", "oracle", "kl", "words", "keyword_rate")
        }
        gates = [g for g in out.read("gate") if g["beta"] == b and g["reason"] != "rollback"]
        table_rows.append(
            {
                "β": f"{b:g}",
                "RM score": f"{first['rm_score']:+.2f} → {last['rm_score']:+.2f}",
                "gold oracle": f"{first['oracle']:+.2f} → {last['oracle']:+.2f}",
                "KL (nats)": f"{first['kl']:.2f} → {last['kl']:.2f}",
                "words": f"{first['words']:.1f} → {last['words']:.1f}",
                "keyword rate": f"{first['keyword_rate']:.2f} → {last['keyword_rate']:.2f}",
                "win-rate (last version)": f"{gates[-1]['win_rate']:.2f}" if gates else "",
                "gate": f"{s['refused']} of {len(gates)} refused",
                "regime": regime(first, last),
            }
        )
    lines = [
        "# kl-sweep: the β figure, reproduced",
        "",
        f"`rlhf experiment kl-sweep --steps {cfg.steps} --model {cfg.model} --seed {cfg.seed}` — {wall / 60:.1f} min "
        f"on {device}, {cfg.threads} CPU thread{'s' if cfg.threads > 1 else ''}. "
        "Same library code as the services (rlhf.reward's "
        "RewardModel and OnlineRewardTrainer, rlhf.learner's PPOTrainer and DriftGate, rlhf.ppo), run in one "
        "process rather than three stacks.",
        "",
        f"* gold oracle `{cfg.oracle}`: keyword good, more than {oracle_fns.CONCISE_WORDS} words bad.",
        f"* raters `{cfg.rater}` (the RM's teachers): keyword good, and every extra word good (verbosity bias).",
        f"* RM ({cfg.rm_backbone} backbone, {world_stats['rm_pairs']} comparisons): held-out accuracy "
        f"{world_stats['rm_accuracy_rater']:.2f} on the raters' labels, "
        f"agreement {world_stats['rm_accuracy_oracle']:.2f} "
        "with the gold oracle.",
        f"* {cfg.objective.upper()}: fixed β, {cfg.batch_size} answers per step"
        f"{f' ({cfg.group_size} per prompt)' if cfg.objective != 'ppo' else ''}, "
        f"{cfg.ppo_epochs} epochs, lr {cfg.lr:g}, "
        f"answers ≤ {cfg.max_new_tokens} tokens; drift gate budget {cfg.kl_budget:g} nats on held-out prompts, "
        f"a version every {cfg.gate_every} steps.",
        "",
        "First vs last tenth of the steps:",
        "",
        table(table_rows, markdown=True),
        "",
    ]
    for s in summaries:
        if "rollback" in s:
            rb = s["rollback"]
            lines.append(
                f"Drift gate, β={s['beta']:g}: {s['refused']} version(s) refused, so v{s['served_version']} stayed "
                f"served; Rollback to v{rb['to_version']} restored gate KL {rb['gate_kl']:.2f} nats, held-out "
                f"gold oracle {rb['heldout_oracle']:+.2f}, win-rate {rb['win_rate']:.2f} vs the reference."
            )
    lines += ["", *[f"![β = {b}]({p.name})" for b, p in pngs.items()], ""]
    return "\n".join(lines)


def replot(out_dir: str | Path) -> list[Path]:
    """Re-draw a sweep folder's figures from its JSON lines (also a run cut short)."""
    import json

    out = RunFolder(out_dir)
    cfg = json.loads(out.path("config.json").read_text())
    betas = [b for b in cfg["betas"] if any(r["beta"] == b for r in out.read("steps"))]
    paths = [plot_beta(out, b, cfg["kl_budget"], out.path(f"kl-sweep-beta-{b:g}.png")) for b in betas]
    return paths + [plot_summary(out, betas, out.path("kl-sweep-summary.png"))]
