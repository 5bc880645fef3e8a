"""Compute: hardware probe, job export and the sandboxed executor."""
