"""A reference harness: LLaVA's own code (llava-torch 1.2.2.post1) in .venv-llava, driven from the main venv's tests."""
