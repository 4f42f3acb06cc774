"""A child-process prelude that runs the CLI with torch, transformers and sentencepiece unimportable, as on a device."""

import textwrap

BLOCK_TORCH = textwrap.dedent("""
    import sys, importlib.abc
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split('.')[0] in ('torch', 'transformers', 'sentencepiece'):
                raise ImportError('blocked: ' + name)
    sys.meta_path.insert(0, Block())
    from llava_edge.cli import main
    rc = main(sys.argv[1:])
    assert not any(m.split('.')[0] in ('torch', 'transformers') for m in sys.modules), 'torch was imported'
    sys.exit(rc)
""")


def without(*packages: str) -> str:
    """A child-process prelude: the CLI on a machine where ``packages`` are not installed."""
    return textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split('.')[0] in {packages!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        sys.meta_path.insert(0, Block())
        from llava_edge.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
