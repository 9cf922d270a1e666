"""Import the optional libraries that some encoders wrap, with an error naming the extra.

The wrappers of :mod:`matsciml.models.matgl` and :mod:`matsciml.models.pyg.mace` import their
library only when a model is built, so ``import matsciml.models`` works without them. The
helper itself is :func:`matsciml.common.optional.require` (shared with the tracker callbacks).
"""

from __future__ import annotations

from matsciml.common.optional import EXTRAS, require

__all__ = ["require", "EXTRAS"]
