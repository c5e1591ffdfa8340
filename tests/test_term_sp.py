"""The `sp` term (similarity-preserving KD, Tung & Mori 2019): the pooled default and the flattened maps of the
paper's code, against a reference written from that code."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import hfkd.terms.sp  # noqa: F401  (registers the term)
from hfkd import DistillationConfig
from hfkd.streams import ModelKind
from hfkd.terms import TERMS, Features, TermBatch

KIND = ModelKind(shifts_labels=False, encoder_decoder=False, token_level=False)


def _term(**options):
    cls = TERMS["sp"]
    return cls(cls.Options(**options))


def _side(*states):
    return Features(SimpleNamespace(hidden_states=tuple(states)), {}, KIND)


def _official(f_s, f_t):
    """Tung & Mori's code (similarity_loss): the maps viewed as one row per example, G = f f^T row-normalised,
    the squared Frobenius distance over b^2."""
    b = f_s.shape[0]
    f_s, f_t = f_s.reshape(b, -1), f_t.reshape(b, -1)
    g_s, g_t = F.normalize(f_s @ f_s.t()), F.normalize(f_t @ f_t.t())
    return ((g_t - g_s) ** 2).sum() / (b * b)


def _maps(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_flatten_equals_the_papers_code_on_conv_maps():
    s, t = _maps((6, 4, 7, 7), 0), _maps((6, 8, 4, 4), 1)  # other widths and spatial sizes: only b x b compared
    batch = TermBatch(labels=None, mask=None, num_examples=6)
    value = _term(flatten=True)(_side(s), _side(t), batch)
    torch.testing.assert_close(value, _official(s, t), rtol=1e-12, atol=0)
    # The default pools: global average pooling of each map, as before the option existed.
    pooled = _term()(_side(s), _side(t), batch)
    torch.testing.assert_close(pooled, _official(s.mean((2, 3)), t.mean((2, 3))), rtol=1e-12, atol=0)
    assert abs(pooled.item() - value.item()) > 1e-3  # the two are different measures


def test_flatten_zeroes_the_padding_of_token_sequences():
    s, t = _maps((4, 5, 6), 2), _maps((4, 5, 10), 3)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    batch = TermBatch(labels=None, mask=mask, num_examples=4)
    value = _term(flatten=True)(_side(s), _side(t), batch)
    keep = mask.unsqueeze(-1).double()
    torch.testing.assert_close(value, _official(s * keep, t * keep), rtol=1e-12, atol=0)
    garbage_s, garbage_t = s + 100.0 * (1 - keep), t - 50.0 * (1 - keep)  # padded positions never count
    torch.testing.assert_close(_term(flatten=True)(_side(garbage_s), _side(garbage_t), batch), value)


def test_flatten_must_be_a_boolean():
    with pytest.raises(ValueError, match=r"term 'sp': flatten must be true or false, got 'yes'"):
        DistillationConfig(output_dir="x", report_to=[], terms=[{"name": "sp", "flatten": "yes"}])
