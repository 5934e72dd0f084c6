"""vLLM worker extension: replaces the weights of a running engine in place.

vLLM imports this class into each worker process (`LLM(worker_extension_cls=...)`) and the
engine reaches it with `collective_rpc("rlhf_stage_weights", args=(paths,))` etc. The worker
reads the safetensors files itself, so no tensor crosses a process boundary. On CPU,
`model.load_weights` after start-up fails because vLLM has repacked some weights; the model
runner's `reload_weights` (what vLLM's own RL hooks use) handles that.
Keep imports light: this module is imported in every worker.
"""

from __future__ import annotations


class WeightSwapExtension:
    """Two steps, so the expensive part runs while the old weights still serve: `stage`
    reads the tensors into memory beside the model, `commit` loads them into it (called
    with no request in flight), `drop` forgets a staged update that was refused."""

    def rlhf_stage_weights(self, paths: list[str]) -> int:
        """Read every tensor of the safetensors `paths`; returns how many."""
        from safetensors.torch import load

        staged: list = []
        for path in paths:
            with open(path, "rb") as f:
                staged.extend(load(f.read()).items())
        self._rlhf_staged = staged
        return len(staged)

    def rlhf_commit_staged(self) -> int:
        staged, self._rlhf_staged = getattr(self, "_rlhf_staged", None), None
        if not staged:
            raise RuntimeError("no staged weights to commit")
        self.model_runner.reload_weights(weights_iterator=iter(staged))
        self._retie_lm_head()
        return len(staged)

    def rlhf_drop_staged(self) -> None:
        self._rlhf_staged = None

    def _retie_lm_head(self) -> None:
        """Make a tied lm_head compute with the reloaded embedding.

        vLLM 0.32's layer-wise reload re-processes the layers it loads, but the tied lm_head
        is skipped by the loader, so on CPU its GEMM stays pre-packed from the previous
        version's embedding matrix: the logits would still come from the old weights."""
        config = self.model_runner.model_config.hf_config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        if not getattr(text_config, "tie_word_embeddings", False):
            return
        model = self.model_runner.get_model()
        lm_head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        lm_head = getattr(lm_head, "base_layer", lm_head)
        embed = getattr(embed, "base_layer", embed)
        if lm_head is None or embed is None:
            return
        if lm_head.weight is not embed.weight:
            lm_head.weight = embed.weight
        quant_method = getattr(lm_head, "quant_method", None)
        if quant_method is not None:
            quant_method.process_weights_after_loading(lm_head)
