"""Triton kernels, grouped by family so shared building blocks live once."""
