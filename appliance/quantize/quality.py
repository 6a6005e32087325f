"""The quality report of an export: does the GGUF behave like the model it came from?

- tokenizer agreement: llama.cpp tokenizes each held-out record, and a fixed set of hard strings (digits, whitespace
  runs, code, accented and non-Latin scripts, emoji, special tokens in text), exactly as the transformers tokenizer;
- perplexity of the GGUF and of the source model on the same tokens, the same windows;
- top-1 agreement (same next-token argmax), max |logit difference|, mean KL divergence (source || GGUF).
The report holds numbers and record positions only, never text: it is written beside the GGUF.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

MIN_TOKENS = 512  # below this a perplexity (and its delta) says little; the report warns and --strict fails



@dataclass
class Report:
    type: str
    eval_data: str
    eval_split: str
    tokens: int = 0
    windows: int = 0
    window: int = 0
    ppl_source: float = 0.0
    ppl_gguf: float = 0.0
    ppl_delta_pct: float = 0.0
    top1_agreement: float = 0.0
    max_logit_diff: float = 0.0
    mean_kld: float = 0.0
    tokenizer_records: int = 0
    tokenizer_agreed: int = 0
    tokenizer_mismatches: list[int] = field(default_factory=list)  # positions in the eval split
    tokenizer_hard_strings: int = 0  # HARD_STRINGS (and the tokenizer's special tokens in text) checked too
    tokenizer_hard_agreed: int = 0
    tokenizer_hard_mismatches: list[str] = field(default_factory=list)  # their names, never record text
    ppl_bound_pct: float = 0.0
    flags: list[str] = field(default_factory=list)
    eval_reason: str = ""  # why this dataset and split were measured
    warning: str = ""  # too little held-out text to trust the numbers (not a flag: the file may be fine)

    @property
    def ok(self) -> bool:
        return not self.flags

    def to_json(self) -> dict:
        return {**self.__dict__, "ok": self.ok}


def token_stream(tokenize: Callable[[str], list[int]], eos: int, texts: Iterable[str], limit: int) -> np.ndarray:
    """Documents joined by EOS, as in training, cut at `limit` tokens."""
    out: list[int] = []
    for text in texts:
        out += list(tokenize(text)) + [eos]
        if len(out) >= limit:
            break
    return np.asarray(out[:limit], dtype=np.int64)


def windows_of(stream: np.ndarray, window: int) -> list[np.ndarray]:
    """Consecutive windows; a last one shorter than 2 tokens predicts nothing and is dropped."""
    return [w for w in (stream[i:i + window] for i in range(0, len(stream), window)) if len(w) >= 2]


# Text where tokenizers tend to part ways (pre-tokenizer splits, normalization, byte fallback, added tokens):
# checked on every export besides the held-out records, which may hold none of it. Fixed strings, not data.
HARD_STRINGS = {
    "digits": "0 7 42 365 2024 31415926535 1,234,567.89 -0.0001 3.14e-10 0x1F 007",
    "long_number": "123456789012345678901234567890",
    "whitespace_runs": "a  b   c    d     e" + " " * 16 + "f",
    "tabs_newlines": "col1\tcol2\t\tcol3\nline2\n\n\nline5\r\nline6\n \n\t\n",
    "leading_trailing_space": "   padded text   ",
    "code": "def f(x):\n    return {'a': [1, 2], \"b\": x ** 2}  # comment\n\nif x != y && z >= 0 { y++; }\n",
    "accents": "café naïve Ångström façade São Paulo Dvořák Łódź ß œ",
    "non_latin": "Привет мир. 你好，世界。こんにちは。안녕하세요. مرحبا بالعالم. שלום. नमस्ते. Γειά σου.",
    "emoji": "ok 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ 🤖✨",
    "mixed": "Temp: 21.5°C — “quoted” ‘text’ … ½ ¼ ™ © € £ ¥ → ≤ ≥ ≠ ∞",
}


def hard_strings(tokenizer) -> dict[str, str]:
    """HARD_STRINGS plus one string with the tokenizer's own special tokens inside running text."""
    specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
    out = dict(HARD_STRINGS)
    if specials:
        out["special_tokens"] = "text " + " mid ".join(specials) + " end" + "".join(specials[:2]) + "tail"
    added = sorted(t for t in (tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {})
                   if t not in specials)[:64]
    if added:  # right against words and newlines, where a normalizer applied to them would show
        out["added_tokens"] = "call" + "x\n".join(added) + "end " + " ".join(added[:4])
    return out


def tokenizer_agreement(llm, tokenizer, records: Iterable[tuple[int, str]], rep: Report, hard: bool = True) -> None:
    """Each (position, text) and each hard string: llama.cpp's ids must equal transformers' ids (special tokens
    parsed by both)."""
    def agree(text: str) -> bool:
        ours = tokenizer(text, add_special_tokens=False)["input_ids"]
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        return list(ours) == list(theirs)

    for pos, text in records:
        rep.tokenizer_records += 1
        if agree(text):
            rep.tokenizer_agreed += 1
        elif len(rep.tokenizer_mismatches) < 20:
            rep.tokenizer_mismatches.append(pos)
    for name, text in (hard_strings(tokenizer) if hard else {}).items():
        rep.tokenizer_hard_strings += 1
        if agree(text):
            rep.tokenizer_hard_agreed += 1
        else:
            rep.tokenizer_hard_mismatches.append(name)


