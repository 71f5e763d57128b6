"""Build and install fastem (the ``fastem_ext`` package and the ``fastem`` command)."""

from setuptools import find_packages, setup

setup(
    name="fastem",
    version="0.1.0",
    description="Blind image deblurring with a diffusion prior (Fast Diffusion EM)",
    packages=find_packages(include=["fastem_ext", "fastem_ext.*"]),
    package_data={"fastem_ext": ["weights/*.safetensors", "weights/*.md"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "pillow", "safetensors", "tqdm"],
    extras_require={"test": ["pytest", "pytest-benchmark"]},
    entry_points={"console_scripts": ["fastem = fastem_ext.cli:main"]},
)
