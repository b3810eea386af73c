"""Option types and shared options of the ``alexnet`` command (argparse stays inside ``alexnet.cli``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

Handler = Callable[[argparse.Namespace], int | None]


def ranged(spec: str, kind: type = int) -> Callable[[str], float]:
    """An argparse ``type``: a number in the interval ``spec`` (``pipelines.ranges``, as for config fields)."""

    def parse(text: str) -> float:
        from pipelines import ranges

        try:
            return ranges.parse("", text, spec, kind)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid ... value" message
    return parse


COUNT, AT_LEAST_1, POSITIVE = ranged("[0, inf)"), ranged("[1, inf)"), ranged("(0, inf)", float)


def key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, not {text!r}")
    name, value = text.split("=", 1)
    return name, value


def add_tracking_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-tracking", dest="tracking", action="store_false", help="do not log to MLflow")
    p.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--experiment", default="alexnet", help="MLflow experiment (default alexnet)")
