"""Element tables shared by datasets and encoders.

``element_types`` is the function upstream model configs name to give an encoder its list of
element symbols::

    encoder_kwargs:
      element_types:
        class_path: matsciml.datasets.utils.element_types
"""

from __future__ import annotations

from ase.data import chemical_symbols

__all__ = ["atomic_number_map", "element_types"]

#: Highest atomic number in the tables (oganesson).
MAX_ATOMIC_NUMBER = 118


def atomic_number_map() -> dict[str, int]:
    """Element symbol -> atomic number, hydrogen (1) to oganesson (118), in order."""
    return {symbol: z for z, symbol in enumerate(chemical_symbols[1 : MAX_ATOMIC_NUMBER + 1], start=1)}


def element_types() -> list[str]:
    """Symbols of the elements H (1) to Og (118), ordered by atomic number.

    Encoders that take ``element_types`` (:class:`~matsciml.models.matgl.M3GNet` and the other
    matgl wrappers) give element ``element_types[k]`` the type index ``k``; this list makes the
    index ``Z - 1`` for atomic number ``Z``.
    """
    return list(atomic_number_map())
