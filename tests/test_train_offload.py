"""The GPU side of what follows training (docs/QUANTIZE.md): llama.cpp offloads layers only on a CUDA build,
and the quality report runs its source model on a GPU (bf16 against a quantized GGUF) or, without one, on
the CPU in fp32 as before. Only the choices are checked here; the CPU fallback is what runs."""

import numpy as np

from appliance.quantize import infer, quality


def test_layers_are_offloaded_by_default_only_on_a_cuda_build():
    assert infer.gpu_layers(None, offload=True) == -1  # all of them
    assert infer.gpu_layers(None, offload=False) == 0
    assert infer.gpu_layers(12, offload=False) == 12  # asked for: passed on as given
    assert infer.gpu_layers(None) == 0  # this box's llama.cpp: the CPU build


def test_the_report_source_goes_to_a_gpu_that_has_room_in_the_precision_its_gguf_is_judged_at():
    gb = 1 << 30
    assert quality.source_placement(False, 0, gb, 15) == ("cpu", False)
    assert quality.source_placement(True, 80 * gb, 28 * gb, 15) == ("cuda", True)  # Q4_K_M: bf16 matmuls
    assert quality.source_placement(True, 80 * gb, 28 * gb, 1) == ("cuda", False)  # f16: fp32, within 1e-2
    assert quality.source_placement(True, 80 * gb, 187 * gb, 15) == ("cpu", False)  # 8x7B in fp32: no room


def test_compare_runs_the_source_on_the_cpu_without_a_gpu():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    source = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=2)).eval()
    windows = [np.arange(8) % 64, (np.arange(8) * 7) % 64]

    class Same:  # a "GGUF" that answers exactly as the source
        metadata = {"general.file_type": "15"}

        def reset(self):
            pass

        def eval(self, ids):
            with torch.no_grad():
                self.scores = source(torch.tensor([ids])).logits[0].double().numpy()

    rep = quality.Report("q4_k_m", "none", "test")
    quality.compare(source, Same(), windows, rep)
    assert rep.top1_agreement > 0.8 and rep.max_logit_diff < 1e-5 and rep.ppl_delta_pct == 0.0
    assert next(source.parameters()).device.type == "cpu"


def test_generate_chat_serve_and_eval_take_the_layers_to_offload(monkeypatch, cli):
    from appliance import api
    from appliance.quantize import llama

    seen = []
    monkeypatch.setattr(llama, "load", lambda path, **kw: seen.append(kw["n_gpu_layers"]))
    api.gguf_open("m.gguf", 0, 0, 7)
    api.gguf_open("m.gguf")
    assert seen == [7, infer.gpu_layers()]  # asked for, else as the build allows (none on this CPU build)
    for command in ("generate", "chat", "serve"):
        r = cli(command, "--help")
        assert r.code == 0 and "--gpu-layers" in r.out, command
    r = cli("generate", "m.gguf", "hi", "--gpu-layers", "-2")
    assert r.code == 2 and "--gpu-layers" in r.err
