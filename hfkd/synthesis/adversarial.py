"""Data-free adversarial distillation: a generator seeks inputs on which the student and the teacher disagree, and
the student learns on them (Fang, Song, Wang, Shen, Wang & Song, "Data-Free Adversarial Distillation", 2019, DFAD;
Micaelli & Storkey, "Zero-shot Knowledge Transfer via Adversarial Belief Matching", NeurIPS 2019, ZSKT).

A generator G maps noise z ~ N(0, I) of `noise_dim` dimensions to images in the teacher's input space
(`ImageSpace`). With T and S the teacher's and the student's logits and D a discrepancy between them, each of
`iterations` rounds runs

    student_steps times:    minimise over S    D(S(x), T(x)),   x = G(z) (G fixed), a fresh z each step
    generator_steps times:  maximise over G    D(S(G(z)), T(G(z))),   i.e. minimise -D (S and T fixed)

so the generator keeps moving to where the student is still wrong, and the student follows; the teacher stays frozen
in eval mode. D (`loss`):

- 'l1' (DFAD, default): the mean absolute difference of the logits, (1 / (B K)) sum_{i,k} |S_ik - T_ik|, the
  paper's MAE, which it chose over KL and MSE for the steadier gradients it gives the generator as the student
  comes close to the teacher.
- 'kl' (ZSKT): KL(p_T || p_S) = (1 / B) sum_i sum_k p_T,ik (log p_T,ik - log p_S,ik) with p = softmax of the logits
  (temperature 1). ZSKT adds an attention-transfer term (beta 250) that is not implemented here.

The generator is DFAD's (its GeneratorA): a linear layer to 2w maps of size ceil(H/4) x ceil(W/4), batch norm, a 2x
upsampling, a 3x3 convolution (2w -> 2w) with batch norm and LeakyReLU(0.2), an upsampling to H x W, a 3x3
convolution (2w -> w) with batch norm and LeakyReLU(0.2), a 3x3 convolution to the image channels, tanh, and a batch
norm without affine parameters (so its images are standardised per channel, like a processor's output); w =
`generator_width`. It trains in train mode (batch statistics), as in DFAD.

Defaults are DFAD's MNIST setting (DFAD_mnist.py, the closest of its tasks to 28 x 28 grey Fashion-MNIST): batch 512,
2,000 rounds (its 40 epochs of 50), 5 student steps and 1 generator step per round, the student by SGD (lr 0.01,
momentum 0.9, weight decay 1e-4), the generator by Adam (lr 1e-3), noise_dim 100, generator_width 64. DFAD's CIFAR
setting raises the student's lr to 0.1 and weight decay to 5e-4 (batch 256); ZSKT's is batch 128, 10 student steps
per generator step, both by Adam (student 2e-3, generator 1e-3) on a cosine schedule, 80,000 rounds, loss 'kl'.

This is a training loop of its own, not a data set: the generator's images are made for the student of the moment
(where it disagrees with the teacher now), so they are no fixed transfer set for another student. It needs no
batch normalisation in the teacher: any image classifier's logits will do.
"""

import logging
import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .deepinversion import classifier_logits
from .image_space import ImageSpace

logger = logging.getLogger(__name__)

LOSSES = ("l1", "kl")


@dataclass
class AdversarialConfig:
    """The adversarial loop's budget and optimisers (defaults: DFAD's MNIST setting; module docstring)."""

    iterations: int = field(default=2000, metadata={"help": "Rounds of student and generator steps (DFAD: 2,000)."})
    batch_size: int = field(default=512, metadata={"help": "Generated images per step (DFAD, MNIST: 512)."})
    student_steps: int = field(default=5, metadata={"help": "Student steps per round (DFAD: 5; ZSKT: 10)."})
    generator_steps: int = field(default=1, metadata={"help": "Generator steps per round (DFAD and ZSKT: 1)."})
    loss: str = field(
        default="l1",
        metadata={"help": "'l1' (DFAD: mean absolute logit difference) or 'kl' (ZSKT).", "choices": list(LOSSES)},
    )
    student_lr: float = field(default=0.01, metadata={"help": "SGD learning rate of the student (DFAD MNIST: 0.01)."})
    student_momentum: float = field(default=0.9, metadata={"help": "SGD momentum of the student."})
    student_weight_decay: float = field(default=1e-4, metadata={"help": "SGD weight decay of the student."})
    generator_lr: float = field(default=1e-3, metadata={"help": "Adam learning rate of the generator."})
    noise_dim: int = field(default=100, metadata={"help": "Dimensions of the generator's noise input."})
    generator_width: int = field(default=64, metadata={"help": "The generator's base width (DFAD's ngf)."})
    seed: int = field(default=0, metadata={"help": "Seed of the generator's initial weights and of the noise."})

    def __post_init__(self):
        for name in ("iterations", "batch_size", "student_steps", "generator_steps", "noise_dim", "generator_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {list(LOSSES)}, got {self.loss!r}.")
        for name in ("student_lr", "generator_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}.")
        for name in ("student_momentum", "student_weight_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}.")


def discrepancy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, loss: str = "l1") -> torch.Tensor:
    """D(S, T) for [B, K] logits: 'l1', the mean absolute difference; 'kl', KL(softmax T || softmax S) per row,
    averaged over the rows. Computed in float32 at least."""
    s, t = student_logits.float(), teacher_logits.float()
    if loss == "l1":
        return (s - t).abs().mean()
    if loss == "kl":
        log_p_t, log_p_s = F.log_softmax(t, dim=-1), F.log_softmax(s, dim=-1)
        return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()
    raise ValueError(f"loss must be one of {list(LOSSES)}, got {loss!r}.")


