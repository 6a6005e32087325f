"""Every model benchmark in benchmarks/ still runs (issue 18, "benchmarks rot"): edge inference, eval
throughput, the agentic task and the bring-your-own bases.

As in tests/test_benchmarks.py (which holds the others), each script runs at its `--smoke` size in a child
process (tests/bench_helpers.py) and the test checks the figures its report claims; no timing is asserted.
"""

from __future__ import annotations

import re

import pytest

from tests.bench_helpers import NUM, number, ratio, row, smoke


@pytest.mark.slow
def test_edge_inference(tmp_path):
    out = smoke("edge_inference.py", tmp_path, "--threads", "1")
    assert ratio(out, r"fp32 transformers \(`generate`, KV cache\): \*\*NUM tokens/s\*\*")[0] > 0
    for t in ("f32", "q8_0", "q4_k_m"):  # the smoke's types (tests/test_quantize.py checks every type)
        size, bpw, ppl, delta, top1, kld, tok_s, vs, secs = row(out, t, 9)
        assert size > 0 and 4 < bpw <= 32.5 and ppl > 0 and 0 <= top1 <= 100 and kld >= 0 and tok_s > 0, t
    assert all(x > 0 for x in ratio(out, r"Q4_K_M through llama.cpp / fp32 transformers: NUMx; Q8_0: NUMx"))


@pytest.mark.slow
def test_eval_throughput(tmp_path):
    out = smoke("eval_throughput.py", tmp_path, "--threads", "1")
    cases = None
    for label in ("transformers fp32", "llama.cpp f32", "llama.cpp q8_0", "llama.cpp q4_k_m"):
        m = re.search(r"^\| " + re.escape(label) + r" \| " + NUM + r" \| " + NUM + r"x \| (\d+)/(\d+) \|$", out, re.M)
        assert m, f"no row {label!r} in:\n{out}"
        assert number(m.group(1)) > 0 and number(m.group(2)) > 0
        assert int(m.group(3)) <= int(m.group(4))
        assert cases in (None, int(m.group(4)))  # every backend ran the same suite
        cases = int(m.group(4))
    assert cases and cases > 4  # the shipped checks and the cloze questions
    q4, same, total = ratio(out, r"q4_k_m / transformers: NUMx cases/s\*\*; the f32 GGUF gave the same answer as "
                                 r"transformers on NUM of NUM cases")
    assert q4 > 0 and 0 <= same <= total == cases


@pytest.mark.slow
def test_agentic_task(tmp_path):
    out = smoke("agentic_task.py", tmp_path, "--threads", "1")
    # the smoke plays the 3 validation episodes of the 12 (the full run plays all 12)
    m = re.search(r"\| completion rate, greedy, 3 of the 12 episodes \(`appliance eval`\) \| " + NUM + r" \| " + NUM,
                  out)
    assert m, out
    assert all(0 <= number(x) <= 1 for x in m.groups())
    m = re.search(r"\| of which the (\d+) validation episodes \(never trained on\) \| (\d+)/\1 \| (\d+)/\1 \|", out)
    assert m, out
    m = re.search(r"\| mean sampled reward, GRPO's first (\d+) / last \1 steps \| " + NUM + r" \| " + NUM, out)
    assert m, out
    assert all(0 <= number(x) <= 1 for x in m.groups()[1:])


@pytest.mark.slow
def test_byo_bases(tmp_path):
    out = smoke("byo_bases.py", tmp_path)
    assert out.startswith("Smoke run (not a measurement)")
    for fam in ("llama3", "mistral", "qwen2", "qwen3", "phi3", "gemma2"):
        m = re.search(rf"^\| {fam} \| sample-trained \| q8_0 \| {NUM} \| {NUM} \| (\d+)/(\d+) \| (\d+)/(\d+) \|",
                      out, re.M)
        assert m, f"no q8_0 row for {fam}:\n{out}"
        assert m.group(3) == m.group(4) != "0" and m.group(5) == m.group(6) != "0", m.group(0)  # tokenizer agrees
        assert re.search(rf"^\| {fam} \| sample-trained \| {NUM} \| {NUM} \| .* top-1 {NUM} \|$", out, re.M), fam
