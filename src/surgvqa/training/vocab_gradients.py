"""The vocabulary-sized parts of a training step, without their vocabulary-sized temporaries.

With the loss on the supervised positions only, what is left of the step that scales with the vocabulary (151,936
ids in every Qwen-VL) is the LM head, the cross-entropy over its logits and, when the input embedding is tied to
the LM head, the input embedding's gradient. On the tiny model that is most of the step; on a real one it is a
few hundred MB of temporaries. Two changes, each giving the same gradients as stock PyTorch:

- :func:`summed_cross_entropy` keeps the logits and one logsumexp per row, and builds the gradient
  (softmax − one-hot) in a single buffer. ``F.cross_entropy`` keeps a log-probability copy of the logits and, in
  backward, zero-fills another vocabulary-wide buffer for the NLL before the log-softmax backward writes a third.
- :func:`route_tied_embedding_rows` makes the tied input embedding add its gradient to the few rows it looked up,
  in place in the weight's gradient, after the LM head's gradient is there. Stock ``nn.Embedding`` zero-fills a
  dense vocabulary × hidden gradient and autograd then adds it to the LM head's, element by element.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class _SummedCrossEntropy(torch.autograd.Function):
    # Hand-written: Liger's and Apple's fused cross-entropies are Triton kernels (CUDA only) that also take over
    # the LM head; this needs only the loss over logits the model already computed, on any device.
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_normaliser = torch.logsumexp(logits, dim=-1)
        loss = (log_normaliser - logits.gather(1, targets[:, None]).squeeze(1)).sum()
        ctx.save_for_backward(logits, targets, log_normaliser)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, targets, log_normaliser = ctx.saved_tensors
        grad = torch.sub(logits, log_normaliser[:, None]).exp_()  # softmax, in the one buffer
        grad[torch.arange(targets.numel(), device=grad.device), targets] -= 1
        return grad.mul_(grad_loss), None


def summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy(logits, targets, reduction="sum")`` for 2-D ``logits`` and in-range ``targets``."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"summed_cross_entropy takes logits (rows, vocab) and targets (rows,), not "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    return _SummedCrossEntropy.apply(logits, targets)


def _row_gradient_hook(weight: nn.Parameter, padding_idx: int | None):
    def hook(module: nn.Embedding, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and weight.requires_grad):
            return output
        ids = args[0]
        # The output, cut from the weight: autograd then finishes the LM head's contribution to weight.grad
        # without waiting for the embedding's, which the end-of-backward callback below adds to the rows used.
        detached = output.detach().requires_grad_()

        def add_rows(grad: torch.Tensor) -> None:
            flat_ids = ids.reshape(-1)
            rows = grad.reshape(flat_ids.numel(), -1)
            if padding_idx is not None:  # nn.Embedding's rule: the padding row never gets a gradient
                rows = rows.masked_fill((flat_ids == padding_idx)[:, None], 0)

            def accumulate() -> None:
                # Repeated ids summed in float32 first, then one add per row: in bf16 a running sum of every
                # occurrence of a template token would round at each add (CUDA's embedding backward sums in float32).
                used, position = torch.unique(flat_ids, return_inverse=True)
                summed = torch.zeros(used.numel(), rows.shape[1], dtype=torch.float32, device=rows.device)
                summed.index_add_(0, position, rows.float())
                if weight.grad is None:
                    weight.grad = torch.zeros_like(weight)
                weight.grad.index_add_(0, used, summed.to(weight.grad.dtype))

            torch.autograd.Variable._execution_engine.queue_callback(accumulate)

        detached.register_hook(add_rows)
        return detached

    return hook


def route_tied_embedding_rows(model: nn.Module) -> Any | None:
    """Install the row-wise tied-embedding gradient on ``model``; the hook's handle, or None where it does not apply.

    It applies to a trainable input embedding that is the LM head's weight (Qwen2-VL-2B, Qwen2.5-VL-3B, the tiny
    model) and a plain ``nn.Embedding`` lookup. The rows reach ``weight.grad`` only through ``backward()``, at its
    end: it is for one model replica whose optimizer steps after backward. Under DDP, FSDP or DeepSpeed the
    reduction starts from the weight's gradient before the rows are added, DataParallel replicas share the hook
    but not the weight, a layer-wise optimizer steps inside backward, and ``torch.autograd.grad`` never sees the
    rows, so the caller leaves it off in the first four and removes it after training.
    """
    embedding = model.get_input_embeddings()
    output_embedding = model.get_output_embeddings()
    if not isinstance(embedding, nn.Embedding) or output_embedding is None:
        return None
    weight = embedding.weight
    if output_embedding.weight is not weight or not weight.requires_grad:
        return None
    if embedding.max_norm is not None or embedding.scale_grad_by_freq or embedding.sparse:
        return None
    return embedding.register_forward_hook(_row_gradient_hook(weight, embedding.padding_idx))
