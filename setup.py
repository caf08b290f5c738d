"""pilimit: infinite-width π-networks in PyTorch.

Install torch first (``pip install torch==2.13.0``): a plain ``torch``
requirement would pull a multi-GB CUDA build on machines without one.
"""

from setuptools import find_packages, setup

setup(
    name="pilimit",
    version="0.1.0",
    description="Infinite-width π-networks (the π-limit) with a TrAct input layer, in PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["inf", "inf.*", "experiments", "experiments.*"]),
    install_requires=[
        "torch>=2.1",
        "numpy",
        "scipy",
        "tqdm",
        "matplotlib",
        "scikit-learn",
        "pillow",
        "traker",
    ],
    extras_require={
        # pytest for the tests, ruff for the lint that .ci/run applies (settings in pyproject.toml)
        "test": ["pytest", "torch-tract", "ruff==0.17.6"],  # pinned: format rules change between releases
    },
)
