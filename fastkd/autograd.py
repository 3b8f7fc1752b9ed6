"""torch.autograd.Function wrappers of the Triton kernels in fastkd.kernels.

One Function per fused op: forward launches the kernels and saves inputs and
small statistics; backward launches the hand-derived gradient kernels. The
dispatcher (fastkd.backend) lists each op's Function as its ``triton`` entry;
an op with no entry there has no kernel yet.
"""
