"""How honest a model's probabilities are, and temperature scaling to make them more so.

Guo et al. 2017, "On Calibration of Modern Neural Networks" (arXiv:1706.04599): a network whose
top-class probability averages 0.95 on images it gets right 85% of the time is overconfident. The
expected calibration error (ECE) measures the gap: the confidence range is cut into 15 equal bins,
and the |accuracy - mean confidence| of each bin is averaged, weighted by its share of the images.
Temperature scaling divides every logit by one number T, fitted to minimise the negative
log-likelihood on held-out images; it changes no prediction (the argmax is the same), only how sure
the probabilities are. It is fitted on the validation split, never on the test set.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassCalibrationError

#: Confidence bins of the ECE and of the reliability diagram (Guo et al. use 15).
N_BINS = 15
#: The range a fitted temperature is kept in.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0


def calibration_metrics(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> dict[str, float]:
    """ECE (torchmetrics, 15 bins, L1), negative log-likelihood, Brier score and accuracy of
    ``logits / temperature`` (N, C) against ``labels`` (N,)."""
    scaled = logits.float() / temperature
    probs = torch.softmax(scaled, dim=1)
    num_classes = logits.shape[1]
    ece = MulticlassCalibrationError(num_classes, n_bins=N_BINS, norm="l1")(probs, labels)
    onehot = F.one_hot(labels, num_classes).float()
    return {
        "ece": float(ece),
        "nll": float(F.cross_entropy(scaled, labels)),
        # the multi-class Brier score: squared distance of the probability vector from the one-hot truth
        "brier": float(((probs - onehot) ** 2).sum(dim=1).mean()),
        "accuracy": float((probs.argmax(dim=1) == labels).float().mean()),
    }


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The temperature T that minimises the NLL of ``logits / T``, by L-BFGS on log T, within
    [``MIN_TEMPERATURE``, ``MAX_TEMPERATURE``]."""
    logits, labels = logits.detach().float(), labels.detach()
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    # A validation set the model gets entirely right pulls T towards 0 (ever sharper is ever
    # better there); the bounds keep such a fit from turning into infinite confidence.
    return float(log_t.detach().clamp(math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)).exp())


def reliability_bins(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> list[dict[str, Any]]:
    """Per confidence bin (15 equal bins of the top-class probability): its range, the number of
    images, their accuracy and their mean confidence (None for an empty bin). The reliability
    diagram draws these; a calibrated model has accuracy = confidence in every bin."""
    probs = torch.softmax(logits.float() / temperature, dim=1)
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, N_BINS + 1)
    # the first bin is closed on the left, the others open, as in torchmetrics
    index = torch.clamp(torch.bucketize(confidence, edges[1:-1], right=False), 0, N_BINS - 1)
    bins = []
    for b in range(N_BINS):
        mask = index == b
        count = int(mask.sum())
        bins.append(
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "count": count,
                "accuracy": float(correct[mask].mean()) if count else None,
                "confidence": float(confidence[mask].mean()) if count else None,
            }
        )
    return bins


def calibration_report(
    val_logits: torch.Tensor, val_labels: torch.Tensor, test_logits: torch.Tensor, test_labels: torch.Tensor
) -> dict[str, Any]:
    """Temperature fitted on the validation split; every test metric before and after scaling."""
    temperature = fit_temperature(val_logits, val_labels)
    return {
        "temperature": temperature,
        "fitted_on": f"validation split ({len(val_labels)} images)",
        "bins": N_BINS,
        "before": calibration_metrics(test_logits, test_labels),
        "after": calibration_metrics(test_logits, test_labels, temperature),
        "reliability_before": reliability_bins(test_logits, test_labels),
        "reliability_after": reliability_bins(test_logits, test_labels, temperature),
    }
