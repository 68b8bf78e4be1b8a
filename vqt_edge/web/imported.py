"""`vqt-edge import-adapter`: a run folder from an adapter trained elsewhere (the browser page).

The page downloads `adapter.safetensors` + `adapter_config.json`; this makes of them what `vqt-edge
train` leaves: run.json, the bundle's manifest, the adapter (re-written by `save_adapter`, so the
same tensors give the same bytes as a Python run), adapter_config.json, model.onnx (frozen graph +
head with these tensors, device_runner/deploy.py) and summary.json with their sha256. `eval`,
`predict`, `package` and `load_adapter` then treat it as any finished run.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from vqt_edge import adapter_config
from vqt_edge import manifest as mf
from vqt_edge.errors import UserError
from vqt_edge.run_folder import RunFolder


def read_config(path: Path) -> dict:
    """adapter_config.json under any file name (a browser may save it as `adapter_config (1).json`)."""
    if not path.is_file():
        raise UserError(f"{path}: missing; give the adapter_config.json downloaded with the adapter (--config)")
    if path.name == adapter_config.ADAPTER_CONFIG:
        return adapter_config.read(path.parent)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(path, Path(tmp) / adapter_config.ADAPTER_CONFIG)
        return adapter_config.read(Path(tmp))


def import_adapter(bundle: Path, adapter: Path, run: Path, config_path: Path | None = None) -> dict:
    """Make the finished run folder `run` from `adapter` (+ its config) on `bundle`; returns the summary."""
    from device_runner.deploy import build_model, load_adapter, save_adapter

    manifest = mf.read_manifest(bundle, verify=True)
    config = read_config(config_path or adapter.parent / adapter_config.ADAPTER_CONFIG)
    adapter_config.check_matches(config, manifest, config_path or adapter)
    tensors = load_adapter(adapter, manifest)
    classes = list(config["class_names"])
    folder = RunFolder(run)
    with folder.lock():
        if folder.is_run():
            raise UserError(f"{run}: already holds a run; choose another --run")
        folder.start(
            bundle, classes, data=None, val=None, config={"backend": "portable"}, imported_from=str(adapter.absolute())
        )
        folder.write_outputs(
            lambda p: save_adapter(p, tensors, manifest),
            adapter_config.from_manifest(manifest, classes),
            lambda p: build_model(bundle, manifest, tensors, p),
            "free space and import again into a new --run",
        )
        return folder.finish({"imported_from": str(adapter.absolute()), "backend": "portable", "train_images": None})
