"""Fleet adaptation: many devices adapt one shared adapter with Flower (docs/design.md section 12).

The Flower apps, together: client_app.py (the ClientApp each device runs: one round of local training
on its own images), server_app.py (the ServerApp: aggregation, the run folder it writes) and launch.py
(the Flower processes). The `vqt-edge fleet` commands are in vqt_edge/cli/fleet.py; the shards of
`fleet simulate` (vqt_edge/split.py) and the CCVR statistics (vqt_edge/calibrate.py) are core numpy.
"""
