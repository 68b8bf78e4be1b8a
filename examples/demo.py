"""The main job, end to end, with the backbone shipped in vqt_edge/pretrained/:

1. write a downstream task the backbone never saw (Fashion-MNIST classes 5-9, 1000 training images),
2. export the shipped `vit_fmnist` backbone as a VQT bundle and as a linear-probe bundle,
3. adapt each on-device (torch-free) under a memory budget,
4. print test accuracy (5000 official test images) and each run's measured peak memory.

    python examples/demo.py --out demo_out        (what `make demo` runs)

It calls the `vqt-edge` CLI exactly as a person would; every command it runs is printed.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tasks import make_task  # noqa: E402

VQT_EDGE = [sys.executable, "-m", "vqt_edge.cli"]


def vqt_edge(*args: object) -> None:
    cmd = [*VQT_EDGE, *map(str, args)]
    print("$ vqt-edge " + " ".join(shlex.quote(str(a)) for a in args), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"vqt-edge {args[0]} failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--memory-budget", default="400MB", help="budget for each on-device training run")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    print("== 1. downstream task: Fashion-MNIST classes 5-9 (unseen by the backbone), 1000 training images")
    data = make_task("fmnist59", out / "fmnist59")

    classes = ",".join(sorted(p.name for p in (data / "train1000").iterdir()))  # a folder's classes are sorted
    results = {}
    for method in ("vqt", "linear"):
        bundle, run = out / f"bundle_{method}", out / f"run_{method}"
        print(f"== 2. export the shipped vit_fmnist backbone ({method})")
        if not (bundle / "manifest.json").exists():
            vqt_edge("export", "--model", "vit_fmnist", "--method", method, "--classes", classes, "--out", bundle)
        print(f"== 3. adapt on-device ({method}), budget {args.memory_budget}")
        if not (run / "summary.json").exists():
            vqt_edge(
                "train",
                "--bundle",
                bundle,
                "--data",
                data / "train1000",
                "--run",
                run,
                "--test",
                data / "test",
                "--epochs",
                args.epochs,
                "--memory-budget",
                args.memory_budget,
            )
        results[method] = json.loads((run / "summary.json").read_text())

    print(
        f"\n== 4. results on {results['vqt'].get('test_images', 5000)} test images "
        f"(Fashion-MNIST 5-9, 1000 training images, {args.epochs} epochs)"
    )
    print(f"{'method':<14}{'test accuracy':>14}{'peak memory':>14}{'train time':>12}")
    for method, s in results.items():
        print(f"{method:<14}{s['test_accuracy']:>14.4f}{s['peak_rss_mb']:>11.0f} MiB{s['seconds']:>10.1f} s")
    gain = results["vqt"]["test_accuracy"] - results["linear"]["test_accuracy"]
    print(
        f"VQT vs linear probe: {gain * 100:+.1f} points. Runs, adapters and model.onnx files are in {out}/ "
        f"(total {time.perf_counter() - t0:.0f} s)."
    )
    print(f"Try: vqt-edge predict --run {out}/run_vqt {next((data / 'test' / 'bag').iterdir())}")


if __name__ == "__main__":
    main()
