"""Contrastive representation distillation (Tian, Krishnan & Isola, "Contrastive Representation Distillation",
ICLR 2020), with the memory bank over the training rows of the paper's implementation.

Each example i (training row y_i of N) has pooled student and teacher features s_i, t_i (PooledFeatureOptions). Two
linear heads embed them to d = `feat_dim` dimensions and L2-normalise (the paper's g^S, g^T):

    v^S_i = normalize(W_S s_i + b_S),      v^T_i = normalize(W_T t_i + b_T)

Two memory banks M^S, M^T in R^{N x d} (the term's buffers) hold one student-side and one teacher-side embedding per
training row. As in the authors' code (HobbitLong/RepDistiller, crd/memory.py) they start uniform in [-a, a] with
a = 1 / sqrt(d / 3), so that each row has an expected squared norm of 1, and after each training step the rows of the
step's examples move towards the new embeddings with momentum m and are renormalised:

    M^S[y_i] <- normalize(m M^S[y_i] + (1 - m) v^S_i),      M^T[y_i] <- normalize(m M^T[y_i] + (1 - m) v^T_i)

For each example, K = `num_negatives` rows j_1..j_K are drawn uniformly at random from the bank (by default excluding
its own row y_i: j is drawn from 0..N-2 and shifted by one past y_i, which is exactly uniform over the other rows);
the same rows serve both directions. The scores (before the banks are updated) are

    student anchored on the teacher bank:   u_i0 = <v^S_i, M^T[y_i]> / tau,   u_ik = <v^S_i, M^T[j_k]> / tau
    teacher anchored on the student bank:   w_i0 = <v^T_i, M^S[y_i]> / tau,   w_ik = <v^T_i, M^S[j_k]> / tau

with tau = `nce_temperature`. `objective="nce"` (default) is the paper's NCE objective: the critic (Sec. 3.1)

    h(u) = P(u) / (P(u) + K / N),     P(u) = exp(u) / Z

is the probability that a pair comes from the joint distribution rather than from the noise distribution 1 / N (the
paper's h(T, S) = e^{g^T(t)'g^S(s)/tau} / (e^{g^T(t)'g^S(s)/tau} + N/M) in its notation, N negatives and M rows), and

    L_S = -(1 / B) sum_i [ log h(u_i0) + sum_k log(1 - h(u_ik)) ],     L_T likewise with w,     L_crd = L_S + L_T

(the authors' ContrastLoss, which they label eq. 18, taken both ways and summed as their CRDLoss does). Z normalises
exp(u) into a probability over the N rows; as in the authors' code it is estimated once, at the first training
forward, as Z = N x the mean of exp(u) over all B (K + 1) scores of that micro-batch (Z_S from u, Z_T from w), and then
kept fixed (stored as log Z in a buffer). log h and log(1 - h) are computed as log-sum-exps, so nothing overflows and
the code's eps = 1e-7 in the denominators is not needed (it changes the code's value by a relative ~1e-7 N / K).

`objective="softmax"` is the InfoNCE form over the same scores: L_S = -(1 / B) sum_i log softmax(u_i)_0, likewise
L_T, summed; it needs no Z. The default is "nce" because it is the objective the paper derives (a bound on the mutual
information with the 1 / N noise distribution) and the one its code and reported numbers use; "softmax" is offered as
an alternative.

Evaluation (`TermBatch.training` False; the trainer passes no row ids then) computes the loss against the banks
without updating them and without advancing the training draws: the positive score is the current example's own
pair, u_i0 = w_i0 = <v^S_i, v^T_i> / tau, the negatives are K rows drawn uniformly from the whole bank with a generator
seeded identically at every evaluation call (so an evaluation is reproducible), and Z is the stored one (before the
first training step: estimated from the evaluated micro-batch, not stored).

Defaults are the paper's (its code's CIFAR-100 settings): feat_dim = 128, num_negatives = 16384, nce_temperature =
0.07, momentum = 0.5. The paper's loss weight is beta = 0.8 next to the task loss (weight 1) and, for CRD+KD, the KD
term (weight 1): use `weight = 0.8` for this term. More negatives than the bank has other rows (K > N - 1) are
clamped to N - 1 with a warning.

Differences from the authors' code: its CIFAR-100 training script passes class-conditional negatives (`mode='exact'`:
K rows of other classes drawn by the data loader), whereas its memory module alone, and this term, draw from all rows
uniformly (the noise distribution 1 / N the NCE loss assumes); it does not exclude the example's own row from the
negatives (`exclude_positive=False` reproduces that).

Reproducibility: the banks, log Z and the sampler's seed and draw count are buffers, saved in each checkpoint's
hfkd_terms.safetensors and restored on resume. Draw number k uses a generator seeded with a hash of (seed, k, process
rank), so a resumed run draws exactly the negatives an uninterrupted one would. `seed=None` takes the seed from the
global RNG in setup() (which TrainingArguments.seed fixes).

Distributed data parallel: before the banks are updated, the rows and embeddings of every process are gathered, so
every process applies the same update (DDP broadcasts rank 0's buffers anyway); Z is estimated over all processes.

Cost: the banks hold 2 N d floats (N = 1M rows, d = 128: 1 GiB in float32); each step gathers B (K + 1) rows of each
bank (B = 64, K = 16384, d = 128: 0.5 GiB per bank in float32): lower num_negatives for large micro-batches.

Unit: batch (the micro-batch mean over its examples). The banks are updated at every training micro-batch, so
gradient accumulation cannot equal one big batch exactly. Needs row ids (`Needs(row_ids=True)`): the train set must be
a datasets.Dataset. Computed in float32 at least, with autocast off.
"""

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import Features, Needs, Term, TermBatch, register_term
from .pooling import PooledFeatureOptions, pooled

