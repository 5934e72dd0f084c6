"""rlhf.experiments's pure parts: oracles, win-rate arithmetic, run folders, prompt sets, the CLI."""

import json
import math

import pytest

from rlhf.experiments import oracles
from rlhf.experiments.evaluate import rm_agreement
from rlhf.experiments.oracles import (
    prefers_concise,
    prefers_exclamation,
    prefers_keyword,
    prefers_question_ending,
    property_of,
)
from rlhf.experiments.runlog import RunFolder, line_plot, table
from rlhf.experiments.simulate import Thumbs
from rlhf.experiments.sweep_report import regime
from rlhf.experiments.winrate import sequence_kl, win_rate, win_rate_interval
from rlhf.prompts import load_prompt_texts

# --- oracles ------------------------------------------------------------------------------


def test_prefers_concise_orders_by_length_and_hates_empty():
    short, long = "Paris.", "The capital of France is the lovely city of Paris, of course."
    assert oracles.prefers_concise("q", short) > oracles.prefers_concise("q", long)
    assert oracles.prefers_concise("q", "") < oracles.prefers_concise("q", long)


def test_prefers_question_ending():
    assert oracles.prefers_question_ending("q", "Paris. Anything else?") > oracles.prefers_question_ending(
        "q", "Paris."
    )
    # two question endings still compare: the shorter wins
    assert oracles.prefers_question_ending("q", "Tea?") > oracles.prefers_question_ending(
        "q", "Would you like some tea?"
    )
    assert oracles.prefers_question_ending("q", 'She asked "why?"') > 0.9


def test_prefers_exclamation_is_the_property_alone():
    assert prefers_exclamation("p", "Great idea!") == 1.0 and prefers_exclamation("p", "Fine.") == 0.0
    # no length tie-break: both with, or both without, is a tie
    assert prefers_exclamation("p", "Yes!") == prefers_exclamation("p", "Yes, a much longer answer!")
    assert prefers_exclamation("p", "No.") == prefers_exclamation("p", "No, a much longer answer.")


def test_property_of_names_the_rewarded_behaviour():
    assert property_of(prefers_question_ending)("Want more?") and not property_of(prefers_question_ending)("No.")
    assert property_of(prefers_keyword)("Yes, please.") and not property_of(prefers_keyword)("pleased")
    assert property_of(prefers_exclamation)("Wow!")
    assert property_of(prefers_concise) is None  # a graded taste has no yes/no behaviour

    def custom(prompt, response):
        return float(response.isupper())

    custom.property = str.isupper
    assert property_of(custom) is str.isupper


def test_prefers_keyword_counts_whole_words():
    assert oracles.prefers_keyword("q", "yes please") > oracles.prefers_keyword("q", "yes")
    assert oracles.prefers_keyword("q", "pleased to help") < 0.5  # not the word itself


def test_gold_oracle_and_biased_rater_disagree_about_length():
    concise = "Please read a book."
    rambling = " ".join(["please"] + ["word"] * 30)
    # the gold oracle prefers the concise answer, the verbose raters the rambling one
    assert oracles.keyword_concise("q", concise) > oracles.keyword_concise("q", rambling)
    assert oracles.verbose_rater("q", rambling) > oracles.verbose_rater("q", concise)
    # on answers of equal length they agree: the keyword wins for both
    assert oracles.keyword_concise("q", "please read") > oracles.keyword_concise("q", "just read")
    assert oracles.verbose_rater("q", "please read") > oracles.verbose_rater("q", "just read")


def test_load_oracle_builtin_and_module_function():
    assert oracles.load_oracle("prefers_concise") is oracles.prefers_concise
    assert oracles.load_oracle("rlhf.experiments.oracles:prefers_keyword") is oracles.prefers_keyword
    fn = oracles.load_oracle("os.path:join")  # any importable callable works
    assert callable(fn)


@pytest.mark.parametrize(
    "spec",
    ["no_such_oracle", "rlhf.experiments.oracles:missing", "no.such.module:f", "rlhf.experiments.oracles:KEYWORD"],
)
def test_load_oracle_errors_name_the_spec(spec):
    with pytest.raises(ValueError, match=spec.split(":")[0].split(".")[0]):
        oracles.load_oracle(spec)


# --- win-rate and KL ----------------------------------------------------------------------


