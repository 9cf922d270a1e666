"""ASE calculator on trained matsciml tasks: :class:`MatSciMLCalculator`."""

from __future__ import annotations

from matsciml.interfaces.ase.calculator import MatSciMLCalculator

__all__ = ["MatSciMLCalculator"]
