"""Size and speed of a model, measured the same way for teacher and student."""

import statistics
import time

import torch


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters in the model (shared tensors counted once)."""
    seen, total = set(), 0
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total


@torch.inference_mode()
def forward_latency_ms(model: torch.nn.Module, batch: dict, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time of one forward pass over `batch`, in milliseconds (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor) and k != "labels"}
    try:
        for _ in range(warmup):
            model(**inputs)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(**inputs)
            times.append((time.perf_counter() - start) * 1000.0)
    finally:
        model.train(was_training)
    return statistics.median(times)


def compare_latency(teacher, student, batch: dict, repeats: int = 10) -> tuple[float, float]:
    """Median latencies of teacher and student, measured in alternating rounds so that drift hits both alike."""
    teacher_times, student_times = [], []
    rounds = max(1, repeats // 2)
    for _ in range(rounds):
        teacher_times.append(forward_latency_ms(teacher, batch, repeats=2, warmup=1))
        student_times.append(forward_latency_ms(student, batch, repeats=2, warmup=1))
    return statistics.median(teacher_times), statistics.median(student_times)
