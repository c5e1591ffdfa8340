"""Loading `evaluate` metrics, with bundled copies of the common ones for machines without the Hub."""

import logging
import os

import evaluate

logger = logging.getLogger(__name__)

_BUNDLED = os.path.join(os.path.dirname(__file__), "metric_scripts")


def load_metric(name: str):
    """`evaluate.load(name)`; when the Hub cannot be reached, the bundled module of the same name if there is one."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    bundled = os.path.join(_BUNDLED, name, f"{name}.py")
    if not offline or not os.path.isfile(bundled):
        try:
            return evaluate.load(name)
        except Exception as err:  # noqa: BLE001 - evaluate raises many kinds when the Hub is unreachable
            if not os.path.isfile(bundled):
                raise ValueError(f"Could not load the metric {name!r} with evaluate: {err}") from err
            logger.warning("evaluate.load(%r) failed (%s); using hfkd's bundled %s.", name, err, name)
    return evaluate.load(bundled)
