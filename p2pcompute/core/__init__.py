"""The sans-I/O core of p2pcompute.

Nothing under this package touches a socket, a clock, randomness, trio, libp2p or torch: time and
random bytes are arguments. ``tests/core/test_sans_io.py`` enforces it.
"""
