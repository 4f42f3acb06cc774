"""Child-process preludes that run the CLI with some packages unimportable, as on a device without them."""

import textwrap


def without(*packages: str, check_unimported: tuple[str, ...] = ()) -> str:
    """A child-process prelude: the CLI on a machine where ``packages`` are not installed.

    ``check_unimported``: packages the run must not have imported (it fails if one was).
    """
    return textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split('.')[0] in {packages!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        sys.meta_path.insert(0, Block())
        from llava_edge.cli import main
        rc = main(sys.argv[1:])
        assert not any(m.split('.')[0] in {check_unimported!r} for m in sys.modules), 'imported: ' + {check_unimported!r}[0]
        sys.exit(rc)
    """)


# the runtime path: torch and transformers absent, and never imported
BLOCK_TORCH = without("torch", "transformers", check_unimported=("torch", "transformers"))
