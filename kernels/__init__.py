"""Compute kernels for snapshots: fingerprints and fused copy + fingerprint.

`fingerprint` defines a position-sensitive 32-bit checksum that is exact on every device
(Triton on CUDA, torch int64 ops on CPU, a Python oracle for tests); `snapshot_copy` fuses
it with a copy. Both register torch custom ops, `torch.ops.splice.fingerprint` and
`torch.ops.splice.copy_fingerprint`, when their module is imported. Triton is optional:
without it CUDA tensors cannot be fingerprinted on the device, CPU tensors still can.
"""
