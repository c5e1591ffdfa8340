"""Cross-vocabulary distillation (span alignment, vocabulary matching, span log-probabilities, ULD sorted L1 and the
span divergence) against float64 references written independently from the specification: explicit Python loops and
`math`, hand-worked known answers. Nothing here reuses the implementation's expressions.

Tolerance: 1e-10 absolute everywhere; every input is float64 and the implementation is run in float64.
"""

import math
import random

import numpy as np
import pytest
import torch

from hfkd.alignment import align_spans, match_vocabularies, span_log_probs
from hfkd.losses.cross_vocab import sorted_l1, span_divergence

ATOL = 1e-10


# ----------------------------------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------------------------------


def ref_align_spans(s_off, t_off, s_keep=None, t_keep=None):
    """Loop reference for align_spans, written from the specification."""
    s_keep = [True] * len(s_off) if s_keep is None else [bool(k) for k in s_keep]
    t_keep = [True] * len(t_off) if t_keep is None else [bool(k) for k in t_keep]
    s_idx = [k for k, (a, b) in enumerate(s_off) if a < b]
    t_idx = [k for k, (a, b) in enumerate(t_off) if a < b]
    spans = []
    cur_s, cur_t = [], []
    i = j = 0
    while i < len(s_idx) and j < len(t_idx):
        es = s_off[s_idx[i]][1]
        et = t_off[t_idx[j]][1]
        if es < et:
            cur_s.append(s_idx[i])
            i += 1
        elif et < es:
            cur_t.append(t_idx[j])
            j += 1
        else:
            e = es
            cur_s.append(s_idx[i])
            cur_t.append(t_idx[j])
            i += 1
            j += 1
            while i < len(s_idx) and s_off[s_idx[i]][1] <= e:
                cur_s.append(s_idx[i])
                i += 1
            while j < len(t_idx) and t_off[t_idx[j]][1] <= e:
                cur_t.append(t_idx[j])
                j += 1
            spans.append((cur_s, cur_t))
            cur_s, cur_t = [], []
    s_out = [-1] * len(s_off)
    t_out = [-1] * len(t_off)
    n = 0
    for ss, tt in spans:
        if all(s_keep[k] for k in ss) and all(t_keep[k] for k in tt):
            for k in ss:
                s_out[k] = n
            for k in tt:
                t_out[k] = n
            n += 1
    return s_out, t_out


def ref_log_softmax(row, temperature=1.0):
    z = [float(x) / temperature for x in row]
    m = max(z)
    lse = m + math.log(sum(math.exp(x - m) for x in z))
    return [x - lse for x in z]


def ref_span_log_probs(logits, input_ids, spans, temperature=1.0):
    logits = logits.tolist()
    input_ids = input_ids.tolist()
    spans = spans.tolist()
    out = []
    for b in range(len(spans)):
        n_spans = max(spans[b]) + 1 if spans[b] else 0
        for sid in range(n_spans):
            pos = [k for k, s in enumerate(spans[b]) if s == sid]
            row = ref_log_softmax(logits[b][pos[0] - 1], temperature)
            extra = 0.0
            for p in pos[1:]:
                extra += ref_log_softmax(logits[b][p - 1], temperature)[input_ids[b][p]]
            out.append([v + extra for v in row])
    return out


def ref_sorted_l1_row(p, q):
    p = sorted((float(x) for x in p), reverse=True)
    q = sorted((float(x) for x in q), reverse=True)
    n = max(len(p), len(q))
    p = p + [0.0] * (n - len(p))
    q = q + [0.0] * (n - len(q))
    return sum(abs(a - b) for a, b in zip(p, q))