logger = logging.getLogger(__name__)

OBJECTIVES = ("nce", "softmax")
_MASK64 = (1 << 64) - 1
_EVAL_STREAM = 0x5EED_E7A1  # evaluation draws: a stream of their own, never a training draw number


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class CRDOptions(PooledFeatureOptions):
    """Where each example's features come from (see PooledFeatureOptions) and CRD's settings (the paper's defaults).

    Attributes:
        feat_dim: width d of the two embedding heads and of the memory banks.
        num_negatives: K, negatives per example drawn from the bank (clamped to N - 1 with a warning).
        nce_temperature: tau in exp(<v, m> / tau).
        momentum: m of the bank update M[y] <- normalize(m M[y] + (1 - m) v), in [0, 1).
        objective: 'nce' (the paper's NCE with the noise distribution 1 / N and the constant Z) or 'softmax'
            (InfoNCE over the positive and the K negatives).
        exclude_positive: draw the negatives from the other rows only (the authors' code does not exclude it).
        seed: the negative sampler's seed; None: drawn from the global RNG in setup().
    Recommended weight: 0.8 (the paper's beta).
    """

    feat_dim: int = 128
    num_negatives: int = 16384
    nce_temperature: float = 0.07
    momentum: float = 0.5
    objective: str = "nce"
    exclude_positive: bool = True
    seed: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if not _positive_int(self.feat_dim):
            raise ValueError(f"feat_dim must be an integer >= 1, got {self.feat_dim!r}.")
        if not _positive_int(self.num_negatives):
            raise ValueError(f"num_negatives must be an integer >= 1, got {self.num_negatives!r}.")
        t = self.nce_temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"nce_temperature must be a finite number > 0, got {t!r}.")
        m = self.momentum
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m < 1:
            raise ValueError(f"momentum must be a number in [0, 1) (1 would never update the banks), got {m!r}.")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r} is not known; choose one of {list(OBJECTIVES)}.")
        if not isinstance(self.exclude_positive, bool):
            raise ValueError(f"exclude_positive must be true or false, got {self.exclude_positive!r}.")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be an integer >= 0 or None (from the global RNG), got {self.seed!r}.")


# ---------------------------------------------------------------------------------------------------- the loss
def crd_nce_loss(scores: torch.Tensor, log_z: torch.Tensor, num_rows: int) -> torch.Tensor:
    """`[B, K + 1]` scores u = <v, m> / tau (column 0: the positive) -> the NCE loss, a mean over the B examples.

    P = exp(u - log Z), h = P / (P + K / N); loss = -mean_i [log h(u_i0) + sum_k log(1 - h(u_ik))].
    """
    k = scores.shape[1] - 1
    log_noise = math.log(k) - math.log(num_rows)  # log(K Pn), Pn = 1 / N
    log_p = scores - log_z
    log_denominator = torch.logaddexp(log_p, torch.full_like(log_p, log_noise))
    log_h_positive = log_p[:, 0] - log_denominator[:, 0]
    log_not_h_negatives = log_noise - log_denominator[:, 1:]
    return -(log_h_positive + log_not_h_negatives.sum(1)).mean()


def crd_softmax_loss(scores: torch.Tensor) -> torch.Tensor:
    """`[B, K + 1]` scores (column 0: the positive) -> -mean_i log softmax(u_i)_0."""
    return -(scores[:, 0] - torch.logsumexp(scores, dim=1)).mean()


def estimate_log_z(scores: torch.Tensor, num_rows: int) -> torch.Tensor:
    """log Z with Z = N x mean(exp(scores)) over every entry (the authors' one-off estimate), as a log-sum-exp."""
    return torch.logsumexp(scores.flatten(), 0) - math.log(scores.numel()) + math.log(num_rows)


