"""Interfaces to other simulation packages (:mod:`matsciml.interfaces.ase`)."""
