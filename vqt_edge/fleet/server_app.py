"""The server side of fleet adaptation: a Flower ServerApp running FedAvg over the trainable tensors
(docs/design.md section 12), whose result is an ordinary run folder that `eval`/`predict` accept.

The ServerApp reads its settings from one JSON file (`fleet.json` in the run folder, written by
`vqt-edge fleet simulate` or `fleet server`; Flower passes its path as the run config `settings`).
Aggregation is Flower's own FedAvg: each client's tensors weighted by its number of training images.
After every round the server writes the aggregated adapter (`rounds/round_R.safetensors`), tests it
on --test if given, and appends one line to `metrics.jsonl` with what each client reported and the
bytes each one received and sent (the serialized tensors of the message, without gRPC framing).
With --calibrate-head, after the last round the head is refitted on the clients' feature statistics
(`_calibrate`, vqt_edge/calibrate.py) before the run folder is written.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from device_runner import ort
from device_runner.data import Sample, drop_unreadable, iter_batches, load_dataset
from device_runner.deploy import build_model, save_adapter
from vqt_edge import adapter_config
from vqt_edge import manifest as mf
from vqt_edge.calibrate import calibrate_head
from vqt_edge.config import FleetConfig
from vqt_edge.fleet.checks import Limits, aggregator, screen
from vqt_edge.fleet.client_app import ARRAYS, CALIBRATE, CLASS_COUNTS, CONFIG, HEAD_ROWS, METRICS_KEY, NUM_EXAMPLES
from vqt_edge.fleet.waves import WaveGrid
from vqt_edge.manifest import Manifest
from vqt_edge.memory import peak_rss_mb
from vqt_edge.run_folder import ADAPTER, MODEL, RunFolder

SETTINGS = "fleet.json"
ROUNDS = "rounds"
CACHE_TEST_MB = 256  # test images are decoded once and kept when they fit in this, else every round


@dataclass(frozen=True, kw_only=True)
class FleetSettings(FleetConfig):
    """Everything the ServerApp needs: the fleet's config and this run's own (one JSON file, `fleet.json`)."""

    bundle: str
    run: str
    clients: int  # the server waits for this many and trains all of them every round
    classes: list[str]
    test: str | None = None
    resume_from: int = 0  # rounds already in the run folder (`fleet server --resume`)
    extra: dict = field(default_factory=dict)  # recorded in summary.json as given (e.g. the split)


def round_config(settings: FleetSettings, bundle_sha256: str) -> ConfigRecord:
    """What every client is told with each round's tensors (vqt_edge/fleet/client_app.py reads it)."""
    per_round = settings.local_epochs or 1  # epochs of each client's run per round; a round of steps is one
    epochs = settings.rounds * per_round
    warmup = settings.warmup_epochs if settings.warmup_epochs is not None else 0.1 * epochs
    return ConfigRecord(
        {
            "rounds": settings.rounds,
            "local-epochs": per_round,
            "local-steps": settings.steps_per_round or 0,
            "batch-size": settings.batch_size,
            "lr": settings.lr,
            "weight-decay": settings.weight_decay,
            "seed": settings.seed,
            "classes": list(settings.classes),
            "warmup-epochs": float(warmup),
            "bundle-sha256": bundle_sha256,
            "logit-adjust": settings.logit_adjust,
            "proximal-mu": settings.proximal_mu,
            "class-weighted-head": settings.class_weighted_head,
            CALIBRATE: "" if settings.calibrate_head == "off" else settings.calibrate_head,
        }
    )


def initial_tensors(bundle: Path, manifest: Manifest) -> dict[str, np.ndarray]:
    """The bundle's initial trainable tensors (its ORT checkpoint): every client starts from these."""
    state = ort.training_api().CheckpointState.load_checkpoint(str(bundle / mf.CHECKPOINT))
    return {name: np.array(state.parameters[name].data, np.float32) for name in manifest.spec.trainable_shapes}


def resume_tensors(rounds: Path, done: int) -> dict[str, np.ndarray]:
    """The aggregated tensors of round `done`, written before the server stopped: a resumed run starts there."""
    from safetensors.numpy import load_file

    return {
        name: np.asarray(value, np.float32)
        for name, value in load_file(str(rounds / f"round_{done}.safetensors")).items()
    }


