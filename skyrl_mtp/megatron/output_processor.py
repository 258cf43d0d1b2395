"""The objective-neutral extension point at the GPT postprocess boundary.

Contract (identical to megatron-core >= 0.18's native hook): ``model(input_ids, position_ids,
attention_mask, ..., output_processor=fn, output_processor_context=ctx)`` runs the embedding and
decoder as usual, then calls ``fn(**kwargs)`` with the keyword arguments in
:data:`PROCESSOR_KWARGS` (decoder hidden states ``[s, b, h]``, the output layer and its weight,
labels / loss mask / packing metadata, the caller's ``context``, ...) *instead of* the default
logits/loss path, and returns whatever ``fn`` returns. Without a processor the model behaves
exactly as Megatron's GPTModel.

On megatron-core >= 0.18 the native ``GPTModel`` is used as is. On 0.16-0.17
:class:`OutputProcessorGPTModel`, a subclass (Megatron's files are neither edited nor patched),
provides the same keywords. The RL loss is written once against this contract.

The trunk models the project builds have no MTP block (see ``model_builder``): Megatron's
native MTP loss cannot run inside them on any version, and the MTP head is replayed by the
caller on the detached trunk (``skyrl_mtp.mtp.replay``).
"""

from __future__ import annotations

from typing import Any, Callable

from megatron.core.models.gpt import GPTModel

# The keyword arguments every output processor receives (megatron-core 0.18+ names).
PROCESSOR_KWARGS = (
    "hidden_states", "output_layer", "output_weight", "labels", "loss_mask", "input_ids",
    "position_ids", "attention_mask", "decoder_input", "inference_context", "packed_seq_params",
    "runtime_gather_output", "context", "compute_language_model_loss", "scale_logits", "config",
)

OutputProcessor = Callable[..., Any]


class OutputProcessorGPTModel(GPTModel):
    """GPTModel with the >= 0.18 ``output_processor`` keywords, for megatron-core 0.16-0.17."""

    _active_processor: tuple[OutputProcessor, Any] | None = None

    def forward(self, *args, output_processor: OutputProcessor | None = None,
                output_processor_context: Any = None, **kwargs):
        if output_processor is None:
            return super().forward(*args, **kwargs)
        # GPTModel.forward calls self._postprocess(...) with keywords only; hand the processor
        # over through the instance for the duration of this call.
        self._active_processor = (output_processor, output_processor_context)
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._active_processor = None

    def _postprocess(self, **kwargs):
        if self._active_processor is None:
            return super()._postprocess(**kwargs)
        processor, context = self._active_processor
        if kwargs.get("mtp_in_postprocess"):
            raise RuntimeError("output_processor on a GPTModel with an MTP block: build trunks without "
                               "mtp_block_spec (skyrl_mtp.megatron.model_builder) so no native MTP loss runs")
        hidden_states = kwargs["hidden_states"]
        if not self.post_process:
            return hidden_states
        output_weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        return processor(
            hidden_states=hidden_states,
            output_layer=self.output_layer,
            output_weight=output_weight,
            labels=kwargs.get("labels"),
            loss_mask=kwargs.get("loss_mask"),
            input_ids=kwargs.get("input_ids"),
            position_ids=kwargs.get("position_ids"),
            attention_mask=kwargs.get("attention_mask"),
            decoder_input=kwargs.get("decoder_input"),
            inference_context=kwargs.get("inference_context"),
            packed_seq_params=kwargs.get("packed_seq_params"),
            runtime_gather_output=kwargs.get("runtime_gather_output"),
            context=context,
            compute_language_model_loss=self.compute_language_model_loss,
            scale_logits=getattr(self, "_scale_logits", _identity),
            config=self.config,
        )


def _identity(logits):
    return logits


def gpt_model_class() -> type[GPTModel]:
    """The GPTModel class that offers the output_processor keywords on this megatron-core."""
    from skyrl_mtp.megatron.compat import has_native_output_processor

    return GPTModel if has_native_output_processor() else OutputProcessorGPTModel
