"""Import the optional libraries that some encoders wrap, with an error naming the extra.

The wrappers of :mod:`matsciml.models.matgl` and :mod:`matsciml.models.pyg.mace` import their
library only when a model is built, so ``import matsciml.models`` works without them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from matsciml.common.errors import ConfigError

__all__ = ["require", "EXTRAS"]

#: Python package -> (distribution name, how to install it).
EXTRAS: dict[str, tuple[str, str]] = {
    "matgl": ("matgl", "pip install 'matsciml[matgl]'"),
    # mace-torch pins e3nn==0.4.4 (see requirements/constraints.txt): its pin is skipped
    "mace": ("mace-torch", "pip install 'matsciml[mace]' && pip install --no-deps mace-torch==0.3.16"),
}


def require(module: str, model: str) -> ModuleType:
    """Import ``module`` for the encoder ``model``, or raise a one-line :class:`ConfigError`.

    Parameters
    ----------
    module
        Dotted module name (``"matgl.models"``, ``"mace.modules"``).
    model
        The encoder that needs it, named in the error.

    Raises
    ------
    ConfigError
        The package is missing (or fails to import); the message names the extra to install.
    """
    top = module.split(".")[0]
    dist, command = EXTRAS.get(top, (top, f"pip install {top}"))
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(
            f"{model} needs the {dist!r} package, which is not installed or does not import ({err}); "
            f"install it with: {command}"
        ) from None