def momentum_update(bank: torch.Tensor, rows: torch.Tensor, embeddings: torch.Tensor, momentum: float) -> None:
    """In place: bank[rows] <- normalize(momentum bank[rows] + (1 - momentum) embeddings)."""
    mixed = bank.index_select(0, rows) * momentum + embeddings.to(bank.dtype) * (1.0 - momentum)
    bank.index_copy_(0, rows, F.normalize(mixed, dim=1))


# ---------------------------------------------------------------------------------------------------- helpers
def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps): distinct (seed, draw, rank) give unrelated streams."""
    x = 0x9E3779B97F4A7C15
    for value in values:
        x = (x ^ (value & _MASK64)) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x & ((1 << 63) - 1)


def _distributed() -> tuple[int, int]:
    """(rank, world size), (0, 1) outside torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _gather_rows(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Concatenates each tensor's rows over all processes (rank order); micro-batches may differ in size."""
    _, world = _distributed()
    if world == 1:
        return list(tensors)
    dist = torch.distributed
    device = tensors[0].device
    size = torch.tensor([tensors[0].shape[0]], device=device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    longest = max(sizes)
    gathered = []
    for tensor in tensors:
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        gathered.append(torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)]))
    return gathered


# ---------------------------------------------------------------------------------------------------- the term
@register_term("crd")
class ContrastiveRepresentationDistillation(Term):
    """L_S + L_T of the micro-batch (see the module docstring); heads built and banks allocated in setup()."""

    unit = "batch"
    across_tokenizers = True
    Options = CRDOptions

    def __init__(self, options=None):
        super().__init__(options)
        self.embed_s: nn.Linear | None = None
        self.embed_t: nn.Linear | None = None
        self.num_negatives = self.options.num_negatives
        self._host: tuple[int, int, bool] | None = None  # (seed, draws, Z set): a host copy of the buffers

    def needs(self) -> Needs:
        return self.options.pooled_needs().merge(Needs(row_ids=True))

    # ------------------------------------------------------------------ state
    def setup(self, student: Features, teacher: Features, batch: TermBatch) -> None:
        num_rows = batch.num_rows
        if num_rows is None:
            raise ValueError(
                "crd keeps a memory bank with one row per training example, so it needs the train set's size "
                "(TermBatch.num_rows): train with a datasets.Dataset train_dataset."
            )
        if num_rows < 2:
            raise ValueError(f"crd needs at least 2 training rows (a positive and a negative), got {num_rows}.")
        options = self.options
        s = pooled(student, batch, options, "student", "crd").flatten(1)
        t = pooled(teacher, batch, options, "teacher", "crd").flatten(1)
        d = options.feat_dim
        self.embed_s = nn.Linear(s.shape[-1], d)
        self.embed_t = nn.Linear(t.shape[-1], d)
        bound = 1.0 / math.sqrt(d / 3)  # rows of expected squared norm 1, as the authors' code
        self.register_buffer("memory_s", torch.rand(num_rows, d).mul_(2 * bound).sub_(bound))
        self.register_buffer("memory_t", torch.rand(num_rows, d).mul_(2 * bound).sub_(bound))
        self.register_buffer("log_z", torch.full((2,), float("nan")))  # (log Z_S, log Z_T); NaN: not estimated
        seed = options.seed if options.seed is not None else int(torch.randint(0, 2**62, ()).item())
        self.register_buffer("sampler_seed", torch.tensor(seed, dtype=torch.long))
        self.register_buffer("sampler_draws", torch.zeros((), dtype=torch.long))
        self._host = None
        self.num_negatives = min(options.num_negatives, num_rows - 1)
        if self.num_negatives < options.num_negatives:
            logger.warning(
                "crd: num_negatives=%d but the memory bank has only %d rows (%d other than an example's own): using "
                "%d negatives per example.",
                options.num_negatives,
                num_rows,
                num_rows - 1,
                self.num_negatives,
            )

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._host = None  # the buffers changed: read them again

    def _host_state(self) -> tuple[int, int, bool]:
        if self._host is None:
            self._host = (
                int(self.sampler_seed.item()),
                int(self.sampler_draws.item()),
                not bool(torch.isnan(self.log_z).any()),
            )
        return self._host

    def _negatives(self, rows: torch.Tensor | None, batch_size: int, training: bool) -> torch.Tensor:
        """`[B, K]` row indices: uniform over the bank (over the other rows when rows are given and excluded)."""
        seed, draws, z_set = self._host_state()
        device = self.memory_s.device
        if training:
            rank, _ = _distributed()
            stream = _mix(seed, draws, rank)
            self._host = (seed, draws + 1, z_set)
            self.sampler_draws.fill_(draws + 1)
        else:
            stream = _mix(seed, _EVAL_STREAM)
        generator = torch.Generator(device=device)
        generator.manual_seed(stream)
        num_rows, k = self.memory_s.shape[0], self.num_negatives
        if rows is not None and self.options.exclude_positive:
            index = torch.randint(num_rows - 1, (batch_size, k), generator=generator, device=device)
            return index + (index >= rows.unsqueeze(1)).long()  # skips each example's own row
        return torch.randint(num_rows, (batch_size, k), generator=generator, device=device)

    def _log_z(self, u: torch.Tensor, w: torch.Tensor, training: bool) -> torch.Tensor:
        """(log Z_S, log Z_T): the stored constants, estimated at the first training forward (over all processes)."""
        seed, draws, z_set = self._host_state()
        if z_set:
            return self.log_z.to(u.dtype)
        num_rows = self.memory_s.shape[0]
        estimate = torch.stack((estimate_log_z(u.detach(), num_rows), estimate_log_z(w.detach(), num_rows)))
        if training:
            _, world = _distributed()
            if world > 1:  # log of N x the mean of exp over every process's scores
                sums = torch.stack(
                    (torch.logsumexp(u.detach().flatten(), 0), torch.logsumexp(w.detach().flatten(), 0))
                )
                local = torch.cat((sums, torch.tensor([float(u.numel())], device=u.device, dtype=u.dtype)))
                parts = [torch.empty_like(local) for _ in range(world)]
                torch.distributed.all_gather(parts, local.contiguous())
                stacked = torch.stack(parts)
                estimate = torch.logsumexp(stacked[:, :2], 0) - stacked[:, 2].sum().log() + math.log(num_rows)
            self.log_z.copy_(estimate.to(self.log_z.dtype))
            self._host = (seed, draws, True)
            logger.info("crd: normalisation constants set to Z_S = %.4g, Z_T = %.4g", *estimate.exp().tolist())
        return estimate

    # ------------------------------------------------------------------ the value
    def forward(self, student: Features, teacher: Features, batch: TermBatch) -> torch.Tensor:
        if self.embed_s is None:
            raise ValueError("crd builds its heads and memory banks in setup(), which has not run.")
        options = self.options
        num_rows = self.memory_s.shape[0]
        training = batch.training
        rows = None
        if training:
            if batch.row_ids is None:
                raise ValueError(
                    "crd needs each training example's row in the train set (TermBatch.row_ids) to find its memory "
                    "bank entries; DistillationTrainer adds them for a datasets.Dataset train_dataset."
                )
            if batch.num_rows is not None and batch.num_rows != num_rows:
                raise ValueError(
                    f"crd's memory banks have {num_rows} rows but the train set has {batch.num_rows}: the banks were "
                    "built for another data set."
                )
            rows = batch.row_ids.to(self.memory_s.device).long().flatten()
        dtype = self.embed_s.weight.dtype
        with torch.autocast(device_type=self.memory_s.device.type, enabled=False):
            s = pooled(student, batch, options, "student", "crd").flatten(1).to(dtype)
            with torch.no_grad():
                t = pooled(teacher, batch, options, "teacher", "crd").flatten(1).to(dtype)
            v_s = F.normalize(self.embed_s(s), dim=1)
            v_t = F.normalize(self.embed_t(t.detach()), dim=1)
            b, tau = v_s.shape[0], options.nce_temperature
            if rows is not None and rows.shape[0] != b:
                raise ValueError(f"crd: the batch has {b} examples but {rows.shape[0]} row ids; give one per example.")
            negatives = self._negatives(rows, b, training)
            bank_s, bank_t = self.memory_s.to(dtype), self.memory_t.to(dtype)
            if training:
                index = torch.cat((rows.unsqueeze(1), negatives), dim=1)  # column 0: the positive row
                u = torch.bmm(bank_t[index], v_s.unsqueeze(2)).squeeze(2) / tau  # student vs the teacher bank
                w = torch.bmm(bank_s[index], v_t.unsqueeze(2)).squeeze(2) / tau  # teacher vs the student bank
            else:
                positive = (v_s * v_t).sum(1, keepdim=True) / tau  # the example's own pair
                u = torch.cat((positive, torch.bmm(bank_t[negatives], v_s.unsqueeze(2)).squeeze(2) / tau), dim=1)
                w = torch.cat((positive, torch.bmm(bank_s[negatives], v_t.unsqueeze(2)).squeeze(2) / tau), dim=1)
            if options.objective == "nce":
                log_z = self._log_z(u, w, training)
                value = crd_nce_loss(u, log_z[0], num_rows) + crd_nce_loss(w, log_z[1], num_rows)
            else:
                value = crd_softmax_loss(u) + crd_softmax_loss(w)
            if training:
                with torch.no_grad():
                    all_rows, all_s, all_t = _gather_rows(rows, v_s.detach(), v_t.detach())
                    momentum_update(self.memory_s, all_rows, all_s, options.momentum)
                    momentum_update(self.memory_t, all_rows, all_t, options.momentum)
        return value
