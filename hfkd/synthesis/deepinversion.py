"""DeepInversion (Yin, Molchanov, Li, Alvarez, Mallya, Hoiem, Jha & Kautz, "Dreaming to Distill: Data-free Knowledge
Transfer via DeepInversion", CVPR 2020): images synthesised from a teacher with batch normalisation, to distil a
student without the training data.

A batch of images x (in the teacher's normalised input space, `ImageSpace`) starts as Gaussian noise and is
optimised by Adam, the teacher frozen in eval mode, to minimise

    L(x) = ce_weight * CE(f(x'), y) + bn_weight * R_feature(x') + tv_l1_weight * R_TV1(x') + tv_l2_weight * R_TV2(x')
           + l2_weight * R_l2(x')

where x' is x under a random jitter drawn anew at each iteration (a cyclic shift by up to `jitter` pixels along
each axis, and with `flip` a horizontal flip with probability 1/2), f(x') the teacher's logits and y the target
classes, balanced over the classes (image i aims at class i mod C, or at the i-th of `classes` in turn). The terms:

- R_feature, the paper's feature distribution regulariser: for every batch-normalisation layer l of the teacher,
  with mu_l(x') and sigma^2_l(x') the per-channel mean and (biased) variance of the layer's input over the batch and
  all positions, and mu_l^run, sigma^2_l^run the layer's running statistics (what it saw on the training data):

      R_feature = sum_l m_l * ( ||mu_l(x') - mu_l^run||_2 + ||sigma^2_l(x') - sigma^2_l^run||_2 )

  with m_1 = `first_bn_multiplier` for the first layer (in module order) and m_l = 1 for the others.
- R_TV1 and R_TV2, total variation over the differences between neighbouring pixels along the four directions the
  authors' code uses (right, down, and both diagonals): R_TV2 = sum_d ||D_d x'||_F, the Frobenius norm over the whole
  batch (not squared), and R_TV1 = sum_d mean |D_d x'|.
- R_l2 = the mean over the images of ||x'_i||_2.

With `clip`, x is clipped after each step to the range that pixels 0..255 map to (the ImageNet code's `clip`), so the
images that are stored (as 0-255 pixels) are the images that were optimised.

Defaults. The paper (and the authors' code, NVlabs/DeepInversion) gives two settings:

| field | ImageNet, 224 x 224 (imagenet_inversion.py) | CIFAR-10, 32 x 32 (paper, cifar10/) = hfkd's default |
|---|---|---|
| bn_weight | 0.05 (the paper's runs: 0.01) | 10 (hfkd: 1, below) |
| first_bn_multiplier | 10 | 1 |
| tv_l2_weight / tv_l1_weight | 1e-4 / 0 | 2.5e-5 / 0 |
| l2_weight | 1e-5 | 0 |
| lr, Adam betas | 0.2 (runs: 0.25), (0.5, 0.9), cosine with 100 warm-up iterations | 0.05, (0.9, 0.999), constant |
| iterations, batch | 2,000 (plus a first half-resolution stage in setting 0) | 2,000, 256 |
| jitter, flip | 30 pixels, yes | 2 pixels, no |

hfkd's defaults are the CIFAR-10 setting, the one made for small images like 28 x 28 grey Fashion-MNIST (whose shoes
all face one way: no flip), with two changes fitted to 28 x 28 grey. `clip` is on (the CIFAR code does not clip;
hfkd stores pixels, see above). `bn_weight` is 1, not 10: on benchmarks/methods.py's Fashion-MNIST ResNet teacher
(15 BN layers, 89.0%), 1,000 iterations on 64 images at bn_weight 10 drove R_feature (17.5, without jitter) below
what 64 real test images give (21.7) while the teacher assigned only 14% of the images to their target class
(cross-entropy 6.9); at bn_weight 1, R_feature ended at 28.7 and the teacher agreed on 64% (cross-entropy 2.2).
`bn_weight=10` is the paper's setting. For 224 x 224 teachers use the ImageNet column. Not implemented: the ImageNet code's first stage at half resolution,
keeping the best iterate, and Adaptive DeepInversion's competition term (it needs a student during synthesis).
"""

import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..models import call_model, output_value
from .image_space import ImageSpace

logger = logging.getLogger(__name__)

LR_SCHEDULES = ("constant", "cosine")
COSINE_WARMUP = 100  # iterations of linear warm-up before the cosine (the ImageNet code's lr_cosine_policy)


