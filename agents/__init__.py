"""Faust agents, found by autodiscovery: one module per stream."""
