"""Fixtures for tests, benchmarks and demos; the services never import these at run time
(tests/unit/test_layout.py checks it).

  rollouts     rollouts without the rest of the loop: HF sampling, a fixed score, log π_ref
  preferences  SyntheticPreference: an easy preference a reward model learns fast
  lora         random LoRA adapters in peft's on-disk layout (adapter-swap tests)
  canary       simulate_canaries: thousands of canaries through the real decision rule
"""
