"""Readers and writers for the pools users have, and the embedded sample."""
