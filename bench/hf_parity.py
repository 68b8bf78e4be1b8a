"""A packaged HF folder through optimum + transformers against `vqt-edge predict --model` (docs/deploy.md).

    .venv-hf/bin/python bench/hf_parity.py HF_DIR MODEL_ONNX IMAGE_FOLDER

Prints the largest logit difference (images decoded by vqt_edge.preprocess.load_rgb, and paths the
pipeline decodes itself), how often top-1 agrees, the largest pixel difference (0-255 steps) and the
accuracy by folder name. Run in .venv-hf (`make test` builds it), 1 thread.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from optimum.onnxruntime import ORTModelForImageClassification
from transformers import AutoImageProcessor, pipeline
from transformers.image_utils import load_image

from vqt_edge.preprocess import load_rgb, preprocess


def main(hf: Path, model: Path, images: Path) -> None:
    paths = sorted(p for p in images.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    cli = [sys.executable, "-c", "from vqt_edge.cli import main; main()"]
    out = subprocess.run(
        [*cli, "predict", "--model", str(model), "--json", *map(str, paths)], capture_output=True, text=True, check=True
    )
    predicted = json.loads(out.stdout)
    ort_model = ORTModelForImageClassification.from_pretrained(hf)
    processor = AutoImageProcessor.from_pretrained(hf)
    classify = pipeline("image-classification", model=ort_model, image_processor=processor)
    classes = [ort_model.config.id2label[i] for i in range(len(ort_model.config.id2label))]
    size = processor.size["height"]
    worst = {"load_rgb": 0.0, "path": 0.0}
    same, worst_pixel = 0, 0.0
    for path, result in zip(paths, predicted):
        want = np.array(result["logits"])
        for how, image in (("load_rgb", load_rgb(path)), ("path", str(path))):
            scores = {d["label"]: d["score"] for d in classify(image, top_k=len(classes), function_to_apply="none")}
            got = np.array([scores[c] for c in classes])
            worst[how] = max(worst[how], float(np.abs(got - want).max()))
            same += how == "path" and classes[int(got.argmax())] == result["label"]
        hf_pixels = processor(images=load_image(str(path)), return_tensors="np")["pixel_values"][0]
        ours = preprocess(load_rgb(path), size, processor.image_mean, processor.image_std)
        worst_pixel = max(worst_pixel, float(np.abs(hf_pixels - ours).max() * max(processor.image_std) * 255))
    accuracy = np.mean([r["label"] == Path(r["path"]).parent.name for r in predicted])
    print(
        f"{len(paths)} images; largest logit difference: load_rgb-decoded {worst['load_rgb']:.2g}, "
        f"path-decoded {worst['path']:.2g}; top-1 equal {same}/{len(paths)}; largest pixel difference "
        f"{worst_pixel:.2g} (0-255 steps); accuracy by folder {accuracy:.4f}"
    )


if __name__ == "__main__":
    main(*map(Path, sys.argv[1:4]))