def test_win_rate_counts_ties_half():
    assert win_rate([1, 1, 1, 1], [0, 0, 0, 0]) == 1.0
    assert win_rate([0, 0], [1, 1]) == 0.0
    assert win_rate([1, 0, 2, 2], [0, 1, 2, 3]) == pytest.approx((1 + 0 + 0.5 + 0) / 4)
    assert win_rate([5.0], [5.0]) == 0.5


def test_win_rate_cycles_the_shorter_side():
    assert win_rate([1.0], [0.0, 2.0]) == 0.5
    with pytest.raises(ValueError):
        win_rate([], [1.0])


def test_wilson_interval_contains_the_rate_and_narrows():
    low, high = win_rate_interval(0.7, 50)
    assert low < 0.7 < high
    low2, high2 = win_rate_interval(0.7, 5000)
    assert high2 - low2 < high - low
    assert win_rate_interval(1.0, 10)[1] == pytest.approx(1.0)
    assert win_rate_interval(0.5, 0) == (0.0, 1.0)


def test_sequence_kl_is_the_sum_of_log_ratios():
    assert sequence_kl([-1.0, -2.0], [-1.5, -2.5]) == pytest.approx(1.0)
    assert sequence_kl([], []) == 0.0
    with pytest.raises(ValueError, match="reference"):
        sequence_kl([-1.0], [])


def test_rm_agreement_skips_oracle_ties():
    # pair 1: RM and oracle agree; pair 2: disagree; pair 3: oracle tie, skipped
    assert rm_agreement([1.0, 0.0, 3.0], [0.0, 1.0, 0.0], [2.0, 2.0, 1.0], [1.0, 1.0, 1.0]) == 0.5
    assert math.isnan(rm_agreement([1.0], [0.0], [1.0], [1.0]))


def test_thumbs_threshold_and_running_median():
    fixed = Thumbs(threshold=0.5)
    assert fixed(0.9) == 1 and fixed(0.1) == -1
    median = Thumbs()
    votes = [median(s) for s in [0.0, 1.0, 2.0, 3.0, 0.5, 2.5]]
    assert votes[1:] == [1, 1, 1, -1, 1]  # each score against the median of those before it


# --- run folders, tables, plots --------------------------------------------------------------