def ref_span_divergence(log_qs, log_qt, ms, mt, matched_weight=1.0, unmatched_weight=1.0):
    log_qs = log_qs.tolist()
    log_qt = log_qt.tolist()
    ms = [int(x) for x in ms]
    mt = [int(x) for x in mt]
    out = []
    for ls, lt in zip(log_qs, log_qt):
        m = 0.0
        for a, b in zip(ms, mt):
            qt_b = math.exp(lt[b])
            qs_a = math.exp(ls[a])
            m += qt_b * (lt[b] - ls[a]) - qt_b + qs_a
        us = [math.exp(ls[k]) for k in range(len(ls)) if k not in ms]
        ut = [math.exp(lt[k]) for k in range(len(lt)) if k not in mt]
        u = ref_sorted_l1_row(us, ut)
        out.append(matched_weight * m + unmatched_weight * u)
    return out


def ref_kl(pt_logits_row, ps_logits_row, temperature=1.0):
    """KL(softmax(t / T) || softmax(s / T)) by a loop."""
    lt = ref_log_softmax(pt_logits_row, temperature)
    ls = ref_log_softmax(ps_logits_row, temperature)
    return sum(math.exp(a) * (a - b) for a, b in zip(lt, ls))


def as_int_list(x):
    return [int(v) for v in x]


def check_align(s_off, t_off, s_keep=None, t_keep=None, expected=None):
    got_s, got_t = align_spans(s_off, t_off, s_keep, t_keep)
    got = (as_int_list(got_s), as_int_list(got_t))
    ref = ref_align_spans(s_off, t_off, s_keep, t_keep)
    if expected is not None:
        # the hand-worked answer also validates the loop reference
        assert ref == expected
        assert got == expected
    assert got == ref
    return got


def assert_close64(actual, expected):
    """Values at 1e-10 when the result is float64. A result that came back in a lower precision from float64 inputs is
    compared at that precision's tolerance (1e-5 for float32) so the value tests tell "wrong math" apart from "lost
    precision"; the dtype itself is checked by the test_*_keeps_float64 tests, which fail on it."""
    atol = ATOL if actual.dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(
        actual.detach().double().numpy(), np.asarray(expected, dtype=np.float64), rtol=0, atol=atol
    )


# ----------------------------------------------------------------------------------------------------------------------
# 1. align_spans
# ----------------------------------------------------------------------------------------------------------------------


def test_align_identical_tokenizations_one_span_per_token():
    off = [(0, 5), (5, 11), (11, 14), (14, 15)]
    check_align(off, list(off), expected=([0, 1, 2, 3], [0, 1, 2, 3]))


def test_align_unbelievable_is_one_span():
    s = [(0, 2), (2, 8), (8, 12)]  # un | believ | able
    t = [(0, 5), (5, 12)]  # unbel | ievable
    check_align(s, t, expected=([0, 0, 0], [0, 0]))
    check_align(t, s, expected=([0, 0], [0, 0, 0]))


def test_align_bytelevel_vs_trimmed_wordpiece():
    # "Hello, Paris is big."  H0 ... o4 ,5 _6 P7 a8 r9 i10 s11 _12 i13 s14 _15 b16 i17 g18 .19
    # byte-level side: the comma merged with the leading space of the next word; words carry their leading space
    s = [(0, 5), (5, 7), (7, 12), (12, 15), (15, 19), (19, 20)]  # Hello | ", " | Paris | " is" | " big" | .
    # trimmed wordpiece side: words split in two, no spaces in the offsets
    t = [(0, 3), (3, 5), (5, 6), (7, 10), (10, 12), (13, 15), (16, 17), (17, 19), (19, 20)]
    # Hel lo | , Par is | is | b ig | .
    check_align(s, t, expected=([0, 1, 1, 2, 3, 4], [0, 0, 1, 1, 1, 2, 3, 3, 4]))
    check_align(t, s, expected=([0, 0, 1, 1, 1, 2, 3, 3, 4], [0, 1, 1, 2, 3, 4]))


