"""jdq.recipes."""