@dataclass
class DeepInversionConfig:
    """What DeepInversion synthesises and how (defaults: the paper's CIFAR-10 setting; see the module docstring for
    ImageNet's)."""

    num_images: int = field(default=2560, metadata={"help": "How many images to synthesise (>= 1)."})
    batch_size: int = field(
        default=256,
        metadata={"help": "Images optimised together; the batch statistics R_feature matches are this batch's."},
    )
    iterations: int = field(default=2000, metadata={"help": "Adam steps per batch (paper: 2,000)."})
    lr: float = field(default=0.05, metadata={"help": "Adam learning rate on the pixels (paper, CIFAR-10: 0.05)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "Adam beta1 (ImageNet code: 0.5)."})
    adam_beta2: float = field(default=0.999, metadata={"help": "Adam beta2 (ImageNet code: 0.9)."})
    lr_schedule: str = field(
        default="constant",
        metadata={
            "help": f"'constant', or 'cosine' ({COSINE_WARMUP} iterations of linear warm-up, then a cosine to 0: the "
            "ImageNet code's).",
            "choices": list(LR_SCHEDULES),
        },
    )
    ce_weight: float = field(default=1.0, metadata={"help": "Weight of the cross-entropy to the target classes."})
    bn_weight: float = field(
        default=1.0,
        metadata={
            "help": "Weight of R_feature, the batch-norm statistics term (hfkd, fitted to 28x28 grey: 1; the paper's "
            "CIFAR-10: 10; ImageNet code: 0.05)."
        },
    )
    first_bn_multiplier: float = field(
        default=1.0, metadata={"help": "Extra factor on the first BN layer's statistics (ImageNet code: 10)."}
    )
    tv_l1_weight: float = field(default=0.0, metadata={"help": "Weight of the L1 total variation prior."})
    tv_l2_weight: float = field(
        default=2.5e-5, metadata={"help": "Weight of the L2 total variation prior (CIFAR-10: 2.5e-5; ImageNet: 1e-4)."}
    )
    l2_weight: float = field(
        default=0.0, metadata={"help": "Weight of the images' L2 norm prior (CIFAR-10: 0; ImageNet: 1e-5)."}
    )
    jitter: int = field(
        default=2,
        metadata={"help": "Random cyclic shift, in pixels each way, per iteration (CIFAR-10: 2; ImageNet: 30)."},
    )
    flip: bool = field(
        default=False, metadata={"help": "Random horizontal flips during optimisation (ImageNet: yes; CIFAR-10: no)."}
    )
    clip: bool = field(
        default=True, metadata={"help": "Clip the images after each step to what 0-255 pixels can hold."}
    )
    classes: list[int] | None = field(
        default=None,
        metadata={"help": "The target classes (ids), in turn; default: every class of the teacher's head."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the initial noise, the jitter and the flips."})

    def __post_init__(self):
        for name in ("num_images", "batch_size", "iterations"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fix = {
                    "num_images": "how many images to synthesise, e.g. --num_images 2560",
                    "batch_size": "e.g. 256",
                    "iterations": "e.g. 2000",
                }[name]
                raise ValueError(f"{name} must be an integer >= 1 ({fix}), got {value!r}.")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}.")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}.")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}.")
        for name in ("ce_weight", "bn_weight", "first_bn_multiplier", "tv_l1_weight", "tv_l2_weight", "l2_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}.")
        if self.jitter < 0:
            raise ValueError(f"jitter must be >= 0 pixels, got {self.jitter}.")
        if self.classes is not None and (not self.classes or min(self.classes) < 0):
            raise ValueError(f"classes must be a non-empty list of class ids >= 0, got {self.classes}.")


# ---------------------------------------------------------------------------------------------------- the losses
def batch_norm_statistics_loss(
    features: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor
) -> torch.Tensor:
    """One layer's R_feature: ||mu - running_mean||_2 + ||var - running_var||_2, with mu and var the per-channel mean
    and biased variance of `features` ([N, C, ...], the layer's input) over every dimension but the channels."""
    dims = [0, *range(2, features.dim())]
    x = features.float() if features.dtype in (torch.float16, torch.bfloat16) else features
    mean = x.mean(dim=dims)
    var = x.var(dim=dims, correction=0)
    return torch.linalg.vector_norm(mean - running_mean.to(mean.dtype)) + torch.linalg.vector_norm(
        var - running_var.to(var.dtype)
    )


def total_variation(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R_TV1, R_TV2) of [N, C, H, W] images over the four neighbour directions (right, down and both diagonals):
    R_TV1 = sum of the mean absolute differences, R_TV2 = sum of the differences' Frobenius norms over the batch."""
    differences = (
        images[:, :, :, :-1] - images[:, :, :, 1:],
        images[:, :, :-1, :] - images[:, :, 1:, :],
        images[:, :, 1:, :-1] - images[:, :, :-1, 1:],
        images[:, :, :-1, :-1] - images[:, :, 1:, 1:],
    )
    tv_l1 = sum(d.abs().mean() for d in differences)
    tv_l2 = sum(torch.linalg.vector_norm(d) for d in differences)
    return tv_l1, tv_l2


def l2_prior(images: torch.Tensor) -> torch.Tensor:
    """R_l2: the mean over the images of each image's L2 norm."""
    return torch.linalg.vector_norm(images.flatten(1), dim=1).mean()


# ---------------------------------------------------------------------------------------------------- the teacher
def batch_norm_layers(model: nn.Module) -> list[nn.Module]:
    """The model's batch-normalisation layers that keep running statistics, in module order; refuses a model with
    none, naming the method that applies instead."""
    layers = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    ]
    if layers:
        return layers
    name = type(model).__name__
    untracked = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    layer_norm = any(isinstance(m, (nn.LayerNorm, nn.GroupNorm)) for m in model.modules())
    why = (
        "its BatchNorm layers keep no running statistics (track_running_stats=False)"
        if untracked
        else "it normalises with LayerNorm/GroupNorm, which keep no statistics of the training data"
        if layer_norm
        else "it has no BatchNorm layer"
    )
    raise ValueError(
        f"DeepInversion (method='deepinversion') matches the running statistics of the teacher's BatchNorm layers, "
        f"and the teacher {name} has none: {why}. Use the adversarial generator instead "
        "(hfkd.synthesis.adversarial_distill, Fang et al. 2019 / Micaelli & Storkey 2019), which needs only the "
        "teacher's logits, or a teacher with batch normalisation (a ResNet, a ConvNet with BatchNorm2d)."
    )


class _Statistics:
    """Forward hooks that compute each BN layer's R_feature term on the layer's input, in module order."""

    def __init__(self, layers: list[nn.Module]):
        self.values: dict[int, torch.Tensor] = {}
        self.handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(layers)]
        self.count = len(layers)

    def _hook(self, index: int):
        def hook(module, inputs, output):
            self.values[index] = batch_norm_statistics_loss(inputs[0], module.running_mean, module.running_var)

        return hook

    def total(self, first_multiplier: float) -> torch.Tensor:
        if len(self.values) != self.count:
            raise RuntimeError(f"{self.count - len(self.values)} BatchNorm layer(s) did not run in the forward pass.")
        return sum(value * (first_multiplier if i == 0 else 1.0) for i, value in sorted(self.values.items()))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def classifier_logits(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The classifier's logits for `pixel_values` (a transformers model or a plain module returning logits)."""
    outputs = call_model(model, {"pixel_values": pixel_values})
    logits = outputs if isinstance(outputs, torch.Tensor) else output_value(outputs, "logits")
    if logits is None or logits.dim() != 2:
        raise ValueError(
            f"{type(model).__name__} gave no [batch, classes] logits for pixel_values; data-free synthesis needs an "
            "image classifier (e.g. AutoModelForImageClassification)."
        )
    return logits


def num_classes_of(model: nn.Module, space: ImageSpace) -> int:
    """The size of the teacher's head: its config's num_labels, else one forward on a blank image."""
    labels = getattr(getattr(model, "config", None), "num_labels", None)
    if labels:
        return int(labels)
    device = next(model.parameters()).device
    with torch.no_grad():
        return classifier_logits(model, torch.zeros(1, *space.shape, device=device)).shape[-1]


def balanced_targets(num_images: int, classes: list[int]) -> torch.Tensor:
    """Image i aims at classes[i mod len(classes)]: every batch of a multiple of len(classes) is balanced."""
    return torch.tensor([classes[i % len(classes)] for i in range(num_images)], dtype=torch.long)


# ---------------------------------------------------------------------------------------------------- synthesis
@dataclass
class Synthesized:
    """Synthesised images, the classes they were made for, and what happened."""

    pixel_values: torch.Tensor  # [N, C, H, W] float32 on the CPU, in the teacher's input space
    targets: torch.Tensor  # [N] class ids
    record: dict  # settings, losses, the teacher's agreement with the targets, time


def deep_inversion(teacher: nn.Module, config: DeepInversionConfig, space: ImageSpace, log_every: int = 200):
    """Synthesises `config.num_images` images from `teacher` by DeepInversion (module docstring).

    The teacher runs in eval mode with its parameters frozen; both are restored afterwards. Images are optimised
    on the teacher's device, a batch at a time. Deterministic for a seed on a given device.

    Returns:
        Synthesized: pixel_values [N, C, H, W] (float32, CPU), targets [N], and a record with the last iteration's
        losses per batch and the share of images the teacher assigns to their target class.
    """
    layers = batch_norm_layers(teacher)
    num_classes = num_classes_of(teacher, space)
    classes = list(config.classes) if config.classes is not None else list(range(num_classes))
    if max(classes) >= num_classes:
        raise ValueError(f"classes={config.classes} names a class >= the teacher's {num_classes} classes.")
    targets = balanced_targets(config.num_images, classes)
    device = next(teacher.parameters()).device
    dtype = next(teacher.parameters()).dtype
    noise = torch.Generator().manual_seed(config.seed)
    draws = random.Random(config.seed)
    was_training = teacher.training
    grads = [p.requires_grad for p in teacher.parameters()]
    teacher.eval()
    teacher.requires_grad_(False)
    statistics = _Statistics(layers)
    started, images, batches = time.perf_counter(), [], []
    try:
        for start in range(0, config.num_images, config.batch_size):
            y = targets[start : start + config.batch_size].to(device)
            x = torch.randn((len(y), *space.shape), generator=noise).to(device)
            x, losses = _invert(teacher, x, y, config, space, statistics, draws, dtype)
            with torch.no_grad():
                predicted = classifier_logits(teacher, x.to(dtype)).argmax(-1)
            losses["teacher_agrees"] = float((predicted == y).float().mean())
            batches.append(losses)
            images.append(x.detach().float().cpu())
            if log_every:
                logger.info(
                    "DeepInversion: %d/%d images, last iteration's loss %.4f (ce %.4f, bn %.4f); the teacher "
                    "predicts the target for %.1f%% of them.",
                    start + len(y),
                    config.num_images,
                    losses["loss"],
                    losses["ce"],
                    losses["bn"],
                    100 * losses["teacher_agrees"],
                )
    finally:
        statistics.remove()
        teacher.train(was_training)
        for parameter, flag in zip(teacher.parameters(), grads, strict=True):
            parameter.requires_grad_(flag)
    seconds = time.perf_counter() - started
    agrees = sum(b["teacher_agrees"] * n for b, n in zip(batches, _sizes(config), strict=True)) / config.num_images
    record = {
        "method": "deepinversion",
        "paper": "Yin et al., Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion, CVPR 2020",
        "config": asdict(config),
        "image_space": space.describe(),
        "num_classes": num_classes,
        "batch_norm_layers": len(layers),
        "teacher_agrees": agrees,
        "batches": batches,
        "seconds": round(seconds, 2),
    }
    return Synthesized(torch.cat(images), targets, record)


def _sizes(config: DeepInversionConfig) -> list[int]:
    return [min(config.batch_size, config.num_images - s) for s in range(0, config.num_images, config.batch_size)]


def _learning_rate(config: DeepInversionConfig, iteration: int) -> float:
    if config.lr_schedule == "constant":
        return config.lr
    warmup = min(COSINE_WARMUP, config.iterations)
    if iteration < warmup:
        return config.lr * (iteration + 1) / warmup
    rest = max(config.iterations - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * (iteration - warmup) / rest)) * config.lr


