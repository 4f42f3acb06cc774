"""Split a LLaVA checkpoint into the files an edge device runs.

``vision_onnx``: vision tower + projector as one ONNX graph.
``llm_gguf``: the language model as a GGUF for llama.cpp, streamed tensor by tensor.
``bundle``: both, plus tokenizer files, under one ``manifest.json``.
"""
