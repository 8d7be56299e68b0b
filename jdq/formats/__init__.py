"""jdq.formats."""
