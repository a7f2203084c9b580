"""The model outside PyTorch: `calofm export --format onnx` (onnx_export.py) writes the prefill and the
one-hit decode step of each class (graphs.py) as ONNX graphs with a JSON of tokens, energy bins and
geometry; onnx_runtime.py is the reference host loop in onnxruntime. Needs the `onnx` extra. Above
model, tokenizer and generation; nothing below imports it."""