def _jittered(x: torch.Tensor, config: DeepInversionConfig, draws: random.Random) -> torch.Tensor:
    if config.jitter:
        shifts = (draws.randint(-config.jitter, config.jitter), draws.randint(-config.jitter, config.jitter))
        x = torch.roll(x, shifts=shifts, dims=(2, 3))
    if config.flip and draws.random() < 0.5:
        x = torch.flip(x, dims=(3,))
    return x


def _invert(teacher, x, y, config: DeepInversionConfig, space: ImageSpace, statistics, draws, dtype):
    """Optimises one batch; returns it and the last iteration's losses (floats)."""
    x = x.requires_grad_(True)
    first = None
    optimizer = torch.optim.Adam([x], lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=1e-8)
    for iteration in range(config.iterations):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(config, iteration)
        optimizer.zero_grad(set_to_none=True)
        statistics.values.clear()
        seen = _jittered(x, config, draws)
        logits = classifier_logits(teacher, seen.to(dtype)).float()
        ce = F.cross_entropy(logits, y)
        bn = statistics.total(config.first_bn_multiplier)
        tv_l1, tv_l2 = total_variation(seen)
        l2 = l2_prior(seen)
        loss = (
            config.ce_weight * ce
            + config.bn_weight * bn
            + config.tv_l1_weight * tv_l1
            + config.tv_l2_weight * tv_l2
            + config.l2_weight * l2
        )
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"DeepInversion's loss became {loss.item()} at iteration {iteration}; lower lr (now {config.lr})."
            )
        if first is None:
            first = float(loss.detach())
        loss.backward()
        optimizer.step()
        if config.clip:
            with torch.no_grad():
                x.copy_(space.clip(x))
    values = {"loss": loss, "ce": ce, "bn": bn, "tv_l1": tv_l1, "tv_l2": tv_l2, "l2": l2}
    return x.detach(), {"first_loss": first, **{k: float(v.detach()) for k, v in values.items()}}
