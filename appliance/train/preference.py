"""Direct preference optimisation (DPO): the loss over rows of [chosen | rejected] conversations.

    loss = -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))

with log-probabilities summed over the answer tokens only. The reference is the model the run starts
from, handled here so the operator never sets it up: with LoRA/QLoRA it is the policy itself with its
adapters switched off (no second copy in memory); with full training, a frozen copy of the base. At the
first step the policy is the reference, so the loss is exactly log 2 whatever the data.

The reference never changes, so its log-probabilities are computed once per row before the first step
(`prepare`), in fixed blocks of rows shared out among the processes, and looked up by row index after that:
each epoch after the first, and every validation, costs no reference forward at all. A resumed run computes
the same blocks, so it sees the same numbers.
"""

from __future__ import annotations

IGNORE = -100


class DPO:
    def __init__(self, beta: float, reference=None):
        self.beta = beta
        self.reference = reference  # None: the policy with its adapters disabled
        self.table = None  # (rows, 2): the reference's log p(chosen), log p(rejected) of every row, from `prepare`
        self.index = None  # the rows of the next `losses` call

    def prepare(self, model, rows, n_rows: int, micro: int, dist, autocast) -> None:
        """The reference log-probabilities of every row (train and validation), once: blocks of `micro` rows by
        index, block b on process b % world, summed across processes."""
        import numpy as np
        import torch

        from appliance.train.loop import to_device

        table = torch.zeros((n_rows, 2), dtype=torch.float64, device=dist.device)
        with torch.no_grad(), autocast():
            for start in range(dist.rank * micro, n_rows, dist.world * micro):
                index = np.arange(start, min(start + micro, n_rows))
                x, y, _ = to_device(*rows(index), None, dist.device)
                seqs, labels = _pairs(x, y)
                ref = self._reference_logps(model, seqs, labels).double()
                table[start:start + len(index)] = torch.stack([ref[:len(index)], ref[len(index):]], dim=1)
        if dist.world > 1:
            import torch.distributed

            torch.distributed.all_reduce(table)
        self.table = table

    def set_rows(self, index) -> None:
        """The row indices of the next `losses` call (the loop tells), to look the reference up by."""
        self.index = index

    def losses(self, model, x, y):
        """Per-pair loss, shape (b,), for rows x (tokens) and y (labels) of width 2 x seq_len."""
        import torch
        import torch.nn.functional as F

        seqs, labels = _pairs(x, y)
        policy = sequence_logps(model, seqs, labels)
        b = x.shape[0]
        if self.table is not None and self.index is not None:  # computed once, in `prepare`
            rows = torch.as_tensor(self.index, device=self.table.device)
            ref = torch.cat([self.table[rows, 0], self.table[rows, 1]]).to(policy.dtype)
        else:
            with torch.no_grad():
                ref = self._reference_logps(model, seqs, labels)
        self.index = None
        margin = (policy[:b] - ref[:b]) - (policy[b:] - ref[b:])
        return -F.logsigmoid(self.beta * margin)

    def _reference_logps(self, model, seqs, labels):
        if self.reference is not None:
            return sequence_logps(self.reference, seqs, labels)
        inner = getattr(model, "module", model)  # DDP's module: no gradients flow here, so no sync is needed
        with inner.disable_adapter():
            return sequence_logps(inner, seqs, labels)


def _pairs(x, y):
    """[chosen | rejected] rows (b, 2T) -> (sequences, labels), each (2b, T): the b chosen, then the b rejected."""
    import torch

    half = x.shape[1] // 2
    return torch.cat([x[:, :half], x[:, half:]]), torch.cat([y[:, :half], y[:, half:]])


def sequence_logps(model, seqs, labels):
    """Sum of log p(token) over each sequence's scored (answer) tokens, shape (n,)."""
    import torch.nn.functional as F

    logits = model(input_ids=seqs, use_cache=False).logits.float()  # (n, T, vocab)
    target = F.pad(labels[:, 1:], (0, 1), value=IGNORE)  # position t predicts token t+1
    nll = F.cross_entropy(logits.view(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE,
                          reduction="none")
    return -nll.view(target.shape).sum(-1)