def test_align_leading_space_offsets_vs_trimmed_offsets():
    # "Hello, Paris"  byte-level " Paris" is (6, 12); trimmed "Paris" is (7, 12): they still close at the same end
    s = [(0, 5), (5, 6), (6, 12)]
    t = [(0, 5), (5, 6), (7, 12)]
    check_align(s, t, expected=([0, 1, 2], [0, 1, 2]))
    # the spec's example: " Paris" (5, 11) vs "Paris" (6, 11) in "Hello Paris"
    s = [(0, 5), (5, 11)]
    t = [(0, 2), (2, 5), (6, 8), (8, 11)]
    check_align(s, t, expected=([0, 1], [0, 0, 1, 1]))


def test_align_special_token_on_one_side_only():
    s = [(0, 0), (0, 3), (3, 5), (5, 9)]  # BOS
    t = [(0, 3), (3, 5), (5, 9), (0, 0)]  # EOS
    check_align(s, t, expected=([-1, 0, 1, 2], [0, 1, 2, -1]))
    # padding on both sides, of different lengths
    s = [(0, 0), (0, 4), (4, 9), (0, 0), (0, 0)]
    t = [(0, 2), (2, 4), (4, 9), (0, 0)]
    check_align(s, t, expected=([-1, 0, 1, -1, -1], [0, 0, 1, -1]))


def test_align_tokens_sharing_offsets_multibyte():
    # student has the middle character as two byte tokens with the same offsets (1, 2)
    s = [(0, 1), (1, 2), (1, 2), (2, 3)]
    t = [(0, 1), (1, 2), (2, 3)]
    check_align(s, t, expected=([0, 1, 1, 2], [0, 1, 2]))
    check_align(t, s, expected=([0, 1, 2], [0, 1, 1, 2]))
    # both sides have byte tokens for it, different counts
    s = [(0, 1), (1, 2), (1, 2), (1, 2), (2, 3)]
    t = [(0, 1), (1, 2), (1, 2), (2, 3)]
    check_align(s, t, expected=([0, 1, 1, 1, 2], [0, 1, 1, 2]))
    # the shared-offset tokens follow a span close on a longer token of the other side
    s = [(0, 2), (1, 2), (2, 4)]
    t = [(0, 1), (1, 2), (2, 4)]
    check_align(s, t, expected=([0, 0, 1], [0, 0, 1]))


def test_align_keep_false_drops_whole_span_and_renumbers():
    s = [(0, 2), (2, 8), (8, 12), (12, 15), (15, 18)]  # un believ able | " is" | " it"
    t = [(0, 5), (5, 12), (12, 15), (15, 18)]  # unbel ievable | " is" | " it"
    check_align(s, t, s_keep=[True, False, True, True, True], expected=([-1, -1, -1, 0, 1], [-1, -1, 0, 1]))
    check_align(s, t, t_keep=[True, True, False, True], expected=([0, 0, 0, -1, 1], [0, 0, -1, 1]))
    check_align(
        s,
        t,
        s_keep=[True, True, True, True, False],
        t_keep=[False, True, True, True],
        expected=([-1, -1, -1, 0, -1], [-1, -1, 0, -1]),
    )
    # keep on a token that is in no span (special) does not matter
    s2 = [(0, 0), (0, 3), (3, 6)]
    t2 = [(0, 3), (3, 6)]
    check_align(s2, t2, s_keep=[False, True, True], expected=([-1, 0, 1], [0, 1]))


def test_align_truncation_leftovers_are_unaligned():
    # teacher covers less text: its last token ends at 11, the student continues
    s = [(0, 5), (5, 11), (11, 15)]
    t = [(0, 5), (5, 11)]
    check_align(s, t, expected=([0, 1, -1], [0, 1]))
    # truncated in the middle of a span: the open span's tokens are left over
    s = [(0, 5), (5, 8), (8, 11)]
    t = [(0, 5), (5, 9)]
    check_align(s, t, expected=([0, -1, -1], [0, -1]))
    # nothing in common at all
    check_align([(0, 3)], [(0, 2)], expected=([-1], [-1]))
    check_align([], [(0, 2)], expected=([], [-1]))


