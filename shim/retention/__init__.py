"""Retention of checkpoint archives: which archives a node keeps, and the collector that deletes the rest."""
