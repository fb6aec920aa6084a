"""bertfast: fast BERT-family encoders (BERT, ALBERT, RoBERTa, ELECTRA) for PyTorch.

The Triton kernels live in the top-level ``kernels/`` folder and install as ``bertfast.kernels``.
The compiled parts (``csrc/``) are added by their own build step in a later release; this file
builds a pure-Python package that works on any machine with PyTorch.
"""

from setuptools import setup

VERSION = "0.1.0"

setup(
    name="bertfast",
    version=VERSION,
    description="Fused kernels and drop-in modules for BERT, ALBERT, RoBERTa and ELECTRA",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "bertfast",
        "bertfast.ops",
        "bertfast.nn",
        "bertfast.models",
        "bertfast.kernels",
    ],
    package_dir={"bertfast.kernels": "kernels"},
    install_requires=[
        # 2.13.0 (the CPU build CI installs first) satisfies this range.
        "torch>=2.4,<2.15",
        "numpy>=1.24",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "tqdm>=4.60",
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        "hf": ["transformers>=4.48"],
        "test": [
            "transformers>=4.48",
            "pytest>=8",
            "pytest-benchmark>=4",
            "hypothesis>=6.100",
        ],
        "dev": [
            "transformers>=4.48",
            "pytest>=8",
            "pytest-benchmark>=4",
            "hypothesis>=6.100",
        ],
    },
    entry_points={"console_scripts": ["bertfast=bertfast.cli:main"]},
)