def array_bytes(record: ArrayRecord) -> int:
    """Bytes of a message's serialized tensors (what travels, less protobuf/gRPC framing)."""
    return sum(len(array.data) for array in record.values())


class TestSet:
    """--test, read once; accuracy of a model.onnx on it."""

    def __init__(self, path: Path, manifest: Manifest, classes: list[str], batch: int) -> None:
        self.manifest, self.batch = manifest, batch
        data, _ = drop_unreadable(load_dataset(path, classes=classes), manifest.spec.arch.image_size)
        self.samples: list[Sample] = data.samples
        a = manifest.spec.arch
        fits = len(self.samples) * a.channels * a.image_size**2 * 4 <= CACHE_TEST_MB << 20
        self.cached = list(self._batches()) if fits else None

    def _batches(self):
        m = self.manifest
        return iter_batches(self.samples, self.batch, m.spec.arch.image_size, m.mean, m.std)

    def accuracy(self, model: Path) -> float:
        rt = ort.onnxruntime()
        session = rt.InferenceSession(
            str(model), sess_options=ort.session_options(), providers=["CPUExecutionProvider"]
        )
        correct = 0
        for pixels, labels in self.cached if self.cached is not None else self._batches():
            correct += int((session.run(["logits"], {"pixel_values": pixels})[0].argmax(-1) == labels).sum())
        return correct / max(1, len(self.samples))


def class_weighted_rows(
    mean: dict[str, np.ndarray], sent: list[dict[str, np.ndarray]], counts: np.ndarray
) -> dict[str, np.ndarray]:
    """FedAvg's `mean` with each class's head row (weight row and bias) re-averaged over the clients'
    tensors `sent`, weighted by their training images *of that class* (`counts`: clients x classes;
    docs/design.md section 12). Under label skew a client that never saw class c only pushed row c
    down; its sample count should not weigh on it. Classes no client has keep FedAvg's row."""
    counts = np.asarray(counts, np.float64)
    totals = counts.sum(0)
    weights = counts / np.where(totals > 0, totals, 1)
    out = dict(mean)
    for name in HEAD_ROWS:
        if name in out:
            rows = np.einsum("kc,kc...->c...", weights, np.stack([t[name] for t in sent]))
            seen = (totals > 0).reshape(-1, *[1] * (out[name].ndim - 1))
            out[name] = np.where(seen, rows, out[name]).astype(np.float32)
    return out


