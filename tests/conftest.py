import os

import torch

# Without a GPU, Triton kernels run through its interpreter; this must be set
# before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

settings.register_profile("fastkd", deadline=None, max_examples=25, derandomize=True)
# For slow runs such as compute-sanitizer's (benchmarks/gpu.sh).
settings.register_profile("fastkd-sanitizer", deadline=None, max_examples=3, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fastkd"))
