"""The defaults of `fleet simulate` / `fleet server`, and why (docs/fleet-defaults.md).

A round used to be one local epoch at batch 32: a client with 18-69 images made one or two AdamW steps
a round, 10-30 in the whole run against `train`'s 150 on the pooled images, with its own warm-up and
cosine sized to those few steps; the heads barely left their start and FedAvg of the label-skewed
ones cancelled (chance accuracy). Now a round is a fixed number of local steps, each of
min(batch, shard) images, the same for every client whatever its shard, so the lr schedule (warm-up
once, cosine over rounds x steps) is one schedule across the fleet. The values were chosen on
validation folds of the training images only (examples/fleet_defaults.py,
examples/results/fleet/defaults.md).
"""

from __future__ import annotations

ROUNDS = 10
LOCAL_STEPS = 20  # AdamW steps per client per round (--local-epochs E instead: E passes over its shard)
BATCH_SIZE = 32  # a client with fewer images uses all of them in each step
LR = 1e-2
CALIBRATE_HEAD = "full"  # CCVR after the last round (calibrate.py): clients send per-class feature statistics

HELP = f"""\b
Defaults (docs/fleet-defaults.md; chosen on validation folds of training images, never test images):
- Each round every client makes --local-steps {LOCAL_STEPS} AdamW steps of min(--batch-size, its images)
  images: a device with 10 images trains as many steps as one with 300, and one lr schedule (warm-up
  once, cosine over rounds x steps) runs on every device. --local-epochs E makes a round E passes over
  each device's own images instead (a device with few images then makes few steps).
  Why: a round of one pass at batch 32 gave a client of 18-69 images 1-3 steps and its own lr
  schedule sized to them; the default run stayed at chance where `train` learned the task.
- After the last round the head is recalibrated (--calibrate-head full, CCVR): each client SENDS,
  once, per class its image count and the mean and covariance of its head's input features (never
  images or per-image features). --calibrate-head off: only the trainable tensors leave a device.
"""