def test_align_keep_none_equals_all_true():
    s = [(0, 0), (0, 2), (2, 8), (8, 12)]
    t = [(0, 5), (5, 12)]
    a = check_align(s, t)
    b = check_align(s, t, [True] * 4, [True] * 2)
    assert a == b == ([-1, 0, 0, 0], [0, 0])


def _random_text(rng):
    words = []
    for _ in range(rng.randint(1, 7)):
        w = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 7)))
        if rng.random() < 0.2:
            w += rng.choice(",.!")
        words.append(w)
    return " ".join(words)


def _cuts(rng, a, b, p):
    return [a] + [k for k in range(a + 1, b) if rng.random() < p] + [b]


def _bytelevel(rng, text):
    c = _cuts(rng, 0, len(text), rng.choice([0.2, 0.4, 0.7]))
    return [(c[k], c[k + 1]) for k in range(len(c) - 1)]


def _trimmed(rng, text):
    toks = []
    k = 0
    while k < len(text):
        if text[k] == " ":
            k += 1
            continue
        e = k
        while e < len(text) and text[e] != " ":
            e += 1
        c = _cuts(rng, k, e, rng.choice([0.2, 0.5]))
        toks += [(c[m], c[m + 1]) for m in range(len(c) - 1)]
        k = e
    return toks


def _decorate(rng, toks):
    toks = list(toks)
    # multi-byte characters: a token repeated with the same offsets
    out = []
    for t in toks:
        out.append(t)
        if t[1] - t[0] == 1 and rng.random() < 0.15:
            out += [t] * rng.randint(1, 2)
    toks = out
    if rng.random() < 0.3:  # truncation
        toks = toks[: rng.randint(0, len(toks))]
    if rng.random() < 0.4:  # BOS
        toks = [(0, 0)] + toks
    if rng.random() < 0.3:  # EOS / padding
        toks = toks + [(0, 0)] * rng.randint(1, 3)
    return toks


def _random_keep(rng, n):
    if rng.random() < 0.4:
        return None
    return [rng.random() < 0.9 for _ in range(n)]


def test_align_random_segmentations_against_reference():
    rng = random.Random(1234)
    failures = []
    n_spans_seen = 0
    for case in range(200):
        text = _random_text(rng)
        make_s = rng.choice([_bytelevel, _trimmed])
        make_t = rng.choice([_bytelevel, _trimmed])
        s = _decorate(rng, make_s(rng, text))
        t = _decorate(rng, make_t(rng, text))
        s_keep = _random_keep(rng, len(s))
        t_keep = _random_keep(rng, len(t))
        ref_s, ref_t = ref_align_spans(s, t, s_keep, t_keep)
        # sanity of the reference itself: ids consecutive from 0, each span on both sides, same closing end
        ids = sorted(set(ref_s) - {-1})
        assert ids == list(range(len(ids))) == sorted(set(ref_t) - {-1})
        for sid in ids:
            es = max(s[k][1] for k in range(len(s)) if ref_s[k] == sid)
            et = max(t[k][1] for k in range(len(t)) if ref_t[k] == sid)
            assert es == et
        n_spans_seen += len(ids)
        got_s, got_t = align_spans(s, t, s_keep, t_keep)
        got = (as_int_list(got_s), as_int_list(got_t))
        if got != (ref_s, ref_t):
            failures.append(
                dict(case=case, text=text, s=s, t=t, s_keep=s_keep, t_keep=t_keep, ref=(ref_s, ref_t), got=got)
            )
    assert n_spans_seen > 300  # the generator does produce alignments (489 with this seed)
    assert not failures, f"{len(failures)} of 200 cases differ; first: {failures[0]}"


# ----------------------------------------------------------------------------------------------------------------------
# 2. match_vocabularies
# ----------------------------------------------------------------------------------------------------------------------