class _RecordingFedAvg(FedAvg):
    """Flower's FedAvg that also notes per client what each round sent and received, and with
    `class_weighted_head` re-averages the head's rows per class on top of it (class_weighted_rows)."""

    def __init__(
        self,
        class_weighted_head: bool = False,
        limits: Limits | None = None,
        aggregation: str = "fedavg",
        min_clients: int = 1,
        round_offset: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.class_weighted_head = class_weighted_head
        self.limits, self.min_clients, self.round_offset = limits, min_clients, round_offset
        self.aggregator = aggregator(aggregation, **{k: v for k, v in kwargs.items() if k.endswith("_key")})
        self.round_start: dict[str, np.ndarray] = {}
        self.last: dict = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.last = {"bytes_down": array_bytes(arrays), "started": time.perf_counter()}
        self.round_start = {name: array.numpy() for name, array in arrays.items()}
        return super().configure_train(server_round + self.round_offset, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies):
        server_round += self.round_offset
        replies, rejected, norms = screen(
            list(replies), self.round_start, self.limits, ARRAYS, METRICS_KEY, NUM_EXAMPLES
        )
        self.last["rejected"] = rejected
        if len([m for m in replies if not m.has_error()]) < self.min_clients:
            raise RuntimeError(
                f"round {server_round}: only {len([m for m in replies if not m.has_error()])} client "
                f"update(s) passed the checks, --min-clients is {self.min_clients}; rejected: {rejected}"
            )
        clients, failures = [], []
        for msg in replies:
            if msg.has_error():
                failures.append({"node": int(msg.metadata.src_node_id), "error": str(msg.error.reason)})
                continue
            metrics = dict(msg.content[METRICS_KEY])
            clients.append(
                {
                    "node": int(msg.metadata.src_node_id),
                    "bytes_up": array_bytes(msg.content[ARRAYS]),
                    **norms.get(int(msg.metadata.src_node_id), {}),
                    **{
                        k: (int(v) if k == NUM_EXAMPLES else list(v) if k == CLASS_COUNTS else float(v))
                        for k, v in metrics.items()
                    },
                }
            )
        self.last.update(
            clients=sorted(clients, key=lambda c: c["node"]),
            failures=failures,
            round_seconds=round(time.perf_counter() - self.last["started"], 2),
        )
        if not clients:
            raise RuntimeError(f"round {server_round}: every client failed: {failures}")
        ok = [msg for msg in replies if not msg.has_error()]
        sent = [{name: a.numpy() for name, a in msg.content[ARRAYS].items()} for msg in ok]  # median pops them
        arrays, metrics = self.aggregator.aggregate_train(server_round, replies)
        if arrays is not None:
            arrays = ArrayRecord({name: Array(np.asarray(a.numpy(), np.float32)) for name, a in arrays.items()})
        if self.class_weighted_head and arrays is not None:
            rows = class_weighted_rows(
                {name: array.numpy() for name, array in arrays.items()},
                sent,
                [list(msg.content[METRICS_KEY][CLASS_COUNTS]) for msg in ok],
            )
            arrays = ArrayRecord({name: Array(value) for name, value in rows.items()})
        return arrays, metrics


def run_fleet(grid: Grid, settings: FleetSettings) -> dict:
    """Run every round, write the run folder and return its summary."""
    bundle, run = Path(settings.bundle), Path(settings.run)
    manifest = mf.read_manifest(bundle, verify=True)
    bundle_sha256 = mf.sha256_file(bundle / mf.MANIFEST)  # each round's config names the bundle the clients must hold
    (run / ROUNDS).mkdir(parents=True, exist_ok=True)
    test = TestSet(Path(settings.test), manifest, settings.classes, settings.batch_size) if settings.test else None
    limits = Limits(
        {n: tuple(s) for n, s in manifest.spec.trainable_shapes.items()},
        settings.max_examples,
        settings.max_update_norm,
        settings.lr,
        settings.batch_size,
        settings.local_epochs,
        settings.local_steps,
    )
    offset = settings.resume_from
    strategy = _RecordingFedAvg(
        class_weighted_head=settings.class_weighted_head,
        limits=limits,
        aggregation=settings.aggregation,
        min_clients=settings.min_clients,
        round_offset=offset,
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=settings.clients,
        min_available_nodes=settings.clients,
        arrayrecord_key=ARRAYS,
        configrecord_key=CONFIG,
        weighted_by_key=NUM_EXAMPLES,
    )
    folder = RunFolder(run)
    if not offset:
        folder.clear_metrics()

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if offset and not server_round:
            return None  # the resumed round's record is already in metrics.jsonl
        server_round += offset
        tensors = {name: array.numpy() for name, array in arrays.items()}
        path = run / ROUNDS / f"round_{server_round}.safetensors"
        save_adapter(path, tensors, manifest)
        record: dict = {"round": server_round}
        if server_round:
            record.update({k: v for k, v in strategy.last.items() if k != "started"})
            total = sum(c[NUM_EXAMPLES] for c in record["clients"])
            record["train_loss"] = sum(c["train_loss"] * c[NUM_EXAMPLES] for c in record["clients"]) / total
        if test is not None:
            build_model(
                bundle,
                manifest,
                tensors,
                run / ROUNDS / MODEL,
                classes=settings.classes,
                adapter_sha256=mf.sha256_file(path),
            )
            record["test_acc"] = test.accuracy(run / ROUNDS / MODEL)
        folder.append_metrics(record)
        return MetricRecord({"test_acc": record["test_acc"]}) if "test_acc" in record else None

    t0 = time.perf_counter()
    initial = resume_tensors(run / ROUNDS, offset) if offset else initial_tensors(bundle, manifest)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord({k: Array(v) for k, v in initial.items()}),
        num_rounds=settings.rounds - offset,
        timeout=settings.round_timeout,
        train_config=round_config(settings, bundle_sha256),
        evaluate_fn=after_round,
    )
    final = {name: array.numpy() for name, array in result.arrays.items()}
    calibration = None
    if settings.calibrate_head != "off":
        final, calibration = _calibrate(grid, settings, final, bundle_sha256)
        save_adapter(run / ROUNDS / "calibrated.safetensors", final, manifest)
        if test is not None:
            build_model(bundle, manifest, final, run / ROUNDS / MODEL, classes=settings.classes)
            calibration["test_acc"] = test.accuracy(run / ROUNDS / MODEL)
    return _finish(run, bundle, manifest, settings, final, time.perf_counter() - t0, calibration)


