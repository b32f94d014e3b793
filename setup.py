"""
Build hook: setuptools reads everything else from setup.cfg; this file only
names the cffi out-of-line API module for userfaultfd, which cffi cannot
declare in setup.cfg.
"""
from setuptools import setup

setup(cffi_modules=["twisted_postcopy/ram/_uffd_build.py:ffibuilder"])