def test_match_vocabularies_small():
    student = {"a": 0, "b": 1, "c": 2, "d": 3, "Ġthe": 4}
    teacher = {"c": 0, "x": 1, "a": 2, "z": 3, "Ġthe": 4, "b": 5}
    ms, mt = match_vocabularies(student, teacher)
    assert ms.dtype == torch.long and mt.dtype == torch.long
    # common: c (s2, t0), a (s0, t2), Ġthe (s4, t4), b (s1, t5); ordered by teacher id
    assert ms.tolist() == [2, 0, 4, 1]
    assert mt.tolist() == [0, 2, 4, 5]


def test_match_vocabularies_identical_and_disjoint():
    vocab = {"x": 2, "y": 0, "z": 1}
    ms, mt = match_vocabularies(vocab, dict(vocab))
    assert ms.tolist() == [0, 1, 2] and mt.tolist() == [0, 1, 2]
    ms, mt = match_vocabularies({"a": 0, "b": 1}, {"A": 0, "B": 1})
    assert ms.dtype == torch.long and mt.dtype == torch.long
    assert ms.tolist() == [] and mt.tolist() == []


def test_match_vocabularies_case_and_prefix_sensitive():
    # strings are compared exactly: "Ġa" (byte-level space) is not "▁a" (sentencepiece) nor "a"
    ms, mt = match_vocabularies({"Ġa": 0, "a": 1, "A": 2}, {"▁a": 0, "a": 7, "Ġa": 3})
    assert ms.tolist() == [0, 1] and mt.tolist() == [3, 7]


# ----------------------------------------------------------------------------------------------------------------------
# 3. span_log_probs
# ----------------------------------------------------------------------------------------------------------------------


def _spans_b2_l7():
    return torch.tensor(
        [
            [-1, 0, 1, 1, 1, -1, 2],  # 1-, 3-, 1-token spans
            [-1, 0, 0, -1, 1, 2, 2],  # 2-, 1-, 2-token spans
        ],
        dtype=torch.long,
    )


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_span_log_probs_against_loop(temperature):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 5, generator=g, dtype=torch.float64) * 2
    input_ids = torch.randint(0, 5, (2, 7), generator=g)
    spans = _spans_b2_l7()
    got = span_log_probs(logits, input_ids, spans, temperature=temperature)
    ref = ref_span_log_probs(logits, input_ids, spans, temperature)
    assert tuple(got.shape) == (6, 5)
    assert_close64(got, ref)


def test_span_log_probs_one_token_spans_are_normalised_and_chain_rule_by_hand():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 4, 3, generator=g, dtype=torch.float64)
    input_ids = torch.tensor([[0, 2, 1, 0]])
    spans = torch.tensor([[-1, 0, 1, 1]])
    got = span_log_probs(logits, input_ids, spans)
    l0 = ref_log_softmax(logits[0, 0].tolist())
    l1 = ref_log_softmax(logits[0, 1].tolist())
    l2 = ref_log_softmax(logits[0, 2].tolist())
    # span 0: position 1 predicted from row 0; span 1: positions 2, 3: row 1 distribution + log p(input_ids[3]=0 | row 2)
    assert_close64(got, [l0, [v + l2[0] for v in l1]])
    assert abs(torch.logsumexp(got[0], -1).item()) < ATOL


def test_span_log_probs_row_without_spans():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    input_ids = torch.randint(0, 4, (3, 5), generator=g)
    spans = torch.tensor([[-1, 0, 0, 1, -1], [-1, -1, -1, -1, -1], [-1, 0, 1, 1, 1]])
    got = span_log_probs(logits, input_ids, spans, temperature=0.5)
    ref = ref_span_log_probs(logits, input_ids, spans, 0.5)
    assert tuple(got.shape) == (4, 4)
    assert_close64(got, ref)


# ----------------------------------------------------------------------------------------------------------------------
# 4. sorted_l1 and span_divergence
# ----------------------------------------------------------------------------------------------------------------------


def _rand_probs(g, n, v):
    return torch.softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 2, -1)


