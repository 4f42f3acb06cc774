"""What runs on the device: torch-free.

``tokenizer``: the checkpoint's own tokenizer (``tokenizer.json``) through the
``tokenizers`` library. ``vision``: the vision+projector graph in onnxruntime.
``llm``: llama.cpp through llama-cpp-python, fed token ids and image embeddings.
``pipeline``: ``EdgeLLaVA``, the Python API that ``llava-edge chat`` wraps.
"""
