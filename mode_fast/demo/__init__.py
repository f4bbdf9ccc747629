"""The demo: the embedded synthetic sample, the end-to-end pipeline on it, and its report."""
