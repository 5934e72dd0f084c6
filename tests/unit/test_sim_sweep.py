"""The kl-sweep end to end in one process, at toy sizes: every stage runs (toy SFT, RM from
rater comparisons, PPO per β, drift gate verdicts in a weight store, rollback, figures,
report). The regimes themselves need real lengths of training: docs/results.md."""

import json

import pytest

from rlhf.experiments.experiment import run_sweep
from rlhf.experiments.sweep_config import SweepConfig
from rlhf.weightstore import WeightStore

pytestmark = pytest.mark.slow


def test_kl_sweep_runs_every_stage(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "home"))
    cfg = SweepConfig(
        betas=[0.0, 1.0],
        steps=2,
        sft_steps=3,
        rm_pairs=16,
        rm_epochs=1,
        batch_size=4,
        max_new_tokens=6,
        gate_every=1,
        heldout_prompts=2,
        eval_samples=1,
        kl_budget=1e-9,
        device="cpu",
    )  # a budget nothing meets: the refusal path runs
    logs: list[str] = []
    result = run_sweep(cfg, tmp_path / "out", log=logs.append)
    out = tmp_path / "out"

    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [(r["beta"], r["step"]) for r in steps] == [(0.0, 1), (0.0, 2), (1.0, 1), (1.0, 2)]
    for r in steps:
        assert r["total_reward"] == pytest.approx(r["rm_score"] + r["neg_beta_kl"])
        assert r["neg_beta_kl"] == pytest.approx(-r["beta"] * r["kl"])
    assert steps[0]["neg_beta_kl"] == 0.0

    gates = [json.loads(line) for line in (out / "gate.jsonl").read_text().splitlines()]
    refused = [g for g in gates if g["reason"] != "rollback"]
    assert refused and all(not g["promoted"] and "exceeds budget" in g["reason"] for g in refused)
    assert all(g["served_version"] == 0 for g in refused)  # nothing promoted: the reference is served
    rollbacks = [g for g in gates if g["reason"] == "rollback"]
    assert [g["version"] for g in rollbacks] == [0, 0]
    assert all(0.0 <= g["win_rate"] <= 1.0 for g in gates)

    versions = WeightStore(out / "weights-beta-0").versions()
    assert [v.version for v in versions] == [1, 2]
    assert all(v.meta["promoted"] is False and v.meta["kl_budget"] == 1e-9 for v in versions)

    for name in ("kl-sweep-beta-0.png", "kl-sweep-beta-1.png", "kl-sweep-summary.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    report = (out / "kl-sweep.md").read_text()
    assert "| β |" in report and "Rollback to v0" in report
    assert result["runs"][0]["refused"] == 2 and "rm_accuracy_rater" in result
    assert any(line.startswith("[rm]") for line in logs)


def test_kl_sweep_with_a_model_folder_trains_lora(tmp_path, monkeypatch, tiny_model_dir):
    """Any model folder (here the tiny random Llama) goes the way `--model demo` does:
    LoRA fine-tuning, π_ref = the adapter switched off, versions stored as adapters."""
    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "home"))
    cfg = SweepConfig(
        betas=[0.1],
        steps=2,
        model=str(tiny_model_dir),
        rm_pairs=16,
        rm_epochs=1,
        batch_size=4,
        max_new_tokens=6,
        gate_every=1,
        heldout_prompts=2,
        eval_samples=1,
        kl_budget=1e6,
        device="cpu",
    )
    result = run_sweep(cfg, tmp_path / "out", log=lambda m: None)
    versions = WeightStore(tmp_path / "out" / "weights-beta-0.1").versions()
    assert [v.format for v in versions] == ["lora", "lora"] and all(v.meta["promoted"] for v in versions)
    assert result["runs"][0]["served_version"] == 2 and "rollback" not in result["runs"][0]


def test_kl_sweep_with_grpo_trains_whole_groups(tmp_path, monkeypatch):
    """--objective grpo: each step is batch_size / group_size prompts × group_size answers,
    advantages relative to each prompt's group, β still the KL coefficient in the reward."""
    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "home"))
    cfg = SweepConfig(
        betas=[0.1],
        steps=2,
        sft_steps=3,
        rm_pairs=16,
        rm_epochs=1,
        batch_size=4,
        objective="grpo",
        group_size=2,
        max_new_tokens=6,
        gate_every=1,
        heldout_prompts=2,
        eval_samples=1,
        kl_budget=1e6,
        device="cpu",
    )
    result = run_sweep(cfg, tmp_path / "out", log=lambda m: None)
    steps = [json.loads(line) for line in (tmp_path / "out" / "steps.jsonl").read_text().splitlines()]
    assert [r["objective"] for r in steps] == ["grpo", "grpo"]
    for r in steps:
        assert r["total_reward"] == pytest.approx(r["rm_score"] + r["neg_beta_kl"])
    assert result["runs"][0]["final_versions"] == 2
    assert "GRPO: fixed β, 4 answers per step (2 per prompt)" in (tmp_path / "out" / "kl-sweep.md").read_text()


def test_kl_sweep_refuses_groups_that_do_not_divide_the_batch():
    from rlhf.cli import build_parser
    from rlhf.experiments.sweep_config import config_from_args

    args = build_parser().parse_args(["experiment", "kl-sweep", "--objective", "grpo", "--group-size", "3"])
    with pytest.raises(SystemExit, match="--group-size 3 must be ≥ 2 and divide --batch-size 16"):
        config_from_args(args)
    with pytest.raises(SystemExit):  # argparse: not an objective the sweep's β applies to
        build_parser().parse_args(["experiment", "kl-sweep", "--objective", "online_dpo"])
