"""The loop learns: simulated users, evaluation, and the kl-sweep experiment.

  oracles     simulated taste, function(prompt, response) -> float; load_oracle("mod:fn")
  prompts     training / held-out prompt sets
  simulate    `rlhf simulate`: chat through the gateway, give oracle feedback
  evaluate    `rlhf eval`: win-rate vs the reference, KL, RM accuracy, into a run folder
  experiment  `rlhf experiment kl-sweep`: the β figure, reward hacking, the drift gate
  winrate     the pure arithmetic (win-rate, Wilson interval, sequence KL)
  runlog      run folders (JSON lines), tables, plots
  sampling    in-process sampling and reference log-probs
  toy         a tiny SFT'd chat policy for CPU experiments
"""
