"""The stages as pure functions of their config: what the console scripts wrap and the tests call.

``collect(cfg) -> Path``, ``train(cfg) -> dict``, ``evaluate(cfg) -> dict`` and ``pipeline(cfg)`` (all three in
order). The stage folders (``collect/``, ``train/``, ``evaluate/``) hold only the ``@hydra.main`` entry points, so
this package imports no stage folder and ``spec-pipeline`` runs the very functions the stage scripts run.
"""
