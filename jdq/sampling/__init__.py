"""jdq.sampling."""
