"""Experiments: simulated users, evaluation, and what `rlhf simulate|eval|experiment` run.
The services never import this package (tests/unit/test_layout.py checks it).

  oracles        simulated taste, function(prompt, response) -> float; load_oracle("mod:fn")
  clients        gRPC/HTTP clients the experiments share
  cli_args       the command-line flags of simulate, eval, kl-sweep, win-rate
  simulate       `rlhf simulate`: chat through the gateway, give oracle feedback
  evaluate       `rlhf eval`: win-rate vs the reference, KL, RM accuracy, into a run folder
  probes         controlled pairs: does the RM see the property, or its correlates (length)?
  live           `rlhf experiment win-rate`: simulated users + eval rounds against `rlhf up`
  experiment     `rlhf experiment kl-sweep`: the β figure, reward hacking, the drift gate
  sweep_config   the kl-sweep's settings
  sweep_report   the kl-sweep's tables and figures
  winrate        the pure arithmetic (win-rate, Wilson interval, sequence KL)
  runlog         run folders (JSON lines), tables, plots
  sampling       in-process sampling and reference log-probs
  toy            a tiny SFT'd chat policy for CPU experiments
"""
