"""Direct preference optimisation (DPO): the loss over rows of [chosen | rejected] conversations.

    loss = -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))

with log-probabilities summed over the answer tokens only. The reference is the model the run starts
from, handled here so the operator never sets it up: with LoRA/QLoRA it is the policy itself with its
adapters switched off (no second copy in memory); with full training, a frozen copy of the base. At the
first step the policy is the reference, so the loss is exactly log 2 whatever the data.
"""

from __future__ import annotations

IGNORE = -100


class DPO:
    def __init__(self, beta: float, reference=None):
        self.beta = beta
        self.reference = reference  # None: the policy with its adapters disabled

    def losses(self, model, x, y):
        """Per-pair loss, shape (b,), for rows x (tokens) and y (labels) of width 2 x seq_len."""
        import torch
        import torch.nn.functional as F

        half = x.shape[1] // 2
        seqs = torch.cat([x[:, :half], x[:, half:]])
        labels = torch.cat([y[:, :half], y[:, half:]])
        policy = sequence_logps(model, seqs, labels)
        with torch.no_grad():
            ref = self._reference_logps(model, seqs, labels)
        b = x.shape[0]
        margin = (policy[:b] - ref[:b]) - (policy[b:] - ref[b:])
        return -F.logsigmoid(self.beta * margin)

    def _reference_logps(self, model, seqs, labels):
        if self.reference is not None:
            return sequence_logps(self.reference, seqs, labels)
        inner = getattr(model, "module", model)  # DDP's module: no gradients flow here, so no sync is needed
        with inner.disable_adapter():
            return sequence_logps(inner, seqs, labels)


def sequence_logps(model, seqs, labels):
    """Sum of log p(token) over each sequence's scored (answer) tokens, shape (n,)."""
    import torch.nn.functional as F

    logits = model(input_ids=seqs, use_cache=False).logits.float()  # (n, T, vocab)
    target = F.pad(labels[:, 1:], (0, 1), value=IGNORE)  # position t predicts token t+1
    nll = F.cross_entropy(logits.view(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE,
                          reduction="none")
    return -nll.view(target.shape).sum(-1)
