"""Thin trio + py-libp2p adapters: they move bytes and time, and decide nothing."""
