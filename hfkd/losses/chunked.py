"""A loss on `hidden @ weight.T + bias` computed a chunk of rows at a time, never holding all the logits.

Large-vocabulary distillation is limited by memory: a batch of 4 x 256 tokens over a 49,152-word vocabulary gives
logits of 200 MB in float32 per model, and the divergence needs several tensors of that size plus their gradients.
`chunked_head_loss` takes the final hidden states and the output head instead. For each chunk of rows it builds the
logits, calls `chunk_loss`, and takes the gradients right away (with respect to the chunk's hidden states, the
head's weight and bias), so that only one chunk's logits exist at a time and backward needs no recomputation:
it only scales the stored gradients. Liger-Kernel's fused linear losses work the same way.

The function is given tensors, never a model: the trainer passes the student's last hidden states and the
`lm_head` weight.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, chunk_loss, chunk_size, with_gradient):
        wants = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        ctx.set_materialize_grads(False)
        # The loss is a sum over chunks, so the gradient of each chunk's part can be taken as soon as it is known.
        grad_hidden = torch.zeros_like(hidden) if wants[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if wants[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if wants[2] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            h = hidden[start:end].detach()
            logits = F.linear(h, weight.detach(), bias.detach() if bias is not None else None)
            if with_gradient:
                # The loss comes with its gradient with respect to the logits (closed form).
                loss, grad_logits = chunk_loss(logits, start, end)
            else:
                # Autograd for the chunk's logits only: the two matmuls below then give the rest, so no
                # [vocab, hidden] gradient is built per chunk beside the one accumulated.
                logits.requires_grad_(any(wants))
                with torch.enable_grad():
                    loss = chunk_loss(logits, start, end)
                grad_logits = torch.autograd.grad(loss, logits)[0] if loss.requires_grad else None
            total = total + loss.detach().float()
            if grad_logits is None:
                continue
            # The weight and bias gradients accumulate in float32 without a round trip through a half-precision
            # weight dtype; only the hidden-state gradient takes that dtype.
            if wants[0]:
                grad_hidden[start:end] = grad_logits.to(weight.dtype) @ weight.detach()
            if wants[1]:
                grad_weight.addmm_(grad_logits.T.float(), h.float())
            if wants[2]:
                grad_bias += grad_logits.sum(0).float()
        ctx.save_for_backward(
            grad_hidden,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            grad_bias.to(bias.dtype) if grad_bias is not None else None,
        )
        return total

    @staticmethod
    def backward(ctx, grad_output):
        if grad_output is None:
            return None, None, None, None, None, None
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_output.to(torch.float32)

        def scaled(grad):
            return None if grad is None else grad * scale.to(grad.dtype)

        return scaled(grad_hidden), scaled(grad_weight), scaled(grad_bias), None, None, None


def chunked_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    chunk_loss: Callable[[torch.Tensor, int, int], torch.Tensor],
    chunk_size: int,
    with_gradient: bool = False,
) -> torch.Tensor:
    """Sum over row chunks of `chunk_loss(hidden[start:end] @ weight.T + bias, start, end)`.

    Args:
        hidden: `[rows, hidden]`, the positions that count (padding already left out).
        weight: the output head's `[vocab, hidden]` weight (tied embeddings are fine: gradients add up).
        bias: its `[vocab]` bias, or None.
        chunk_loss: returns a scalar for the logits `[end - start, vocab]` of rows `start:end`; it may use
            anything else indexed by those rows (teacher logits, labels). Its gradient is taken at once.
        chunk_size: rows per chunk; the peak memory is about that many rows of logits times the number of
            `[rows, vocab]` tensors `chunk_loss` creates.
        with_gradient: `chunk_loss` returns `(scalar, its gradient with respect to the logits)` computed in closed
            form (see `hfkd.losses.fused`), and autograd is not used for the logits at all.

    Returns:
        The scalar sum, with gradients for `hidden`, `weight` and `bias` equal to the unchunked computation's.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    return _ChunkedHeadLoss.apply(hidden, weight, bias, chunk_loss, chunk_size, with_gradient)
