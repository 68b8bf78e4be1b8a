"""Fleet adaptation: many devices adapt one shared adapter with Flower (docs/design.md section 12).

vqt_edge/fleet/client_app.py is the device side (the ClientApp); here live the server side (server.py:
the ServerApp and the run folder it writes), the data splits of `fleet simulate` (split.py), the
Flower processes (launch.py) and the `vqt-edge fleet` commands (commands.py).
"""
