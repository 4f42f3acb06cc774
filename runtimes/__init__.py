"""What runs on the device: torch-free.

Prompts and token ids come from the core (``llava_edge.templates``,
``llava_edge.tokenizer``: LLaVA's conversation modes and ids, shared with
training). ``vision``: the vision+projector graph in onnxruntime;
``tensorrt_vision``: the same as a native TensorRT engine. ``llm``: llama.cpp
through llama-cpp-python, fed token ids and image embeddings. ``devices``:
hardware detection and the device profiles (cpu, laptop-gpu, jetson) that pick
providers, offload, threads, batch sizes and variants, with the reasons
``chat --explain`` prints. ``pipeline``: ``EdgeLLaVA``, the Python API that
``llava-edge chat`` wraps. See docs/RUNTIME.md.
"""