def test_sorted_l1_known_value():
    p = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64)
    q = torch.tensor([[0.1, 0.5, 0.0, 0.4]], dtype=torch.float64)
    # sorted: .7 .2 .1 0  vs  .5 .4 .1 0  ->  .2 + .2 + 0 + 0
    assert_close64(sorted_l1(p, q), [0.4])
    assert_close64(sorted_l1(q, p), [0.4])


@pytest.mark.parametrize("vp,vq", [(5, 8), (8, 5), (6, 6)])
def test_sorted_l1_against_loop(vp, vq):
    g = torch.Generator().manual_seed(vp * 10 + vq)
    p = _rand_probs(g, 4, vp)
    q = _rand_probs(g, 4, vq)
    got = sorted_l1(p, q)
    assert tuple(got.shape) == (4,)
    assert_close64(got, [ref_sorted_l1_row(a, b) for a, b in zip(p.tolist(), q.tolist())])


def test_sorted_l1_permutation_invariant_zero():
    g = torch.Generator().manual_seed(3)
    p = _rand_probs(g, 3, 7)
    perm = torch.randperm(7, generator=g)
    assert_close64(sorted_l1(p, p[:, perm]), [0.0, 0.0, 0.0])


def _rand_span_logs(g, n, v):
    """log q: log-softmax rows, some lowered by extra chain-rule terms (unnormalised, as for multi-token spans)."""
    lq = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 1.5, -1)
    extra = torch.log(torch.rand(n, 1, generator=g, dtype=torch.float64) * 0.9 + 0.1)
    extra[0] = 0.0
    return lq + extra


@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.7, 1.3), (0.0, 2.0), (1.5, 0.0)])
def test_span_divergence_partial_match_against_loop(weights):
    g = torch.Generator().manual_seed(4)
    ls = _rand_span_logs(g, 5, 6)
    lt = _rand_span_logs(g, 5, 9)
    ms = torch.tensor([4, 0, 2], dtype=torch.long)
    mt = torch.tensor([1, 3, 7], dtype=torch.long)
    got = span_divergence(ls, lt, ms, mt, matched_weight=weights[0], unmatched_weight=weights[1])
    assert tuple(got.shape) == (5,)
    assert_close64(got, ref_span_divergence(ls, lt, ms.tolist(), mt.tolist(), *weights))


def test_span_divergence_default_weights_are_one():
    g = torch.Generator().manual_seed(5)
    ls = _rand_span_logs(g, 3, 7)
    lt = _rand_span_logs(g, 3, 4)
    ms = torch.tensor([6, 1], dtype=torch.long)
    mt = torch.tensor([0, 2], dtype=torch.long)
    assert_close64(span_divergence(ls, lt, ms, mt), ref_span_divergence(ls, lt, ms.tolist(), mt.tolist()))


def test_span_divergence_full_identical_match_is_kl():
    g = torch.Generator().manual_seed(6)
    zs = torch.randn(4, 6, generator=g, dtype=torch.float64) * 2
    zt = torch.randn(4, 6, generator=g, dtype=torch.float64) * 2
    ls = torch.log_softmax(zs, -1)
    lt = torch.log_softmax(zt, -1)
    idx = torch.arange(6)
    got = span_divergence(ls, lt, idx, idx)
    assert_close64(got, [ref_kl(a, b) for a, b in zip(zt.tolist(), zs.tolist())])


def test_span_divergence_nothing_matched_is_sorted_l1():
    g = torch.Generator().manual_seed(7)
    ls = _rand_span_logs(g, 4, 5)
    lt = _rand_span_logs(g, 4, 8)
    empty = torch.zeros(0, dtype=torch.long)
    got = span_divergence(ls, lt, empty, empty, matched_weight=3.0, unmatched_weight=0.5)
    ref = [0.5 * ref_sorted_l1_row(a, b) for a, b in zip(ls.exp().tolist(), lt.exp().tolist())]
    assert_close64(got, ref)
    assert_close64(got, 0.5 * sorted_l1(ls.exp(), lt.exp()))


