"""Macro-averaged F1 as an `evaluate` module, bundled for machines that cannot reach the Hub's `evaluate-metric/f1`."""

import datasets
import evaluate


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="F1 per class, averaged ('macro' by default).",
            citation="",
            inputs_description="predictions and references: lists of class ids; average: 'macro' or 'micro'.",
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, average="macro"):
        classes = sorted(set(references) | set(predictions))
        if average == "micro":
            return {"f1": sum(int(p == r) for p, r in zip(predictions, references, strict=True)) / len(references)}
        scores = []
        for c in classes:
            tp = sum(1 for p, r in zip(predictions, references, strict=True) if p == c and r == c)
            fp = sum(1 for p, r in zip(predictions, references, strict=True) if p == c and r != c)
            fn = sum(1 for p, r in zip(predictions, references, strict=True) if p != c and r == c)
            scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
        return {"f1": sum(scores) / len(scores) if scores else 0.0}
