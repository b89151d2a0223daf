"""Live model quality: decisions joined with what the market did after them.

``python -m quality`` (the labeler) reads the market data the feature cache reads and the
decisions in the audit store, writes each decision's realized label (``core.labels``)
into ``decision_outcomes`` once the label horizon has passed, and exports rolling AUC,
precision at the threshold and calibration error per model version on ``/metrics``.
"""