def test_run_folder_appends_json_lines_across_instances(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.append("eval", {"policy_version": 1, "win_rate": 0.5})
    RunFolder(tmp_path / "run").append("eval", {"policy_version": 2, "win_rate": 0.75})
    (tmp_path / "run" / "eval.jsonl").open("a").write('{"cut short')  # a crash mid-line
    rows = run.read("eval")
    assert [r["policy_version"] for r in rows] == [1, 2]
    assert run.read("missing") == []
    run.write_json("config.json", {"oracle": "prefers_concise"})
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == {"oracle": "prefers_concise"}


def test_table_plain_and_markdown():
    rows = [{"policy_version": 3, "win_rate": 0.71234}, {"policy_version": 4}]
    plain = table(rows, ["policy_version", "win_rate"])
    assert "0.712" in plain and plain.splitlines()[0].startswith("policy_version")
    md = table(rows, ["policy_version", "win_rate"], markdown=True)
    assert md.splitlines()[1] == "|---|---|" and "| 4 |  |" in md
    assert table([]) == "(no rows)"


def test_line_plot_writes_a_png(tmp_path):
    path = line_plot(
        tmp_path / "p.png",
        "t",
        [1, 2, 3],
        [("a", [1.0, 2.0, 3.0])],
        panels=[("b", [("c", [0.0, 1.0, 0.5])])],
        markers=[(2, "gate refused")],
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_regime_names_the_three_behaviours():
    assert regime({"rm_score": 0.0, "oracle": 0.2}, {"rm_score": 2.0, "oracle": -1.0}).startswith("reward hacking")
    assert regime({"rm_score": 0.0, "oracle": 0.2}, {"rm_score": 0.8, "oracle": 0.6}).startswith("aligned")
    assert regime({"rm_score": 0.0, "oracle": 0.2}, {"rm_score": 0.1, "oracle": 0.25}) == "barely moves"


# --- prompts and the CLI -----------------------------------------------------------------------


def test_prompt_sets_are_disjoint_and_files_load(tmp_path):
    train, heldout = load_prompt_texts("train"), load_prompt_texts("heldout")
    assert train and heldout and not set(train) & set(heldout)
    txt = tmp_path / "p.txt"
    txt.write_text("# comment\nWhat is tea?\n\nWhy?\n")
    assert load_prompt_texts("heldout", txt) == ["What is tea?", "Why?"]
    jl = tmp_path / "p.jsonl"
    jl.write_text(
        json.dumps({"prompt": "a"}) + "\n" + json.dumps({"messages": [{"role": "user", "content": "b"}]}) + "\n"
    )
    assert load_prompt_texts("train", jl) == ["a", "b"]
    with pytest.raises(ValueError):
        load_prompt_texts("other")


def test_cli_has_the_loop_commands():
    from rlhf.cli import build_parser

    p = build_parser()
    args = p.parse_args(["simulate", "--oracle", "prefers_concise", "--feedback", "10"])
    assert args.feedback == 10 and args.mode == "pairwise"
    args = p.parse_args(["eval", "--oracle", "rlhf.experiments.oracles:prefers_concise", "--n", "8"])
    assert args.n == 8 and args.samples == 4
    args = p.parse_args(["experiment", "kl-sweep", "--steps", "3", "--betas", "0,0.1"])
    from rlhf.experiments.sweep_config import config_from_args

    cfg = config_from_args(args)
    assert cfg.steps == 3 and cfg.betas == [0.0, 0.1]
    args = p.parse_args(["experiment", "win-rate", "--oracle", "prefers_concise", "--feedback", "300"])
    assert args.feedback == 300 and args.target == 0.7 and args.kl_budget == 5.0 and args.max_minutes == 30


def test_base_rates_counts_each_behaviour_with_an_interval():
    from rlhf.experiments.base_rates import rates

    answers = ["Want more?", "Yes, please.", "Wow!", "Plain.", "Plain again."]
    by = {r["oracle"]: r for r in rates(answers, dict(oracles.PROPERTY))}
    assert {k: by[k]["showing"] for k in by} == {
        "prefers_question_ending": 1,
        "prefers_keyword": 1,
        "prefers_exclamation": 1,
    }
    assert all(r["low"] < r["base_rate"] == 0.2 < r["high"] for r in by.values())


def test_base_rates_command_samples_the_model(tiny_model_dir, tmp_path, capsys):
    from rlhf.cli import main

    rc = main(
        [
            "experiment",
            "base-rates",
            "--model",
            str(tiny_model_dir),
            "--n",
            "3",
            "--samples",
            "2",
            "--max-tokens",
            "6",
            "--run-dir",
            str(tmp_path / "br"),
            "--oracle",
            "prefers_exclamation",
        ]
    )
    assert rc == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(last) >= {"prefers_question_ending", "prefers_keyword", "prefers_exclamation"}
    assert len((tmp_path / "br" / "answers.jsonl").read_text().splitlines()) == 6
    assert main(["experiment", "base-rates", "--model", str(tiny_model_dir), "--oracle", "prefers_concise"]) == 2


# --- rlhf experiment win-rate ---------------------------------------------------------------


def _row(version: int, rate: float, kl: float) -> dict:
    return {"policy_version": version, "win_rate": rate, "kl_to_reference": kl}


def test_win_rate_target_needs_a_trained_version_a_win_and_kl_in_budget():
    from rlhf.experiments.live import reached

    assert reached(_row(3, 0.72, 4.0), 0.7, 5.0)
    assert not reached(_row(0, 0.9, 0.0), 0.7, 5.0)  # the reference beating itself by luck
    assert not reached(_row(3, 0.69, 1.0), 0.7, 5.0)
    assert not reached(_row(3, 0.95, 5.1), 0.7, 5.0)  # bought with drift past the budget


def test_eval_plot_uses_the_feedback_clock_when_rows_have_it(tmp_path):
    from rlhf.experiments.evaluate import plot_eval

    run = RunFolder(tmp_path)
    assert plot_eval(run) is None
    for minutes, feedback, rate in ((0.0, 0, 0.5), (4.0, 120, 0.6), (9.0, 300, 0.75)):
        run.append(
            "eval",
            {
                "time": 1e9 + minutes,
                "minutes": minutes,
                "feedback": feedback,
                "words": 20,
                "words_reference": 30,
                "win_rate_low": rate - 0.1,
                "win_rate_high": rate + 0.1,
                **_row(int(minutes), rate, minutes / 3),
            },
        )
    png = plot_eval(run, target=0.7)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
