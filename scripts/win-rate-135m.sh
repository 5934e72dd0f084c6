#!/usr/bin/env bash
# The live loop on this CPU with the 135M chat model (docs/results.md, section 3):
# `rlhf up` on a fresh state folder, then `rlhf experiment win-rate` — simulated users give
# oracle feedback through the gateway until the served policy beats the reference.
#
#   bash scripts/win-rate-135m.sh                       # oracle prefers_concise, target 0.7
#   ORACLE=prefers_question_ending bash scripts/win-rate-135m.sh --feedback 1500
#
# Any flag goes to `rlhf experiment win-rate`. Settings below are environment variables the
# services read (`rlhf config` lists them all); override any by exporting it first.
set -euo pipefail
cd "$(dirname "$0")/.."
RLHF=${RLHF:-.venv/bin/rlhf}
RUN=${RUN:-runs/win-rate-135m}
ORACLE=${ORACLE:-prefers_concise}
rm -rf "$RUN"
mkdir -p "$RUN"

# 2 cores: one torch thread per service, so generator and learner overlap instead of thrashing
export RLHF_TORCH_THREADS=${RLHF_TORCH_THREADS:-1} RLHF_LEARNER_TORCH_THREADS=${RLHF_LEARNER_TORCH_THREADS:-1}
export RLHF_REWARD_TORCH_THREADS=${RLHF_REWARD_TORCH_THREADS:-1} RLHF_REFERENCE_TORCH_THREADS=${RLHF_REFERENCE_TORCH_THREADS:-1}
# bf16 where the CPU has it (AMX / AVX512-BF16 here): decode ~1.9x, PPO forward+backward ~2x
# faster than fp32. The learner recomputes π_old in its own precision, so its ratios stay exact.
export RLHF_DTYPE=${RLHF_DTYPE:-bfloat16} RLHF_LEARNER_MIXED_PRECISION=${RLHF_LEARNER_MIXED_PRECISION:-bf16}
# rollouts: 4 prompts × 4 answers of ≤ 64 tokens make one learner batch (= one version)
export RLHF_ROLLOUT_MAX_TOKENS=${RLHF_ROLLOUT_MAX_TOKENS:-64} RLHF_ROLLOUT_CONCURRENCY=${RLHF_ROLLOUT_CONCURRENCY:-4}
# PPO: 16 rollouts per step, 2 epochs, LoRA r=8 at lr 3e-4
export RLHF_LEARNER_PPO_EPOCHS=${RLHF_LEARNER_PPO_EPOCHS:-2} RLHF_LEARNER_LR=${RLHF_LEARNER_LR:-3e-4}
# the RM: a new version every 5 training steps (80 new comparisons), a faster learning rate
export RLHF_REWARD_PUBLISH_EVERY_STEPS=${RLHF_REWARD_PUBLISH_EVERY_STEPS:-5} RLHF_REWARD_LR=${RLHF_REWARD_LR:-1e-4}

"$RLHF" up --state-dir "$RUN/state" >"$RUN/up.log" 2>&1 &
UP=$!
trap 'kill -TERM $UP 2>/dev/null; wait $UP 2>/dev/null || true' EXIT
echo "[win-rate-135m] starting the stack (log: $RUN/up.log)"
until grep -q "all services SERVING" "$RUN/up.log"; do
    kill -0 $UP 2>/dev/null || { tail -40 "$RUN/up.log"; exit 1; }
    sleep 3
done
"$RLHF" experiment win-rate --state-dir "$RUN/state" --run-dir "$RUN" --oracle "$ORACLE" "$@"
