"""Helpers for tests and benchmarks: real in-process libp2p nodes on 127.0.0.1."""
