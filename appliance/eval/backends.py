"""The same suite on a transformers model directory or a GGUF: greedy completion, log-likelihood, NLL.

Both backends decode greedily one token at a time with a KV cache, so time to first token and tokens per
second mean the same on each; both render chat prompts with the model's own chat template.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from appliance.errors import EvalError
from appliance.quantize.quality import log_softmax


def render_chat(template: str, prompt: str, bos: str, eos: str) -> str:
    """The chat template rendered as transformers renders it (same Jinja options and variables)."""
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=[{"role": "user", "content": prompt}],
                                                add_generation_prompt=True, bos_token=bos, eos_token=eos)
    except TemplateError as e:
        raise EvalError(f"the model's chat template failed: {e}", "fix the template or set chat = false") from None


def _no_template():
    from appliance.errors import UsageError

    return UsageError("this model has no chat template, but the suite has chat cases", "set chat = false")


class HFBackend:
    name = "transformers"

    def __init__(self, model_dir: Path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from appliance.train.model import quiet

        quiet()
        self.torch = torch
        from appliance import sealed

        with sealed.opened(model_dir) as d:  # a sealed model: its plaintext in memory only
            self.tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(str(d), local_files_only=True,
                                                              dtype=torch.float32).eval()
        self.stop = {i for i in (self.tok.eos_token_id, self.tok.convert_tokens_to_ids("<|im_end|>"))
                     if isinstance(i, int) and i >= 0 and i != self.tok.unk_token_id}
        self.eos = self.tok.eos_token_id
        import inspect

        # transformers 5 renamed the cache argument; older releases know only past_key_values
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.n_ctx = int(getattr(self.model.config, "max_position_embeddings", 2048))

    def tokenize(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def render(self, prompt: str, chat: bool) -> str:
        if not chat:
            return prompt
        if not self.tok.chat_template:
            raise _no_template()
        return render_chat(self.tok.chat_template, prompt, self.tok.bos_token or "", self.tok.eos_token or "")

    def complete(self, prompt: str, chat: bool, max_tokens: int) -> dict:
        torch = self.torch
        ids = torch.tensor([self.tokenize(self.render(prompt, chat))])
        out: list[int] = []
        t0 = time.perf_counter()
        ttft = None
        with torch.no_grad():
            res = self.model(ids, use_cache=True)
            while True:
                nxt = int(res.logits[0, -1].argmax())
                if ttft is None:
                    ttft = time.perf_counter() - t0
                if nxt in self.stop or len(out) >= max_tokens or ids.shape[1] + len(out) >= self.n_ctx:
                    break
                out.append(nxt)
                res = self.model(torch.tensor([[nxt]]), **{self._cache_kw: res.past_key_values}, use_cache=True)
        total = time.perf_counter() - t0
        text = self.tok.decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return {"output": text, "ttft_ms": 1000 * ttft,
                "total_ms": 1000 * total, "tokens": len(out)}

    def logits(self, ids: list[int]) -> np.ndarray:
        with self.torch.no_grad():
            return self.model(self.torch.tensor([ids])).logits[0].double().numpy()

    def close(self) -> None:
        pass


class GGUFBackend:
    name = "llama.cpp"

    def __init__(self, path: Path, n_ctx: int = 0):
        from appliance.quantize import llama
        from appliance.quantize.infer import gpu_layers

        # the model's own context length; on the GPU where llama.cpp was built with CUDA
        self.llm = llama.load(path, n_ctx=n_ctx, logits_all=True, n_gpu_layers=gpu_layers())
        self.template = self.llm.metadata.get("tokenizer.chat_template")
        self.eos = self.llm.token_eos()
        im_end = self.llm.tokenize(b"<|im_end|>", add_bos=False, special=True)
        self.stop = {self.eos} | ({im_end[0]} if len(im_end) == 1 else set())

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def render(self, prompt: str, chat: bool) -> str:
        if not chat:
            return prompt
        if not self.template:
            raise _no_template()
        tok = self.llm._model.token_get_text
        return render_chat(self.template, prompt, tok(self.llm.token_bos()) if self.llm.token_bos() >= 0 else "",
                           tok(self.eos))

    def complete(self, prompt: str, chat: bool, max_tokens: int) -> dict:
        llm = self.llm
        ids = self.tokenize(self.render(prompt, chat))
        out: list[int] = []
        t0 = time.perf_counter()
        ttft = None
        llm.reset()
        llm.eval(ids)
        while True:
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if ttft is None:
                ttft = time.perf_counter() - t0
            if nxt in self.stop or len(out) >= max_tokens or llm.n_tokens >= llm.n_ctx():
                break
            out.append(nxt)
            llm.eval([nxt])
        total = time.perf_counter() - t0
        text = llm.detokenize(out).decode("utf-8", errors="replace")
        return {"output": text, "ttft_ms": 1000 * ttft, "total_ms": 1000 * total, "tokens": len(out)}

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.asarray(self.llm.scores[:len(ids)], dtype=np.float64)

    def close(self) -> None:
        self.llm.close()


def loglik(backend, context: str, continuation: str) -> float:
    """Sum of log-probabilities of `continuation`'s tokens after `context` (same tokens on every backend)."""
    a, b = backend.tokenize(context), backend.tokenize(continuation)
    lp = log_softmax(backend.logits(a + b))
    return float(sum(lp[len(a) + i - 1, t] for i, t in enumerate(b)))


def window_nll(backend, windows: list[np.ndarray]) -> list[tuple[float, int]]:
    """(summed NLL, predicted tokens) per window."""
    out = []
    for w in windows:
        lp = log_softmax(backend.logits([int(x) for x in w])[:-1])
        out.append((float(-lp[np.arange(len(w) - 1), w[1:]].sum()), len(w) - 1))
    return out
