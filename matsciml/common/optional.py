"""Import an optional library, with an error that names the extra to install.

Encoders that wrap another library (:mod:`matsciml.models.matgl`, :mod:`matsciml.models.pyg.mace`)
and the tracker callbacks (:class:`~matsciml.lightning.callbacks.UploadCheckpoint`,
:class:`~matsciml.lightning.callbacks.CodeCarbonCallback`) import their library only when
they are used, so ``import matsciml`` works without any of them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from matsciml.common.errors import ConfigError

__all__ = ["require", "EXTRAS"]

#: Top-level Python package -> (distribution name, how to install it).
EXTRAS: dict[str, tuple[str, str]] = {
    "matgl": ("matgl", "pip install 'matsciml[matgl]'"),
    # mace-torch pins e3nn==0.4.4 (see requirements/constraints.txt): its pin is skipped
    "mace": ("mace-torch", "pip install 'matsciml[mace]' && pip install --no-deps mace-torch==0.3.16"),
    "mlflow": ("mlflow", "pip install 'matsciml[tracking]'"),
    "wandb": ("wandb", "pip install 'matsciml[tracking]'"),
    "codecarbon": ("codecarbon", "pip install 'matsciml[emissions]'"),
}


def require(module: str, who: str) -> ModuleType:
    """Import ``module`` for ``who``, or raise a one-line :class:`ConfigError`.

    Parameters
    ----------
    module
        Dotted module name (``"matgl.models"``, ``"mace.modules"``, ``"codecarbon"``).
    who
        The encoder or callback that needs it, named in the error.

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
            f"{who} needs the {dist!r} package, which is not installed or does not import ({err}); "
            f"install it with: {command}"
        ) from None