def _calibrate(
    grid: Grid, settings: FleetSettings, tensors: dict[str, np.ndarray], bundle_sha256: str
) -> tuple[dict[str, np.ndarray], dict]:
    """One query message to every client with the final tensors; their per-class feature statistics
    back; the head refitted on virtual features (vqt_edge/calibrate.py)."""
    t0 = time.perf_counter()
    content = RecordDict(
        {ARRAYS: ArrayRecord({k: Array(v) for k, v in tensors.items()}), CONFIG: round_config(settings, bundle_sha256)}
    )
    messages = [
        Message(content=content, message_type=MessageType.QUERY, dst_node_id=node) for node in grid.get_node_ids()
    ]
    replies = list(grid.send_and_receive(messages, timeout=settings.round_timeout))
    ok = [msg for msg in replies if not msg.has_error()]
    failures = [
        {"node": int(msg.metadata.src_node_id), "error": str(msg.error.reason)} for msg in replies if msg.has_error()
    ]
    if not ok:
        raise RuntimeError(f"calibration: every client failed: {failures}")
    stats = [{name: array.numpy() for name, array in msg.content[ARRAYS].items()} for msg in ok]
    calibrated = calibrate_head(tensors, stats, settings.seed)
    return calibrated, {
        "covariance": settings.calibrate_head,
        "clients": len(ok),
        "failures": failures,
        "bytes_down_per_client": array_bytes(content[ARRAYS]),
        "bytes_up_per_client": max(array_bytes(msg.content[ARRAYS]) for msg in ok),
        "client_peak_rss_mb": max(float(msg.content[METRICS_KEY]["peak_rss_mb"]) for msg in ok),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _finish(
    run: Path,
    bundle: Path,
    manifest: Manifest,
    settings: FleetSettings,
    tensors: dict[str, np.ndarray],
    seconds: float,
    calibration: dict | None = None,
) -> dict:
    """The ordinary run folder (vqt_edge/run_folder.py): adapter, model.onnx, run.json, summary.json."""
    (run / ROUNDS / MODEL).unlink(missing_ok=True)
    folder = RunFolder(run)
    folder.write_outputs(
        lambda path: save_adapter(path, tensors, manifest),
        adapter_config.from_manifest(manifest, settings.classes),
        lambda path: build_model(
            bundle, manifest, tensors, path, classes=settings.classes, adapter_sha256=mf.sha256_file(run / ADAPTER)
        ),
        f"the aggregated tensors are in {run / ROUNDS}; free space and run the fleet again",
    )
    folder.start(bundle, settings.classes, data=None, val=None, fleet=asdict(settings))
    rounds = folder.metrics()
    clients = [c for r in rounds for c in r.get("clients", [])]
    summary = {
        "fleet": True,
        "rounds": settings.rounds,
        "clients": settings.clients,
        "local_epochs": settings.local_epochs,
        "local_steps": settings.steps_per_round,
        "train_images": max(
            (sum(c[NUM_EXAMPLES] for c in r["clients"]) for r in rounds if r.get("clients")), default=0
        ),
        "test_accuracy": (calibration or {}).get("test_acc", rounds[-1].get("test_acc") if rounds else None),
        "calibration": calibration,  # the head refitted after the last round; the rounds' test_acc are before it
        "final": rounds[-1] if rounds else None,
        "bytes_down_per_client_per_round": rounds[-1].get("bytes_down") if rounds else None,
        "bytes_up_per_client_per_round": max((c["bytes_up"] for c in clients), default=None),
        "client_peak_rss_mb": max((c["peak_rss_mb"] for c in clients), default=None),
        "seconds": round(seconds, 3),
        "server_peak_rss_mb": round(peak_rss_mb(), 1),
    }
    return folder.finish(summary)  # with the hashes eval/predict check


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower's entry: the run config's `settings` names the run folder's fleet.json."""
    ort.block_torch()  # Flower started this process for the run: onnxruntime must not pull torch in
    settings = FleetSettings(**json.loads(Path(str(context.run_config["settings"])).read_text()))
    settings.validate()  # a hand-written or older fleet.json fails here, with the option it got wrong
    run_fleet(WaveGrid(grid, settings.max_concurrent), settings)  # type: ignore[arg-type]
