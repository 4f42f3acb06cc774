"""The toy world: a small, real instance of the LLaVA problem built on this machine.

``scenes`` draws coloured shapes and knows the ground truth; ``data`` turns scenes
into LLaVA's JSON conversation files; ``tokenizer`` trains a Llama-style
SentencePiece tokenizer; ``model`` writes a Hugging Face
``LlavaForConditionalGeneration`` checkpoint that loads like any llava-hf model.
"""