class Generator(nn.Module):
    """DFAD's generator (module docstring): noise [B, noise_dim] -> images [B, C, H, W] in the space's shape."""

    def __init__(self, space: ImageSpace, noise_dim: int = 100, width: int = 64):
        super().__init__()
        self.size = (space.height, space.width)
        self.start = (math.ceil(space.height / 4), math.ceil(space.width / 4))
        self.project = nn.Linear(noise_dim, 2 * width * self.start[0] * self.start[1])
        self.norm = nn.BatchNorm2d(2 * width)
        self.block1 = nn.Sequential(
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2)
        )
        self.block2 = nn.Sequential(
            nn.Conv2d(2 * width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, space.channels, 3, padding=1),
            nn.Tanh(),
            nn.BatchNorm2d(space.channels, affine=False),
        )

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        x = self.project(noise.flatten(1)).view(noise.shape[0], -1, *self.start)
        x = F.interpolate(self.norm(x), scale_factor=2)
        x = F.interpolate(self.block1(x), size=self.size)
        return self.block2(x)


@dataclass
class AdversarialResult:
    """The trained student (the model passed in, trained in place), the generator, and what happened."""

    student: nn.Module
    generator: Generator
    record: dict

    @torch.no_grad()
    def sample(self, num_images: int, seed: int = 0) -> torch.Tensor:
        """`num_images` images from the final generator (in train mode, as it was trained), on the CPU."""
        device = next(self.generator.parameters()).device
        noise = torch.randn((num_images, self.generator.project.in_features), generator=_noise(seed))
        return self.generator(noise.to(device)).cpu()


def _noise(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def adversarial_distill(
    teacher: nn.Module,
    student: nn.Module,
    config: AdversarialConfig,
    space: ImageSpace,
    log_every: int = 50,
) -> AdversarialResult:
    """Trains `student` (in place) to match `teacher` on a generator's images, without data (module docstring).

    Both models take `pixel_values` of `space`'s shape and give [batch, classes] logits of the same size (transformers
    image classifiers, or modules returning logits). The generator is built on the student's device and seeded with
    `config.seed`, as is the noise; the student's own randomness (dropout) draws from torch's global generator. The
    teacher is frozen in eval mode during the loop and restored afterwards, the student left in its original mode.

    Returns:
        AdversarialResult: the student, the generator, and a record (per logged round: the student's and the
        generator's last discrepancy; time; settings).
    """
    device = next(student.parameters()).device
    teacher_dtype = next(teacher.parameters()).dtype
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        generator = Generator(space, config.noise_dim, config.generator_width).to(device)
    noise = _noise(config.seed)
    student_optimizer = torch.optim.SGD(
        student.parameters(),
        lr=config.student_lr,
        momentum=config.student_momentum,
        weight_decay=config.student_weight_decay,
    )
    generator_optimizer = torch.optim.Adam(generator.parameters(), lr=config.generator_lr)
    was_training = (teacher.training, student.training)
    grads = [p.requires_grad for p in teacher.parameters()]
    teacher.eval()
    teacher.requires_grad_(False)
    student.train()
    generator.train()
    history, started = [], time.perf_counter()

    def both(images):
        t = classifier_logits(teacher, images.to(teacher_dtype))
        s = classifier_logits(student, images)
        if s.shape != t.shape:
            raise ValueError(f"The student's logits {tuple(s.shape)} and the teacher's {tuple(t.shape)} differ.")
        return discrepancy(s, t, config.loss)

    def draw():
        return torch.randn((config.batch_size, config.noise_dim), generator=noise).to(device)

    try:
        for iteration in range(config.iterations):
            for _ in range(config.student_steps):
                with torch.no_grad():
                    images = generator(draw())
                student_optimizer.zero_grad(set_to_none=True)
                student_loss = both(images)
                student_loss.backward()
                student_optimizer.step()
            for _ in range(config.generator_steps):
                generator_optimizer.zero_grad(set_to_none=True)
                generator_loss = -both(generator(draw()))
                generator_loss.backward()
                generator_optimizer.step()
            if not (torch.isfinite(student_loss) and torch.isfinite(generator_loss)):
                raise FloatingPointError(
                    f"The adversarial loop's loss became non-finite at round {iteration}; lower student_lr "
                    f"({config.student_lr}) or generator_lr ({config.generator_lr})."
                )
            last = iteration == config.iterations - 1
            if (log_every and iteration % log_every == 0) or last:
                entry = {
                    "round": iteration,
                    "student_loss": float(student_loss.detach()),
                    "generator_discrepancy": float(-generator_loss.detach()),
                }
                history.append(entry)
                logger.info("Adversarial distillation, round %d/%d: %s", iteration + 1, config.iterations, entry)
    finally:
        student.zero_grad(set_to_none=True)
        teacher.train(was_training[0])
        student.train(was_training[1])
        for parameter, flag in zip(teacher.parameters(), grads, strict=True):
            parameter.requires_grad_(flag)
    record = {
        "method": "adversarial",
        "papers": "Fang et al. 2019, Data-Free Adversarial Distillation; Micaelli & Storkey 2019, Zero-shot "
        "Knowledge Transfer via Adversarial Belief Matching",
        "config": asdict(config),
        "image_space": space.describe(),
        "student_steps": config.iterations * config.student_steps,
        "history": history,
        "seconds": round(time.perf_counter() - started, 2),
    }
    return AdversarialResult(student, generator, record)
