#!/usr/bin/env bash
# The live loop on this CPU with the 135M chat model (docs/results.md, section 3):
# `rlhf up` on a fresh state folder, then `rlhf experiment win-rate` — simulated users give
# oracle feedback through the gateway until the served policy beats the reference.
#
#   bash scripts/win-rate-135m.sh                       # oracle prefers_concise, objective ppo, target 0.7
#   ORACLE=prefers_question_ending bash scripts/win-rate-135m.sh --feedback 1500
#   OBJECTIVE=grpo DISTILL=best_of_n ORACLE=prefers_exclamation bash scripts/win-rate-135m.sh
#
# Any flag goes to `rlhf experiment win-rate`. This script sets only the experiment (oracle,
# objective, run folder); precision, threads and the PPO/RM settings are the machine profile's
# that the experiment's own `rlhf up` applies and prints (rlhf/profile.py; on this 2-core bf16
# CPU: bf16, one torch thread per service, 2 PPO epochs at lr 3e-4, an RM version every 5
# steps at lr 1e-4). Override any by exporting it first (`rlhf config` lists them all), or
# pass `--up-arg=--profile=none` for the settings' plain defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
RLHF=${RLHF:-.venv/bin/rlhf}
RUN=${RUN:-runs/win-rate-135m}
ORACLE=${ORACLE:-prefers_concise}
rm -rf "$RUN"
mkdir -p "$RUN"

# the experiment starts its own fresh `rlhf up` in $RUN/state with the learner objective
# (ppo, grpo, rloo, online_dpo, best_of_n; DISTILL=best_of_n beside ppo/grpo/rloo) and stops it
echo "[win-rate-135m] objective ${OBJECTIVE:-ppo}${DISTILL:+ + distill $DISTILL}, oracle $ORACLE (stack log: $RUN/up.log)"
"$RLHF" experiment win-rate --run-dir "$RUN" --oracle "$ORACLE" --objective "${OBJECTIVE:-ppo}" \
    ${DISTILL:+--distill "$DISTILL"} "$@"
