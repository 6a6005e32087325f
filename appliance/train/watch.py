"""Over-fitting, said out loud: a run warns once when its losses show it is learning the data by heart.

Two signs, each said at most once per run, as one line the CLI prints on stderr and the run's metrics keep:

- the validation loss rose for `rises` measurements in a row (it had turned up);
- the training loss (mean of the last `window` steps) fell below `collapse` while the validation loss, when
  one was measured, is more than `gap` times above it; with no validation loss, the collapse alone.

Neither stops a run: `train.early_stop_patience` does that, and the warning names it.
"""

from __future__ import annotations

from collections import deque

STOP_HINT = "set train.eval_every and train.early_stop_patience to stop at the best validation loss, or add data"


class LossWatch:
    """Feed it every step's metrics; `feed` returns a warning the first time a sign shows, else None."""

    def __init__(self, rises: int = 3, collapse: float = 0.05, gap: float = 10.0, window: int = 5):
        self.rises, self.collapse, self.gap, self.window = rises, collapse, gap, window
        self.recent: deque[float] = deque(maxlen=window)
        self.vals: list[tuple[int, float]] = []
        self.warnings: list[str] = []
        self._said: set[str] = set()

    def feed(self, step: int, loss: float | None, val_loss: float | None = None) -> str | None:
        if val_loss is not None:
            self.vals.append((step, val_loss))
            if (w := self._rising()) is not None:
                return w
        if loss is not None and self.collapse > 0:
            self.recent.append(loss)
            return self._collapsed(step)
        return None

    def _rising(self) -> str | None:
        tail = [v for _, v in self.vals[-(self.rises + 1):]]
        if len(tail) <= self.rises or any(b <= a for a, b in zip(tail, tail[1:])):
            return None
        (s0, v0), (s1, v1) = self.vals[-(self.rises + 1)], self.vals[-1]
        return self._say("rising", f"validation loss rose for {self.rises} evaluations in a row ({v0:.4f} at step "
                                   f"{s0} -> {v1:.4f} at step {s1}): the model is over-fitting; {STOP_HINT}")

    def _collapsed(self, step: int) -> str | None:
        if len(self.recent) < self.window:
            return None
        mean = sum(self.recent) / len(self.recent)
        if mean >= self.collapse:
            return None
        val = self.vals[-1][1] if self.vals else None
        if val is None:
            return self._say("collapse", f"training loss {mean:.4f} at step {step} (mean of {self.window} steps): "
                                         f"the model is likely memorising its data; {STOP_HINT}")
        if val <= self.gap * mean:
            return None
        return self._say("collapse", f"training loss {mean:.4f} at step {step} while validation loss is {val:.4f}: "
                                     f"the model is over-fitting; {STOP_HINT}")

    def _say(self, kind: str, text: str) -> str | None:
        if kind in self._said:
            return None
        self._said.add(kind)
        text = "warning: " + text
        self.warnings.append(text)
        return text
