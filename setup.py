"""Build script: the Python package, the Triton kernels (shipped as
``distillkit.kernels`` from the top-level ``kernels/`` folder) and, where a
compiler is present, the C++/CUDA extension from ``csrc/``."""

from setuptools import setup

PACKAGES = ["distillkit", "distillkit.kernels"]
PACKAGE_DIR = {"distillkit": "distillkit", "distillkit.kernels": "kernels"}

setup(packages=PACKAGES, package_dir=PACKAGE_DIR)
