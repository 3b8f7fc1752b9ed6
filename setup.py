from setuptools import find_packages, setup

setup(
    name="fastkd",
    version="0.1.0",
    description="Knowledge-distillation losses as fused Triton kernels: a drop-in for Knowledge-Distillation-Zoo",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fastkd", "fastkd.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.1", "triton>=3.0; platform_system == 'Linux'", "numpy"],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6", "pytest-benchmark>=4"],
        "bench": ["pytest-benchmark>=4", "matplotlib"],
        "examples": ["scikit-learn", "matplotlib"],
        "hf": ["transformers>=4.46"],
    },
    entry_points={"console_scripts": ["fastkd=fastkd.__main__:main", "fastkd-bench=fastkd.bench.cli:entry_point"]},
)
