"""The device side: train, evaluate and predict on any onnxruntime (the portable step graph; the
onnxruntime-training build optional). Never imports torch, the exporters or a front end."""
