"""Kept for tools that still call setup.py; metadata lives in pyproject.toml.

The C++ CPU operators in minillm/csrc/ are compiled on first use with ninja through
torch.utils.cpp_extension.load, so installing minillm never pulls a second torch
into an isolated build environment.
"""

from setuptools import setup

setup()
