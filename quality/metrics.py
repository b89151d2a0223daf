"""The labeler's Prometheus metrics, read from it when scraped.

Quality gauges carry ``model``, ``model_version`` and ``role``: the answering model's
name (or "rules") and version with role "served", or the challenger's with role "shadow"
for its shadow scores. A gauge is NaN until its
window has both labels (AUC) or a score at the threshold (precision).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from quality.labeler import REASONS, Labeler

_QUALITY = (
    ("auc", "Rolling AUC of the model's scores against the realized labels."),
    ("precision", "Rolling share of favourable outcomes among scores at the threshold."),
    ("calibration_error", "Rolling expected calibration error (10 equal-width score bins)."),
    ("favourable_share", "Rolling share of decisions whose outcome was favourable."),
    ("trade_share", "Rolling share of scores at or above the threshold."),
    ("samples", "Labelled decisions in the rolling window."),
)


class LabelerCollector(Collector):
    def __init__(self, labeler: Labeler) -> None:
        self._labeler = labeler

    def collect(self) -> Iterator[Metric]:
        labeler = self._labeler
        stats = labeler.stats
        families = {
            name: GaugeMetricFamily(
                f"decision_quality_{name}", text, labels=["model", "model_version", "role"]
            )
            for name, text in _QUALITY
        }
        for scorer, rolling in sorted(labeler.quality.items(), key=lambda item: repr(item[0])):
            summary = rolling.summary()
            labels = [scorer.model, scorer.model_version, scorer.role]
            for name, _ in _QUALITY:
                families[name].add_metric(labels, float(getattr(summary, name)))
        yield from families.values()
        outcomes = CounterMetricFamily(
            "decision_quality_outcomes",
            "Outcomes written to the audit store: labelled, or without a label and why.",
            labels=["result"],
        )
        outcomes.add_metric(["labelled"], stats.labelled)
        for reason in REASONS:
            outcomes.add_metric([reason], stats.unlabelled[reason])
        yield outcomes
        yield GaugeMetricFamily(
            "decision_quality_pending_decisions",
            "Decisions read at the last pass that wait for their horizon's market data.",
            value=stats.pending,
        )
        yield GaugeMetricFamily(
            "decision_quality_last_pass_timestamp_seconds",
            "Wall clock of the last completed pass over the audit store (0: none yet).",
            value=stats.last_pass_at_s,
        )
        yield GaugeMetricFamily(
            "decision_quality_newest_labelled_decision_timestamp_seconds",
            "Decision time of the newest labelled decision (0: none yet).",
            value=stats.newest_labelled_decided_at_us / 1e6,
        )
        yield GaugeMetricFamily(
            "decision_quality_newest_decision_timestamp_seconds",
            "Decision time of the newest decision read from the audit store (0: none yet).",
            value=stats.newest_decided_at_us / 1e6,
        )
        yield GaugeMetricFamily(
            "decision_quality_labels_behind_seconds",
            "How far the newest labelled decision trails the newest decision read, in "
            "seconds of decision time: about the horizon plus a pass while labels flow; it "
            "grows while decisions come and none is labelled.",
            value=stats.labels_behind_s(),
        )
        yield CounterMetricFamily(
            "decision_quality_store_errors",
            "Passes over the audit store that failed (logged); retried at the next.",
            value=stats.store_errors,
        )
        yield CounterMetricFamily(
            "decision_quality_market_events", "Market events applied.", value=stats.events
        )
        yield GaugeMetricFamily(
            "decision_quality_market_symbols",
            "Symbols whose mids the labeler holds.",
            value=len(labeler.histories),
        )
