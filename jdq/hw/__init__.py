"""jdq.hw."""
