"""Build script: package metadata lives in pyproject.toml; this file adds the compiled core."""
from setuptools import setup

setup()
