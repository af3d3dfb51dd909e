"""dlorch.core.engine: the self-configuring deep-learning engine, for segmentation and denoising.

Each task is a package, ``segment/`` and ``denoise/``, whose ``__init__`` is the task's public API;
the modules beside them are what both tasks share (README.md has the map).
"""
