"""How every Flywheel component is built: the project's own image, no pip install at start.

Components are plain functions in `components/<stage>.py`; `component(fn, image)` turns one into
a KFP component for an environment's image at pipeline-build time, so one pipeline definition
compiles to each environment's image (tag or digest from config).
"""
from __future__ import annotations

from kfp import dsl

LOCAL_IMAGE = "python:3.11-slim"  # kfp.local with use_venv=False ignores it; set to silence warnings


def component(fn, image: str):
    return dsl.component(func=fn, base_image=image or LOCAL_IMAGE, install_kfp_package=False)