def test_span_divergence_one_side_fully_matched():
    g = torch.Generator().manual_seed(8)
    ls = _rand_span_logs(g, 3, 3)
    lt = _rand_span_logs(g, 3, 5)
    ms = torch.tensor([2, 0, 1], dtype=torch.long)  # every student id matched
    mt = torch.tensor([0, 3, 4], dtype=torch.long)
    got_u = span_divergence(ls, lt, ms, mt, matched_weight=0.0)
    assert_close64(got_u, (lt.exp()[:, 1] + lt.exp()[:, 2]).tolist())
    # and the other way round: every teacher id matched -> U is the sum of the student's unmatched mass
    got_u = span_divergence(lt, ls, mt, ms, matched_weight=0.0)
    assert_close64(got_u, (lt.exp()[:, 1] + lt.exp()[:, 2]).tolist())
    got = span_divergence(ls, lt, ms, mt)
    assert_close64(got, ref_span_divergence(ls, lt, ms.tolist(), mt.tolist()))


def test_span_divergence_both_fully_matched_unmatched_term_zero():
    g = torch.Generator().manual_seed(9)
    ls = _rand_span_logs(g, 3, 4)
    lt = _rand_span_logs(g, 3, 4)
    ms = torch.tensor([3, 1, 0, 2], dtype=torch.long)
    mt = torch.tensor([0, 1, 2, 3], dtype=torch.long)
    assert_close64(span_divergence(ls, lt, ms, mt, matched_weight=0.0), [0.0, 0.0, 0.0])
    assert_close64(span_divergence(ls, lt, ms, mt), ref_span_divergence(ls, lt, ms.tolist(), mt.tolist()))


def test_span_divergence_gradcheck_student():
    g = torch.Generator().manual_seed(10)
    ls = _rand_span_logs(g, 3, 6).requires_grad_(True)
    lt = _rand_span_logs(g, 3, 9)
    ms = torch.tensor([4, 0, 2], dtype=torch.long)
    mt = torch.tensor([1, 3, 7], dtype=torch.long)
    assert torch.autograd.gradcheck(
        lambda x: span_divergence(x, lt, ms, mt, matched_weight=0.8, unmatched_weight=1.2), (ls,)
    )


def test_span_divergence_gradient_of_matched_term_by_hand():
    # d M / d log qs(a_i) = qs(a_i) - qt(b_i); unmatched student entries get the sorted-L1 sign times qs
    g = torch.Generator().manual_seed(11)
    ls = _rand_span_logs(g, 1, 4).requires_grad_(True)
    lt = _rand_span_logs(g, 1, 4)
    ms = torch.tensor([0, 2], dtype=torch.long)
    mt = torch.tensor([1, 3], dtype=torch.long)
    span_divergence(ls, lt, ms, mt).sum().backward()
    qs = ls.detach().exp()[0].tolist()
    qt = lt.exp()[0].tolist()
    grad = ls.grad[0].tolist()
    assert abs(grad[0] - (qs[0] - qt[1])) < ATOL
    assert abs(grad[2] - (qs[2] - qt[3])) < ATOL
    # unmatched: student {1, 3} vs teacher {0, 2}, paired by rank
    su = sorted([(qs[1], 1), (qs[3], 3)], reverse=True)
    tu = sorted([qt[0], qt[2]], reverse=True)
    for (v, k), w in zip(su, tu):
        assert abs(grad[k] - math.copysign(1.0, v - w) * v) < ATOL


