"""Daemon-to-daemon transports: TCP (Cython on uvloop) and RDMA (pyverbs)."""
