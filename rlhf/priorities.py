"""Scheduling priorities of GenerationService requests (`SamplingParams.priority`, lower is
served first, vLLM's convention). Light on purpose: the rollout worker imports it without
pulling in torch."""

INTERACTIVE = 0  # a person waiting for a chat answer: the gateway's requests (the default)
BACKGROUND = 10  # the rollout worker and `rlhf eval`
MAX = 100
