"""MM-PFL-ADP and its baselines as a Flower app (issue 7): ``task`` (plain), ``client_app``, ``server_app``.

Nothing in ``mmpfl_core`` imports this package (docs/DESIGN.md 2: the Flower app is an edge).
"""
