"""data/preparers."""
