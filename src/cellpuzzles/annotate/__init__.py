"""Annotating an analyst's own clusters with a trained model: ``cellpuzzles.annotate(adata, ...)``.

The groups of each donor become puzzles (each group described by the top genes of its mean
expression, ranked as the model was trained), a model folder or the endpoint scores or
answers them, and the groups are assigned to candidate types one-to-one, with a capacity, or
independently. The public entry point is :func:`cellpuzzles.annotate.api.annotate`.
"""

import sys
import types


class _CallableRoom(types.ModuleType):
    """``cellpuzzles.annotate`` is both this room and the function: once the room is imported
    Python binds the name to the module, so the module itself calls the function."""

    def __call__(self, *args, **kwargs):
        from cellpuzzles.annotate.api import annotate

        return annotate(*args, **kwargs)


def __getattr__(name: str):
    if name == "annotate":
        from cellpuzzles.annotate.api import annotate

        return annotate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


sys.modules[__name__].__class__ = _CallableRoom
