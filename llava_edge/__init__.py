"""llava-edge: take LLaVA-style vision-language models from training to the edge."""

__version__ = "0.1.0"

__all__ = ["EdgeLLaVA", "__version__"]


def __getattr__(name):  # keep `import llava_edge` light: the runtime loads on first use
    if name == "EdgeLLaVA":
        from .runtimes.pipeline import EdgeLLaVA

        return EdgeLLaVA
    raise AttributeError(name)