FLOAT_FILE_TYPES = {0, 1, 32}  # general.file_type of an f32, f16 or bf16 GGUF: held to agree within 1e-2


def source_placement(cuda: bool, free_bytes: int, model_bytes: int, file_type: int | None) -> tuple[str, bool]:
    """(device, bf16 autocast) for the source side of the report: on a GPU when one is free for the model
    (kept in its own fp32 weights), with bf16 matmuls against a quantized GGUF (its own error is far larger)
    and fp32 against a float one (whose logits must agree within 1e-2); else on the CPU in fp32."""
    if not cuda or model_bytes > 0.9 * free_bytes:
        return "cpu", False
    return "cuda", file_type not in FLOAT_FILE_TYPES


def _placement(source, llm) -> tuple[str, bool]:
    import torch

    cuda = torch.cuda.is_available()
    free = torch.cuda.mem_get_info()[0] if cuda else 0
    size = sum(p.numel() * p.element_size() for p in source.parameters())
    file_type = llm.metadata.get("general.file_type")
    return source_placement(cuda, free, size, int(file_type) if file_type is not None else None)


def compare(source, llm, windows: list[np.ndarray], rep: Report,
            progress: Callable[[int, int], None] = lambda d, t: None) -> None:
    """Run both models over every window; fill the perplexity and agreement fields of `rep`. The source runs on
    a GPU when there is one (`source_placement`), and is back on the CPU afterwards."""
    import torch

    device, bf16 = _placement(source, llm)
    if device != "cpu":
        source.to(device)
    try:
        _compare(source, llm, windows, rep, progress, device, bf16)
    finally:
        if device != "cpu":
            source.to("cpu")
            torch.cuda.empty_cache()


def _compare(source, llm, windows, rep, progress, device: str, bf16: bool) -> None:
    import contextlib

    import torch

    nll_src = nll_gguf = kld = 0.0
    agree = n = 0
    max_diff = 0.0
    cast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    for i, w in enumerate(windows):
        with torch.no_grad(), cast():
            a = source(torch.as_tensor(w, device=device)[None]).logits[0].double().cpu().numpy()  # (T, vocab)
        llm.reset()
        llm.eval(w.tolist())
        b = np.asarray(llm.scores[:len(w)], dtype=np.float64)  # (T, vocab)
        la, lb = log_softmax(a[:-1]), log_softmax(b[:-1])
        target = w[1:]
        rows = np.arange(len(target))
        nll_src -= la[rows, target].sum()
        nll_gguf -= lb[rows, target].sum()
        kld += (np.exp(la) * (la - lb)).sum()
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        n += len(target)
        max_diff = max(max_diff, float(np.abs(a - b).max()))
        rep.tokens += len(w)
        progress(i + 1, len(windows))
    rep.windows = len(windows)
    rep.ppl_source = round(float(np.exp(nll_src / n)), 4)
    rep.ppl_gguf = round(float(np.exp(nll_gguf / n)), 4)
    rep.ppl_delta_pct = round(100.0 * (rep.ppl_gguf / rep.ppl_source - 1.0), 3)
    rep.top1_agreement = round(agree / (n + len(windows)), 5)
    rep.max_logit_diff = round(max_diff, 5)
    rep.mean_kld = round(kld / n, 6)


def judge(rep: Report, bound_pct: float, exact: bool) -> None:
    """Flag what an operator must know before shipping this file."""
    rep.ppl_bound_pct = bound_pct
    if rep.tokenizer_agreed < rep.tokenizer_records:
        rep.flags.append(f"tokenizer: llama.cpp disagrees on {rep.tokenizer_records - rep.tokenizer_agreed} of "
                         f"{rep.tokenizer_records} held-out records")
    if rep.tokenizer_hard_agreed < rep.tokenizer_hard_strings:
        rep.flags.append(f"tokenizer: llama.cpp disagrees on {rep.tokenizer_hard_strings - rep.tokenizer_hard_agreed}"
                         f" of {rep.tokenizer_hard_strings} hard strings ({', '.join(rep.tokenizer_hard_mismatches)})")
    if rep.ppl_delta_pct > bound_pct:
        rep.flags.append(f"perplexity rose {rep.ppl_delta_pct:.2f}% (bound {bound_pct:g}%)")
    if exact and rep.top1_agreement < 1.0:
        rep.flags.append(f"top-1 agreement {rep.top1_agreement:.4f} where the {rep.type} file must match "
                         "the source model exactly")


def warn_if_thin(rep: Report, asked: int) -> None:
    """Warn when the held-out text gave fewer tokens than MIN_TOKENS (or than `asked`, when that is smaller)."""
    need = min(MIN_TOKENS, asked)
    if rep.tokens < need:
        rep.warning = (f"quality measured on only {rep.tokens} tokens of {rep.eval_data} ({rep.eval_split}), "
                       f"fewer than {need}: the perplexity and agreement numbers say little; pass --eval "
                       "DATASET@N with more held-out text")


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
