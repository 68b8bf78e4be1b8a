"""`python -m vqt_edge.cli`: what the `vqt-edge` script runs (sweep and the tests start it this way)."""

from vqt_edge.cli import main

main()
