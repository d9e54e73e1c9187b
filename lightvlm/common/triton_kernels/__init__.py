"""Triton kernels for the CUDA path. Each file holds one kernel and its plain-torch twin, which the
CPU path uses and the tests compare the kernel against (under TRITON_INTERPRET=1 on the CPU)."""
