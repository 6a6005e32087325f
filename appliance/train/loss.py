"""Next-token cross-entropy through the output head, a chunk of tokens at a time.

A plain loss builds the logits of the whole micro batch, (tokens, vocab), and an fp32 copy, its gradient and
its log-softmax: at dense-1b's micro batch (8 x 2048 tokens, 32k vocabulary) about 8 GB, more than the rest of
the activations. Here the head's matmul and the loss run over `CHUNK` tokens at a time, each piece under
activation checkpointing: the forward keeps only the hidden states (bf16 on a GPU) and the summed loss, and the
backward recomputes one piece's logits at a time. The cost is one more head matmul (about 2 % of dense-1b's
FLOPs); the result is the plain loss and its gradients within float rounding (`tests/test_train_throughput.py`).

The model's own forward runs as ever (DDP's and FSDP2's hooks around it): only its output head is replaced, for
one forward, by one that returns the summed loss instead of logits (`head_loss`).
"""

from __future__ import annotations

import contextlib

IGNORE = -100
CHUNK = 4096  # tokens per piece: 4096 x 32k vocabulary x 4 bytes = 0.5 GB of fp32 logits at a time


def chunked_cross_entropy(hidden, weight, target, chunk: int = CHUNK):
    """Summed cross-entropy of `target` (N,) under logits `hidden @ weight.T`, never built whole.

    hidden (N, h), weight (vocab, h); positions whose target is IGNORE score nothing. Returns an fp32 scalar.
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    for s in range(0, hidden.shape[0], chunk):
        h, t = hidden[s:s + chunk], target[s:s + chunk]
        total = total + (checkpoint(_piece, h, weight, t, use_reentrant=False) if grad else _piece(h, weight, t))
    return total


def _piece(h, weight, t):
    import torch.nn.functional as F

    logits = F.linear(h, weight)  # (chunk, vocab): bf16 under autocast, then fp32 for the softmax
    if logits.dtype.itemsize < 4:
        logits = logits.float()
    return F.cross_entropy(logits, t, ignore_index=IGNORE, reduction="sum")


def supports(model) -> bool:
    """Whether `model`'s head can be swapped for the chunked loss: a plain linear head, and no logit
    post-processing in the model's forward (Gemma 2's soft-capping) that the loss would then skip."""
    import torch

    inner = getattr(model, "module", model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    cfg = getattr(inner, "config", None)
    return type(head) is torch.nn.Linear and head.bias is None and not getattr(cfg, "final_logit_softcapping", None)


@contextlib.contextmanager
def head_loss(model, target, chunk: int = CHUNK):
    """For the forward passes inside, `model(...).logits` is the summed next-token loss against `target` (B, T)
    (already shifted: position t's target is token t+1), computed by `chunked_cross_entropy`."""
    inner = getattr(model, "module", model)
    head = inner.get_output_embeddings()

    def forward(hidden):  # (B, T, h) -> a scalar
        return chunked_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, target.reshape(-1), chunk)

    head.forward = forward
    try:
        yield
    finally:
        del head.forward  # the class's own forward again
