"""Encoders, output heads, losses and task modules."""
