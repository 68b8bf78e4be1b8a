"""A bare model.onnx as a predictor: `vqt-edge predict --model model.onnx` (no run folder).

Everything predict needs beyond the graph is in the file's metadata_props (vqt_edge/model_metadata.py):
class names, image size, mean/std, the adapter spec. The run folder's sha256 check (RunFolder.verify)
has nothing to compare a lone file with; what is checked here is that the metadata is complete and
consistent and that the graph takes and gives what it says.
"""

from __future__ import annotations

from pathlib import Path

from device_runner import ort
from device_runner.evaluate import FinishedRun, _check_signature
from device_runner.onnx_io.stream import read_metadata
from vqt_edge import model_metadata
from vqt_edge.errors import UserError


def open_model(path: Path, device: str = "cpu") -> FinishedRun:
    """The predictor of a self-describing model.onnx, refused before any image is read if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    manifest, classes = model_metadata.parse(read_metadata(path), str(path))
    providers = ort.providers(device)
    options = ort.session_options(prepack=False)  # as FinishedRun.open: the query path shares frozen weights
    try:
        session = ort.onnxruntime().InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
        raise UserError(f"{path}: cannot be loaded; the file is damaged ({type(e).__name__}: {e})") from None
    _check_signature(session, manifest, path)
    return FinishedRun(manifest, classes, session)
