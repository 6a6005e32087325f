"""Quantize: GGUF export with our own writer, llama.cpp quantization, a quality report, and inference.

Modules: `types` (the quant types and their defaults), `safetensors` (reads weights with numpy alone),
`gguf_export` (model directory -> f32 GGUF), `llama` (the llama.cpp calls), `imatrix` (importance matrix
on vault data), `quality` (GGUF vs. source model), `stage` (the `appliance quantize` entry point),
`infer` (generate, chat, serve).
"""
