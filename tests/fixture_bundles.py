"""Export the bundles the torch-free test run reads: `python -m tests.fixture_bundles OUT`.

`make test` runs the device tests a second time in an environment with stock onnxruntime and no
torch (docs/design.md section 9), which cannot export; this writes what tests/conftest.py's
`tiny_bundle` returns there (VQT_EDGE_TEST_BUNDLES=OUT).
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.conftest import export_tiny_bundle

if __name__ == "__main__":
    export_tiny_bundle(Path(sys.argv[1]) / "tiny")
    export_tiny_bundle(Path(sys.argv[1]) / "tiny-int4", quantize="int4")
