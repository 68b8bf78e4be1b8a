"""The Python API in one process: export, train, evaluate, predict, load the adapter, then torch.

    python examples/api_quickstart.py --out /tmp/quickstart            # the shipped vit_fmnist backbone
    python examples/api_quickstart.py --out /tmp/quickstart --tiny     # a tiny random ViT (seconds; the test)

The images are generated (coloured ellipses, one class per colour, written as PNG files), so it
runs offline anywhere.
Progress goes through `logging`; the script configures logging because it is the program, not a library.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vqt_edge import api

CLASSES = ("blue", "green", "red")  # the class folders make_images writes


def make_images(root: Path, per_class: int, seed: int, size: int = 32) -> Path:
    """One class per colour: a filled ellipse of that colour, random in place, size and shade, on
    a noisy grey background."""
    rng = np.random.default_rng(seed)
    hues = {"blue": (40, 70, 220), "green": (40, 190, 70), "red": (220, 50, 40)}
    for name, rgb in hues.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            background = rng.integers(90, 160, (size, size, 1)) + rng.integers(-20, 20, (size, size, 3))
            img = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
            corner = rng.integers(0, size // 2, 2)
            box = [*corner.tolist(), *(corner + rng.integers(size // 4, size // 2, 2)).tolist()]
            shade = tuple(int(c * rng.uniform(0.6, 1.0)) for c in rgb)
            ImageDraw.Draw(img).ellipse(box, fill=shade)
            img.save(root / name / f"{i:03d}.png")
    return root


def main(out: Path, tiny: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    train_dir = make_images(out / "images" / "train", 30, seed=1)
    test_dir = make_images(out / "images" / "test", 10, seed=2)

    # 1. Export (the workstation step; imports torch inside).
    if tiny:
        sizes = dict(depth=3, dim=32, heads=4, mlp_dim=64, patch=8, image_size=32)
        manifest = api.export(out / "bundle", sizes=sizes, random_init=True, classes=CLASSES, query_tokens=2)
    else:
        manifest = api.export(out / "bundle", model="vit_fmnist", classes=CLASSES, query_tokens=2)
    print(f"exported {manifest.spec.method} bundle: {manifest.spec.arch.depth} layers, T={manifest.spec.query_tokens}")

    # 2. Train, with the CLI's options as a TrainConfig; --test's evaluation runs here too.
    config = api.TrainConfig(epochs=3, batch_size=16, lr=1e-2, seed=0)
    summary = api.train(out / "bundle", train_dir, out / "run", config, test=test_dir)
    print(f"trained: test accuracy {summary['test_accuracy']:.3f}, peak {summary['peak_rss_mb']:.0f} MiB")

    # 3. Evaluate and predict through the run's model.onnx.
    result = api.evaluate(out / "run", test_dir)
    images = sorted((test_dir / "red").iterdir())[:4]
    predictions = api.predict(out / "run", images)
    print(f"evaluate: accuracy {result['accuracy']:.3f} on {result['images']} images")
    print("predict:", [p["label"] for p in predictions])

    # 4. The adapter alone, on the bundle's frozen graph: the same logits as model.onnx.
    model = api.load_adapter(out / "run", bundle=out / "bundle")
    from_adapter = model.predict(images)
    gap = max(abs(a - b) for p, q in zip(predictions, from_adapter) for a, b in zip(p["logits"], q["logits"]))
    print(
        f"load_adapter: labels {[p['label'] for p in from_adapter]}, largest logit difference to model.onnx {gap:.2e}"
    )

    # 5. The process is as it was: torch imports after all of the above.
    import torch

    print(f"import torch after training: ok ({torch.__version__})")
    return {
        "summary": summary,
        "evaluate": result,
        "predictions": predictions,
        "from_adapter": from_adapter,
        "max_logit_gap": gap,
        "torch": torch.__version__,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Folder for the images, the bundle and the run.")
    parser.add_argument("--tiny", action="store_true", help="A tiny random ViT instead of the shipped vit_fmnist.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    main(args.out, args.tiny)
