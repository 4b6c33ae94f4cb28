"""The transformers Trainer with gemmatune's loss: LM head only on label positions, in chunks.

Train and eval losses both go through `compute_loss`, so they are the same computation. Multi-process
runs (DDP/FSDP) keep the wrapped model's own forward: calling its inner modules would bypass the
wrapper's gradient synchronisation.
"""

from __future__ import annotations

from transformers import Trainer

from gemmatune.guards import GuardedTrainer
from gemmatune.loss import causal_lm_loss, causal_lm_parts


class ChunkedLossTrainer(Trainer):
    # compute_loss always divides by the label count of the whole accumulated batch (num_items_in_batch),
    # so the Trainer must not divide by the accumulation steps again.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Ask the Trainer to count label tokens for every batch (it does so only for models that take loss
        # kwargs; Gemma3nForConditionalGeneration does not), so gradient accumulation is weighted by tokens.
        self.model_accepts_loss_kwargs = True
        self._parts = causal_lm_parts(self.model) if self.accelerator.num_processes == 1 else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._parts is None:
            # Plain path: the model's own loss over full logits. It normalises by num_items_in_batch.
            if num_items_in_batch is None:
                num_items_in_batch = (inputs["labels"][..., 1:] != -100).sum()
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Accelerate puts autocast around the wrapped model's forward; this path calls the body directly, so it
        # takes the same autocast itself (bf16/fp16 runs; a no-op in fp32), as the multi-process path gets.
        with self.accelerator.autocast():
            loss = causal_lm_loss(model, inputs, num_items_in_batch, self._parts)
        return (loss, {"loss": loss}) if return_outputs else loss


class GemmatuneTrainer(GuardedTrainer, ChunkedLossTrainer):
    """The Trainer `gemmatune train` runs: each base overrides a different method.

    GuardedTrainer (guards.py): atomic checkpoints, retention that counts only complete ones, and
    every micro-batch loss shown to the NaN/inf guard (`training_step`, `_save_checkpoint`).
    ChunkedLossTrainer (above): the label-only chunked loss (`compute_loss`).
    """
