"""vLLM worker extension: replaces the weights of a running engine in place.

vLLM imports this class into each worker process (`LLM(worker_extension_cls=...)`) and the
engine reaches it with `collective_rpc("rlhf_load_weights", args=(paths,))`. The worker
reads the safetensors files itself, so no tensor crosses a process boundary. On CPU,
`model.load_weights` after start-up fails because vLLM has repacked some weights; the model
runner's `reload_weights` (what vLLM's own RL hooks use) handles that (DESIGN.md).
Keep imports light: this module is imported in every worker.
"""

from __future__ import annotations


class WeightSwapExtension:
    def rlhf_load_weights(self, paths: list[str]) -> int:
        """Load every tensor of the safetensors `paths`; returns how many were loaded."""
        from safetensors import safe_open

        count = 0

        def tensors():
            nonlocal count
            for path in paths:
                with safe_open(path, framework="pt") as f:
                    for name in f.keys():
                        count += 1
                        yield name, f.get_tensor(name)

        self.model_runner.reload_weights(weights_iterator=tensors())
        self._retie_lm_head()
        return count

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
