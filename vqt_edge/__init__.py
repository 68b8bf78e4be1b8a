"""vqt-edge: Visual Query Tuning for pre-trained ViTs on memory-limited devices.

This package is the shared core (spec, config, manifest, run folder, preprocessing, memory model
and planner, optimizer) and the front ends that call both sides: `api` (the Python API), `cli/`
(the click commands) and `fleet/` (the Flower apps). The core imports neither torch, onnxruntime,
click nor the other two packages (import-linter contracts in pyproject.toml; docs/design.md section 1).
"""

__version__ = "0.1.0"