# ----------------------------------------------------------------------------------------------------------------------
# 5. end to end
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_end_to_end_identical_vocab_one_token_spans_is_forward_kl(temperature):
    B, L, V = 2, 6, 7
    g = torch.Generator().manual_seed(12)
    zs = torch.randn(B, L, V, generator=g, dtype=torch.float64) * 2
    zt = torch.randn(B, L, V, generator=g, dtype=torch.float64) * 2
    input_ids = torch.randint(0, V, (B, L), generator=g)
    # same tokenizer on both sides: BOS, words, and row 1 padded at the end
    offsets = [
        [(0, 0), (0, 3), (3, 5), (5, 9), (9, 10), (10, 14)],
        [(0, 0), (0, 2), (2, 6), (6, 7), (0, 0), (0, 0)],
    ]
    rows_s, rows_t = [], []
    for off in offsets:
        a, b = align_spans(off, list(off))
        rows_s.append(as_int_list(a))
        rows_t.append(as_int_list(b))
    assert rows_s == rows_t == [[-1, 0, 1, 2, 3, 4], [-1, 0, 1, 2, -1, -1]]
    spans = torch.tensor(rows_s, dtype=torch.long)
    vocab = {f"tok{k}": k for k in range(V)}
    ms, mt = match_vocabularies(vocab, dict(vocab))
    lqs = span_log_probs(zs, input_ids, spans, temperature=temperature)
    lqt = span_log_probs(zt, input_ids, spans, temperature=temperature)
    got = temperature**2 * span_divergence(lqs, lqt, ms, mt).sum()

    ref = 0.0
    for b in range(B):
        for p in range(1, L):
            if offsets[b][p][0] < offsets[b][p][1]:
                ref += ref_kl(zt[b, p - 1].tolist(), zs[b, p - 1].tolist(), temperature)
    ref *= temperature**2
    assert_close64(got.reshape(1), [ref])


def test_end_to_end_permuted_vocab_is_forward_kl():
    # same strings, teacher ids a permutation of the student's: matching by string undoes it
    V = 6
    g = torch.Generator().manual_seed(13)
    perm = torch.randperm(V, generator=g).tolist()  # student id k has teacher id perm[k]
    names = [f"w{k}" for k in range(V)]
    s_vocab = {names[k]: k for k in range(V)}
    t_vocab = {names[k]: perm[k] for k in range(V)}
    ms, mt = match_vocabularies(s_vocab, t_vocab)
    assert mt.tolist() == list(range(V))
    assert [perm[k] for k in ms.tolist()] == mt.tolist()
    zs = torch.randn(3, V, generator=g, dtype=torch.float64)
    zt_student_order = torch.randn(3, V, generator=g, dtype=torch.float64)
    zt = torch.empty_like(zt_student_order)
    for k in range(V):
        zt[:, perm[k]] = zt_student_order[:, k]
    got = span_divergence(torch.log_softmax(zs, -1), torch.log_softmax(zt, -1), ms, mt)
    assert_close64(got, [ref_kl(a, b) for a, b in zip(zt_student_order.tolist(), zs.tolist())])


# ----------------------------------------------------------------------------------------------------------------------
# precision: float64 in, float64 out (the 1e-10 references above need it; a float32 cast loses ~1e-7 relative)
# ----------------------------------------------------------------------------------------------------------------------


def test_span_log_probs_keeps_float64():
    g = torch.Generator().manual_seed(14)
    logits = torch.randn(2, 7, 5, generator=g, dtype=torch.float64)
    input_ids = torch.randint(0, 5, (2, 7), generator=g)
    got = span_log_probs(logits, input_ids, _spans_b2_l7(), temperature=2.0)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(
        got.numpy(), ref_span_log_probs(logits, input_ids, _spans_b2_l7(), 2.0), rtol=0, atol=ATOL
    )


def test_sorted_l1_and_span_divergence_keep_float64():
    g = torch.Generator().manual_seed(15)
    ls = _rand_span_logs(g, 3, 6)
    lt = _rand_span_logs(g, 3, 9)
    ms = torch.tensor([4, 0, 2], dtype=torch.long)
    mt = torch.tensor([1, 3, 7], dtype=torch.long)
    assert sorted_l1(ls.exp(), lt.exp()).dtype == torch.float64
    assert span_divergence(ls, lt, ms, mt).dtype == torch.float64
