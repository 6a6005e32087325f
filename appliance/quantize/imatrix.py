"""An importance matrix on vault data: how strongly each input column of each weight is used.

For every matrix llama.cpp quantizes, the mean over tokens of x_j^2 for each input column j (llama.cpp's
`imatrix` definition); k-quants then spend their precision where the activations are large. Experts get one
row per expert, averaged over the tokens routed to that expert. Computed on the source model in fp32 with
forward hooks; the text streams from the vault and never touches disk.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

DENSE = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}


class _Acc:
    """Running sum of squares and token count, per expert (one row when dense)."""

    def __init__(self, rows: int, cols: int):
        self.sum = np.zeros((rows, cols), np.float64)
        self.count = np.zeros(rows, np.int64)

    def add(self, x, row: int = 0) -> None:  # x: (tokens, cols) torch tensor
        if x.shape[0]:
            self.sum[row] += (x.double() ** 2).sum(0).cpu().numpy()
            self.count[row] += x.shape[0]

    def mean(self) -> np.ndarray:
        out = np.ones_like(self.sum, dtype=np.float32)  # an expert no token reached: no preference
        seen = self.count > 0
        out[seen] = (self.sum[seen] / self.count[seen, None]).astype(np.float32)
        return out.reshape(-1)


def compute(model, windows: list[np.ndarray], progress: Callable[[int, int], None] = lambda d, t: None
            ) -> dict[str, np.ndarray]:
    """GGUF tensor name -> importance values (cols * experts), from running `model` over `windows`."""
    import torch

    acc: dict[str, _Acc] = {}
    hooks = []

    def dense_hook(gguf_name: str):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            acc.setdefault(gguf_name, _Acc(1, x.shape[-1])).add(x)
        return hook

    def experts_hook(layer: int):
        def hook(module, args):
            hs, index = args[0], args[1]  # (tokens, hidden), (tokens, top_k)
            n = module.num_experts
            for e in range(n):
                xe = hs[(index == e).any(-1)]
                acc.setdefault(f"blk.{layer}.ffn_gate_exps.weight", _Acc(n, hs.shape[-1])).add(xe, e)
                acc.setdefault(f"blk.{layer}.ffn_up_exps.weight", _Acc(n, hs.shape[-1])).add(xe, e)
                gate, up = torch.nn.functional.linear(xe, module.gate_up_proj[e]).chunk(2, dim=-1)
                h = module.act_fn(gate) * up
                acc.setdefault(f"blk.{layer}.ffn_down_exps.weight", _Acc(n, h.shape[-1])).add(h, e)
        return hook

    for name, mod in model.named_modules():
        parts = name.split(".")
        if len(parts) >= 4 and parts[0] == "model" and parts[1] == "layers":
            layer, rest = int(parts[2]), ".".join(parts[3:])
            if rest in DENSE:
                hooks.append(mod.register_forward_pre_hook(dense_hook(f"blk.{layer}.{DENSE[rest]}.weight")))
            elif rest == "mlp.experts":
                hooks.append(mod.register_forward_pre_hook(experts_hook(layer)))
        elif name == "lm_head" and not model.config.tie_word_embeddings:
            hooks.append(mod.register_forward_pre_hook(dense_hook("output.weight")))
    try:
        with torch.no_grad():
            for i, w in enumerate(windows):
                model(torch.as_tensor(w, dtype=torch.long)[None])
                progress(i + 1, len(windows))
    finally:
        for h in hooks:
            h.remove()
    return {name: a.mean() for name, a in sorted(acc.items())}


def load_source(model_dir: Path):
    """The source model in fp32 for evaluation; local files only."""
    import torch
    from transformers import AutoModelForCausalLM

    from appliance.train.model import quiet

    quiet()
    from appliance import sealed

    with sealed.opened(model_dir) as d:
        model = AutoModelForCausalLM.from_pretrained(str(d), local_files_only=True, dtype=torch.float32)
    return model.eval()
