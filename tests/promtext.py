"""Read one series out of Prometheus exposition text (the gateway's /metrics, in tests)."""

from __future__ import annotations


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one series (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        series, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            return float(value)
    return 0.0
