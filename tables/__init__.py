"""Faust tables, found by autodiscovery."""
