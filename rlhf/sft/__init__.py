"""Supervised fine-tuning, InstructGPT's stage 1: `rlhf sft`.

  config   SFTConfig: every setting and its default
  data     chat JSONL files and the gateway's outbox → examples → (input_ids, labels)
  train    run_sft: LoRA or full, held-out loss, resumable, merged model folder
  command  the `rlhf sft` and `rlhf export` command lines

Nothing is imported here, so that `rlhf --help` does not load torch.
"""
