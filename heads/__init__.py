"""Medusa heads and tree specs (built on the specdec engine)."""
