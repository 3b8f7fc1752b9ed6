from setuptools import find_packages, setup

_TRITON = "triton>=3.0; platform_system == 'Linux'"  # Triton has wheels for Linux only
# The tests' second oracle (its JSD, fused linear JSD, TVD and KL). It needs only torch and
# Triton, which the pinned torch already satisfies; pinned so that a later release asking for a
# newer torch cannot make CI replace the pinned one.
_LIGER = "liger-kernel==0.8.5; platform_system == 'Linux'"

setup(
    name="fastkd",
    version="0.1.0",
    description="Knowledge-distillation losses as fused Triton kernels: a drop-in for Knowledge-Distillation-Zoo",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fastkd", "fastkd.*"]),
    python_requires=">=3.9",
    # Triton is not required: PyTorch's CUDA wheels bring the Triton they were built with, and
    # the CPU path never uses it. The "triton" extra adds it where torch did not (the tests run
    # the kernels through Triton's interpreter on the CPU).
    install_requires=["torch>=2.1", "numpy"],
    extras_require={
        "triton": [_TRITON],
        "test": ["pytest>=7", "pytest-xdist>=3", "hypothesis>=6", "pytest-benchmark>=4", _TRITON, _LIGER],
        "bench": ["pytest-benchmark>=4", "matplotlib"],
        "examples": ["scikit-learn", "matplotlib"],
        "hf": ["transformers>=4.46"],
    },
    entry_points={"console_scripts": ["fastkd=fastkd.__main__:main", "fastkd-bench=fastkd.bench.cli:entry_point"]},
)
