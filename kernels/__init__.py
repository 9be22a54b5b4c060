"""Compute kernels (fingerprints, fused snapshot copies).

Empty in this release: the GPU fingerprint and copy kernels are tracked by their own issue.
"""
