"""Searching the distillation's temperature and weights with `DistillationTrainer.hyperparameter_search` (Optuna).

`kd_space(args)` is the search space hfkd offers; `DistillationTrainer.hyperparameter_search` uses it when no
`hp_space` is given. Optuna is an optional extra: `pip install hfkd[search]`.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable

from .terms import TERMS

SEARCH_EXTRA = "pip install hfkd[search]"

# The range of the logit temperature (log scale): Hinton et al.'s and the later papers' settings lie in it.
TEMPERATURE_RANGE = (1.0, 8.0)
# The Hinton share of the logit term when both it and the task loss are on: logit_weight = s, task_weight = 1 - s.
LOGIT_SHARE_RANGE = (0.1, 0.9)
# Every other configured term's weight w is searched over [w / 10, 10 w] (log scale): their scales differ by orders
# of magnitude between methods and data (AT at 1000, RKD at 1), so only the configured value sets the range.
WEIGHT_FACTOR = 10.0


def labelled_validation_split(train, labelled, fraction: float, seed: int):
    """(fit, validation) rows of a search: a seeded `fraction` (rounded up) of the `labelled` row indices scores the
    trials; every other row, rows without a label (transfer rows) included, stays in the trials' training.

    A row without a label cannot score a trial: it would count as wrong in every trial and dilute the accuracy."""
    import numpy as np

    labelled = list(labelled)
    count = math.ceil(fraction * len(labelled))  # as datasets' train_test_split counts
    order = np.random.default_rng(seed).permutation(len(labelled))
    held = sorted(labelled[i] for i in order[:count])
    kept = sorted(set(range(len(train))) - set(held))
    return train.select(kept), train.select(held)


def require_optuna():
    """The optuna module, or an ImportError that says how to install it."""
    if importlib.util.find_spec("optuna") is None:
        raise ImportError(f"Searching needs Optuna, which is not installed: {SEARCH_EXTRA} (or pip install optuna).")
    import optuna

    return optuna


def kd_space(args) -> Callable:
    """The search space of a distillation configured by `args` (a `DistillationConfig`), for Optuna.

    Returns `space(trial) -> dict` of `DistillationConfig` fields, built from the configured values at this call
    (trials change `args`; the space does not follow them):

    - `temperature`: log-uniform in [1, 8], when the logit term is on (`logit_weight > 0`);
    - `logit_weight = s W` and `task_weight = (1 - s) W` (Hinton et al.'s mixing), when both are > 0, where W is the
      configured `task_weight + logit_weight` and s is uniform in [0.1, 0.9], widened to hold the configured share
      (logit standardisation's task 0.1 + logit 9 is W = 9.1 at s = 0.989); a label-free run (`task_weight = 0`)
      keeps it at 0, and a run without the logit term keeps both;
    - every other configured term's weight w (`hidden_weight`, `attention_weight`, each `terms` entry): log-uniform
      in [w / 10, 10 w]. The `terms` entries are returned whole (as the `terms` field) with their searched weights;
    - the options a term declares in its `search_space` (log-uniform in the declared range): `dkd`'s beta in
      [0.25, 8] and temperature in [1, 8], which span the paper's ImageNet (0.5, 1) and CIFAR-100 (8, 4) settings.

    Optuna records each suggestion under its own name (`temperature`, `logit_share`, `hidden_weight`, `<term>_weight`,
    `<term>_<option>`); `hyperparameter_search` returns the fields each trial set.
    """
    task, logit = float(args.task_weight), float(args.logit_weight)
    fields = {name: float(getattr(args, name)) for name in ("hidden_weight", "attention_weight")}
    extra = [spec for spec in args.term_specs if not TERMS[spec.name].short_form]

    def space(trial) -> dict:
        values = {}
        if logit > 0:
            values["temperature"] = trial.suggest_float("temperature", *TEMPERATURE_RANGE, log=True)
        if logit > 0 and task > 0:
            # The mixing is searched at the configured scale: a space summing to 1 held no setting near logit
            # standardisation's (measured: its searched row fell from +3.75 to +0.13 pt, benchmarks/METHODS.md).
            total, configured = task + logit, logit / (task + logit)
            low, high = min(LOGIT_SHARE_RANGE[0], configured), max(LOGIT_SHARE_RANGE[1], configured)
            share = trial.suggest_float("logit_share", low, high)
            values.update(task_weight=total * (1.0 - share), logit_weight=total * share)
        for name, weight in fields.items():
            if weight > 0:
                values[name] = trial.suggest_float(name, weight / WEIGHT_FACTOR, weight * WEIGHT_FACTOR, log=True)
        if extra:
            values["terms"] = [_searched_term(trial, spec) for spec in extra]
        if not values:
            raise ValueError(
                "kd_space: no temperature or weight to search (logit_weight and every term weight are 0); pass "
                "hp_space= with the fields to search."
            )
        return values

    return space


def _searched_term(trial, spec) -> dict:
    """One `terms` entry of a trial: its weight (unless 0: a term switched off stays off) and the options its term
    declares in `search_space`, each suggested as `<term>_<option>`."""
    entry = spec.as_dict()
    if spec.weight > 0:
        low, high = spec.weight / WEIGHT_FACTOR, spec.weight * WEIGHT_FACTOR
        entry["weight"] = trial.suggest_float(f"{spec.name}_weight", low, high, log=True)
    for option, (low, high) in TERMS[spec.name].search_space.items():
        entry[option] = trial.suggest_float(f"{spec.name}_{option}", low, high, log=True)
    return entry


def student_loss_objective(metrics: dict) -> float:
    """The default objective of a distillation search: the student's own loss on the labels of the validation rows
    (`eval_task`), which does not depend on the trial's temperature and weights as the weighted `eval_loss` does."""
    if "eval_task" not in metrics:
        raise ValueError(
            "The search's evaluation reported no eval_task (the student's own loss on the labels): the validation "
            "rows need labels, and a trial with task_weight=0 evaluates it only with eval_with_teacher=False. Pass "
            "compute_objective= (e.g. lambda m: m['eval_accuracy'] with direction='maximize')."
        )
    return metrics["eval_task"]
