import math

import pytest
import torch
import torch.nn.functional as F

from sharding.kernels import native
from trainer.likelihood import Bernoulli, FactRows
from trainer.objective import (
    bernoulli_negative_weight,
    bernoulli_nll,
    chunk_negatives,
    kl_share,
    local_log_partition,
    negative_weights,
    position_weights,
    positioned_bernoulli_nll,
    positioned_bernoulli_rows,
    softmax_nll,
)
from trainer.posterior import Gathered
from trainer.scorers import ComplEx, DistMult, Scorer


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_bernoulli_weights_on_a_hand_computed_case():
    # One-dimensional DistMult: score = s * r * o.  Three positives, chunks of 2 (the last chunk is
    # half padding), k = 2 negatives per positive: one corrupts the head, one the tail.
    s = torch.tensor([[1.0], [2.0], [-1.0]])
    r = torch.tensor([[0.5], [1.0], [2.0]])
    o = torch.tensor([[2.0], [-1.0], [1.0]])
    neg = torch.tensor([[[3.0], [0.5]], [[-2.0], [1.5]]])  # [chunks=2, k=2, D=1]: [head, tail] per chunk
    w = 7.0
    got = bernoulli_nll(DistMult(), s, r, o, neg, chunk=2, negative_weight=w).item()

    positives = softplus(-1.0) + softplus(2.0) + softplus(2.0)  # -log sigmoid(x) = softplus(-x), x = 1, -2, -2
    negatives = (
        softplus(3.0 * 0.5 * 2.0)
        + softplus(1.0 * 0.5 * 0.5)  # positive 0, chunk 0
        + softplus(3.0 * 1.0 * -1.0)
        + softplus(2.0 * 1.0 * 0.5)  # positive 1, chunk 0
        + softplus(-2.0 * 2.0 * 1.0)
        + softplus(-1.0 * 2.0 * 1.5)  # positive 2, chunk 1 (padding ignored)
    )
    assert got == pytest.approx(positives + w * negatives, rel=1e-6)


def test_position_weights_follow_the_authors_interleaved_layout():
    # B = 3 positives, k = 1: rows p0 n0 p1 | n1 p2 n2. The first B = 3 rows weigh 1, the rest w.
    positive, negative = position_weights(3, 1, 50.0)
    assert positive.tolist() == [1.0, 1.0, 50.0]
    assert negative.tolist() == [[1.0], [50.0], [50.0]]
    # k = 2, B = 4: p0 n n p1 | n n p2 n n p3 n n
    positive, negative = position_weights(4, 2, 9.0)
    assert positive.tolist() == [1.0, 1.0, 9.0, 9.0]
    assert negative.tolist() == [[1.0, 1.0], [9.0, 9.0], [9.0, 9.0], [9.0, 9.0]]


def test_relation_bias_and_positive_weights_on_the_hand_computed_case():
    # The hand-computed case below with weights (1, 2, 0.5) on the positives and a bias per positive.
    s = torch.tensor([[1.0], [2.0], [-1.0]])
    r = torch.tensor([[0.5], [1.0], [2.0]])
    o = torch.tensor([[2.0], [-1.0], [1.0]])
    neg = torch.tensor([[[3.0], [0.5]], [[-2.0], [1.5]]])
    bias, weights, w = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.0, 2.0, 0.5]), 7.0
    got = bernoulli_nll(
        DistMult(), s, r, o, neg, chunk=2, negative_weight=w, positive_weight_B=weights, bias_B=bias
    ).item()
    positives = softplus(-1.5) + 2 * softplus(3.0) + 0.5 * softplus(0.0)  # scores 1 + 0.5, -2 - 1, -2 + 2
    negatives = (
        softplus(3.0 + 0.5) + softplus(0.25 + 0.5) + softplus(-3.0 - 1.0) + softplus(1.0 - 1.0)
        + softplus(-4.0 + 2.0) + softplus(-3.0 + 2.0)
    )  # fmt: skip
    assert got == pytest.approx(positives + w * negatives, rel=1e-6)


def test_excluded_negatives_leave_the_data_term():
    # The hand-computed case above, with positive 1's tail corruption and positive 2's head corruption
    # marked as their own positive: those two terms drop out.
    s = torch.tensor([[1.0], [2.0], [-1.0]])
    r = torch.tensor([[0.5], [1.0], [2.0]])
    o = torch.tensor([[2.0], [-1.0], [1.0]])
    neg = torch.tensor([[[3.0], [0.5]], [[-2.0], [1.5]]])
    keep = torch.tensor([[[True, True], [True, False]], [[False, True], [True, True]]])  # [C, chunk, k]
    w = 7.0
    got = bernoulli_nll(DistMult(), s, r, o, neg, chunk=2, negative_weight=w, keep_CBK=keep).item()
    positives = softplus(-1.0) + softplus(2.0) + softplus(2.0)
    negatives = softplus(3.0) + softplus(0.25) + softplus(-3.0) + softplus(-3.0)
    assert got == pytest.approx(positives + w * negatives, rel=1e-6)


def test_self_adversarial_weights_split_the_uniform_total_by_softmax():
    scores = torch.tensor([[[1.0, 2.0, -1.0], [0.0, 0.0, 5.0]]])  # [C=1, B=2, H=3]
    keep = torch.tensor([[[True, True, True], [True, False, False]]])
    w = negative_weights(scores, None, 2.0, 0.5)
    expected = torch.softmax(scores * 0.5, -1) * 3 * 2.0
    torch.testing.assert_close(w, expected)
    w = negative_weights(scores, keep, 2.0, 0.5)
    torch.testing.assert_close(w[0, 0], expected[0, 0])
    torch.testing.assert_close(w[0, 1], torch.tensor([2.0, 0.0, 0.0]))  # one kept: it carries 1 x weight
    none_kept = negative_weights(scores, torch.zeros_like(keep), 2.0, 0.5)
    assert torch.equal(none_kept, torch.zeros_like(scores))
    assert negative_weights(scores, None, 2.0, 0.0) == 2.0


def test_negative_weight_is_the_inverse_sampling_rate():
    # 2 (Ne - 1) corruptions per positive, k drawn: 1/b- = |D-| / |D+| per sample
    assert bernoulli_negative_weight(num_entities=11, num_negatives=4) == pytest.approx(5.0)
    assert bernoulli_negative_weight(num_entities=2, num_negatives=2) == pytest.approx(1.0)


def test_every_positive_gets_exactly_k_real_corruptions():
    negatives = chunk_negatives(1000, 256, 8, 50, torch.Generator().manual_seed(0))
    assert negatives.shape == (4, 8)  # ceil(1000/256) chunks, all k slots drawn, no (0,0,0) fillers
    assert negatives.min() >= 0 and negatives.max() < 50


@pytest.mark.parametrize("num_batches", [1, 3, 10, 2000])
@pytest.mark.parametrize("schedule", ["uniform", "compression"])
def test_kl_shares_sum_to_one_per_epoch(schedule, num_batches):
    shares = [kl_share(i, num_batches, schedule) for i in range(num_batches)]
    assert sum(shares) == pytest.approx(1.0)
    assert all(s >= 0 for s in shares)


def test_compression_cost_values():
    assert [kl_share(i, 3, "compression") for i in range(3)] == pytest.approx([4 / 7, 2 / 7, 1 / 7])


def test_softmax_nll_is_cross_entropy_over_all_entities():
    entities = torch.tensor([[1.0], [2.0], [-1.0]])
    s, r = entities[[0]], torch.tensor([[1.0]])
    logits = [1.0, 2.0, -1.0]
    expected = -(logits[1] - math.log(sum(math.exp(x) for x in logits)))
    got = softmax_nll(DistMult(), s, r, entities[[1]], entities).item()
    assert got == pytest.approx(expected, rel=1e-6)


def test_softmax_nll_splits_over_candidate_shards():
    """Two shards of candidates, log Z assembled from per-shard max and sum of exponentials."""
    g = torch.Generator().manual_seed(0)
    entities = torch.randn(7, 4, generator=g)
    s, r = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    targets = entities[[0, 4, 6]]
    whole = softmax_nll(DistMult(), s, r, targets, entities)
    shards = (entities[:3], entities[3:])

    def two_shard_log_z(scorer, s_BD, r_BD, _local_candidates):
        logits = [scorer.score_tails(s_BD, r_BD, shard) for shard in shards]
        top = torch.stack([x.max(-1).values for x in logits]).max(0).values
        return top + torch.log(sum((x - top.unsqueeze(-1)).exp().sum(-1) for x in logits))

    sharded = softmax_nll(DistMult(), s, r, targets, shards[0], log_z=two_shard_log_z)
    torch.testing.assert_close(sharded, whole)


def test_local_log_partition_matches_logsumexp_and_its_gradient():
    logits = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(local_log_partition(logits), torch.logsumexp(logits, -1))
    assert torch.autograd.gradcheck(local_log_partition, (logits,))


@pytest.mark.parametrize("scorer", [DistMult(), ComplEx()], ids=["distmult", "complex"])
@pytest.mark.parametrize("num_pos", [8, 5])  # 5: the second chunk is partly padding
@pytest.mark.parametrize(
    ("exclude", "temperature", "extras"),
    [(False, 0.0, False), (True, 0.0, False), (True, 1.5, False), (False, 0.0, True), (True, 1.5, True)],
)
def test_bilinear_bernoulli_backward_matches_autograd_of_the_scores(scorer, num_pos, exclude, temperature, extras):
    """The written backward of the bilinear path against autograd through the generic scorer path; ``extras``:
    with positive weights and relation biases."""
    g = torch.Generator().manual_seed(0)
    s, r, o = (torch.randn(num_pos, 6, generator=g, dtype=torch.float64) for _ in range(3))
    neg = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)  # k = 3: one head and two tail corruptions
    keep = torch.rand(2, 4, 3, generator=g) > 0.3 if exclude else None
    positive_weight = torch.rand(num_pos, generator=g, dtype=torch.float64) * 4 if extras else None
    bias = torch.randn(num_pos, generator=g, dtype=torch.float64) if extras else None

    def loss(scorer_used, *tensors):
        s_, r_, o_, neg_, *rest = tensors
        return bernoulli_nll(
            scorer_used, s_, r_, o_, neg_, chunk=4, negative_weight=3.0, keep_CBK=keep,
            adversarial_temperature=temperature, positive_weight_B=positive_weight, bias_B=rest[0] if rest else None,
        )  # fmt: skip

    generic = Scorer.__new__(type("Generic", (Scorer,), {"score": scorer.score}))  # not bilinear: autograd
    tensors = (s, r, o, neg) if bias is None else (s, r, o, neg, bias)
    fused_inputs = [t.clone().requires_grad_(True) for t in tensors]
    plain_inputs = [t.clone().requires_grad_(True) for t in tensors]
    fused, plain = loss(scorer, *fused_inputs), loss(generic, *plain_inputs)
    fused.backward()
    plain.backward()
    torch.testing.assert_close(fused, plain)
    for a, b in zip(fused_inputs, plain_inputs, strict=True):
        torch.testing.assert_close(a.grad, b.grad)
    if temperature == 0:  # self-adversarial weights are constants to the gradient, not to finite differences
        assert torch.autograd.gradcheck(lambda *t: loss(scorer, *t), tuple(fused_inputs))


class _OffsetDistMult(DistMult):
    """A bilinear scorer whose queries are not zero at zero embeddings, so zero padding scores."""

    def tail_query(self, s, r):
        return s * r + 1.0

    def head_query(self, r, o):
        return r * o + 1.0


def test_bilinear_bernoulli_padding_carries_no_gradient():
    g = torch.Generator().manual_seed(1)
    s, r, o = (torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    neg = torch.randn(2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    scorer, w = _OffsetDistMult(), 3.0
    bernoulli_nll(scorer, s, r, o, neg, chunk=4, negative_weight=w).backward()

    # Reference: the same loss written fact by fact, without padding.
    ref = [t.detach().clone().requires_grad_(True) for t in (s, r, o, neg)]
    total = 0.0
    for i in range(5):
        chunk_neg = ref[3][i // 4]
        q_tail, q_head = scorer.tail_query(ref[0][i], ref[1][i]), scorer.head_query(ref[1][i], ref[2][i])
        total = total + F.softplus(-(q_tail * ref[2][i]).sum())
        total = total + w * (F.softplus(chunk_neg[2:] @ q_tail).sum() + F.softplus(chunk_neg[:2] @ q_head).sum())
    total.backward()
    for got, want in zip((s, r, o, neg), ref, strict=True):
        torch.testing.assert_close(got.grad, want.grad)


def _bernoulli_case(scorer, num_pos, chunk, num_neg, bias, scale=1.0, dim=16, seed=0):
    """float64 inputs of ``bernoulli_nll``: s, r, o [num_pos, dim], neg [C, num_neg, dim] and a bias or None."""
    g = torch.Generator().manual_seed(seed)
    s, r, o = (torch.randn(num_pos, dim, generator=g, dtype=torch.float64) * scale for _ in range(3))
    neg = torch.randn(-(-num_pos // chunk), num_neg, dim, generator=g, dtype=torch.float64) * scale
    return [s, r, o, neg, torch.randn(num_pos, generator=g, dtype=torch.float64) if bias else None]


def _loss_and_grads(scorer, tensors, chunk, dtype):
    """The loss and the gradients of s, r, o, neg (and the bias): float32 through the compiled kernel where it
    takes the scorer (the rows as one table read by position, each fact its own relation row), else and in
    float64 through the torch ops."""
    inputs = [t.to(dtype, copy=True).requires_grad_(True) if t is not None else None for t in tensors]
    s, r, o, neg, bias = inputs
    loss = None
    if dtype == torch.float32:
        num_pos, dim = s.shape
        entities = torch.cat([s, o, neg.reshape(-1, dim)])
        index, relation_ids = torch.arange(len(entities)), torch.arange(num_pos)
        rows = positioned_bernoulli_rows(scorer, entities, index, r, relation_ids, neg.shape[1], chunk, bias)
        loss = positioned_bernoulli_nll(rows, 37.5) if rows is not None else None
    if loss is None:
        loss = bernoulli_nll(scorer, s, r, o, neg, chunk=chunk, negative_weight=37.5, bias_B=bias)
    loss.backward()
    return loss, [t.grad for t in inputs if t is not None]


@pytest.mark.parametrize("scorer", [DistMult(), ComplEx()], ids=["distmult", "complex"])
@pytest.mark.parametrize(
    ("num_pos", "chunk", "num_neg", "bias", "threads", "dim"),
    [
        (1000, 32, 32, False, 2, 16),
        (1024, 256, 32, True, 2, 128),
        (1000, 32, 7, True, 1, 16),
        (7, 5, 1, False, 1, 16),
        (3, 8, 2, True, 2, 16),
        (37, 32, 64, True, 2, 22),
        (70, 24, 10, False, 1, 64),
        (64, 32, 40, True, 2, 16),
    ],
)
def test_compiled_bernoulli_matches_the_torch_path(scorer, num_pos, chunk, num_neg, bias, threads, dim):
    """float32 on the CPU takes the compiled kernel (bilinear.c); float64 takes the torch ops. Padded last
    chunks, an odd k (more tail than head corruptions), a relation bias, one thread and two; widths whose
    products take the kernel's tiles of two vectors, of one, and single columns: D = 22 (16 + 6) in the
    backward's, k/2 = 20 (16 + 4) negatives a side in the forward's."""
    assert native.library() is not None, "the C kernels did not build (is cc installed?)"
    tensors = _bernoulli_case(scorer, num_pos, chunk, num_neg, bias, dim=dim)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        loss, grads = _loss_and_grads(scorer, tensors, chunk, torch.float32)
    finally:
        torch.set_num_threads(before)
    assert type(loss.grad_fn).__name__ == "_PositionedBernoulliBackward"
    want_loss, want_grads = _loss_and_grads(scorer, tensors, chunk, torch.float64)
    assert type(want_loss.grad_fn).__name__ != "_PositionedBernoulliBackward"
    torch.testing.assert_close(loss.double(), want_loss, rtol=2e-5, atol=1e-4)
    for got, want in zip(grads, want_grads, strict=True):
        # float32 sums of terms up to the largest gradient: a small element may be off by its rounding.
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=max(1e-4, 1e-6 * want.abs().max().item()))


def test_compiled_bernoulli_is_exact_at_large_scores_and_keeps_a_nan():
    """Scores of tens either way (softplus near x and near 0) to the torch path's float32; a NaN input makes
    the loss and the gradients NaN, which the training step stops on."""
    tensors = _bernoulli_case(ComplEx(), 64, 16, 8, True, scale=2.5)
    loss, grads = _loss_and_grads(ComplEx(), tensors, 16, torch.float32)
    assert type(loss.grad_fn).__name__ == "_PositionedBernoulliBackward"
    want_loss, want_grads = _loss_and_grads(ComplEx(), tensors, 16, torch.float64)
    assert abs(want_loss.item()) > 1e4  # the scores reach tens
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-3)
    for got, want in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3)
    tensors[0][3, 5] = math.nan
    loss, grads = _loss_and_grads(ComplEx(), tensors, 16, torch.float32)
    assert math.isnan(loss.item()) and all(torch.isnan(g).any() for g in grads)


def test_a_subclass_of_a_compiled_scorer_is_scored_by_its_own_queries():
    """The kernel takes DistMult and ComplEx themselves; a subclass that scores otherwise gets the torch path."""
    tensors = _bernoulli_case(DistMult(), 5, 4, 4, False)
    loss, _ = _loss_and_grads(_OffsetDistMult(), tensors, 4, torch.float32)
    want, _ = _loss_and_grads(_OffsetDistMult(), tensors, 4, torch.float64)
    assert type(loss.grad_fn).__name__ != "_PositionedBernoulliBackward"
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-4)


def test_compiled_log_partition_matches_logsumexp_and_its_gradient():
    """float32 on the CPU takes the compiled kernels (partition.c); float64 above takes torch ops."""
    assert native.library() is not None, "the C kernels did not build (is cc installed?)"
    g = torch.Generator().manual_seed(4)
    start = torch.randn(64, 3000, generator=g) * 8  # 192,000 logits: split over the threads
    start[3] += 80.0  # a row far from zero
    weights = torch.randn(64, generator=g)
    ours, reference = start.clone().requires_grad_(True), start.clone().requires_grad_(True)
    log_z = local_log_partition(ours)
    (log_z * weights).sum().backward()
    expected = torch.logsumexp(reference, -1)
    (expected * weights).sum().backward()
    torch.testing.assert_close(log_z, expected, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ours.grad, reference.grad, rtol=1e-5, atol=1e-7)


def test_compiled_log_partition_keeps_a_nan_and_takes_empty_shards():
    logits = torch.zeros(2, 5)
    logits[1, 2] = float("nan")
    log_z = native.row_sum_exp(logits, torch.zeros(2)).log()
    assert log_z[0].item() == pytest.approx(math.log(5)) and math.isnan(log_z[1].item())
    assert torch.equal(native.row_sum_exp(torch.empty(3, 0), torch.zeros(3)), torch.zeros(3))


def test_sampled_softmax_with_every_other_entity_once_is_the_exact_softmax():
    """Candidates = every entity but the answer, each drawn once (log Q = 0): the estimate of log Z is exact."""
    from trainer.objective import sampled_softmax_nll

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)  # 3 chunks, 5 queries, 7 entities
    answers = torch.randint(7, (3, 5), generator=g)
    exact = -torch.log_softmax(logits, -1).gather(-1, answers.unsqueeze(-1)).squeeze(-1)
    pos = logits.gather(-1, answers.unsqueeze(-1)).squeeze(-1)
    hit = torch.arange(7).view(1, 1, 7) == answers.unsqueeze(-1)  # the answer itself is not a negative
    nll = sampled_softmax_nll(pos, logits, torch.zeros(3, 7, dtype=torch.float64), hit)
    torch.testing.assert_close(nll, exact)


def test_sampled_softmax_log_q_corrects_for_repeated_draws():
    """A candidate drawn twice with expected count 2 contributes as much as one drawn once with count 1."""
    from trainer.objective import sampled_softmax_nll

    pos = torch.tensor([[0.5]])
    once = sampled_softmax_nll(
        pos, torch.tensor([[[1.0, 2.0]]]), torch.zeros(1, 2), torch.zeros(1, 1, 2, dtype=torch.bool)
    )
    twice = sampled_softmax_nll(
        pos, torch.tensor([[[1.0, 1.0, 2.0]]]), torch.log(torch.tensor([[2.0, 2.0, 1.0]])),
        torch.zeros(1, 1, 3, dtype=torch.bool),
    )  # fmt: skip
    torch.testing.assert_close(once, twice)


def test_sampled_softmax_step_masks_padding_and_accidental_hits(tiny_dataset):
    """A batch shorter than a chunk (padding) and negatives equal to the answers give a finite loss whose
    gradient reaches only the batch's rows."""
    from tests.trainer.conftest import TINY_TRAIN, make_config
    from trainer.model import build_model

    config = make_config(
        "objective.likelihood=sampled_softmax", "objective.kl_estimator=per_occurrence", "objective.num_negatives=4",
        "objective.negative_chunk=8",
    )  # fmt: skip
    model = build_model(config, tiny_dataset.num_entities, tiny_dataset.num_relations,
                        entity_frequency=tiny_dataset.entity_frequency)  # fmt: skip
    assert model.reciprocal and model.relations.num_rows == 2 * tiny_dataset.num_relations
    forward = model.forward([(0, TINY_TRAIN[:3])], 1.0, (0, 0, 0))
    assert torch.isfinite(forward.nll) and forward.nll > 0
    forward.nll.backward()
    assert torch.isfinite(model.gradient_sum(forward))
    for bad in (float("nan"), float("inf")):  # one element of one leaf spoils the sum
        grad = forward.encoded[0].values.grad
        saved, grad[0, 0] = grad[0, 0].item(), bad
        assert not torch.isfinite(model.gradient_sum(forward))
        grad[0, 0] = saved


def test_sampled_softmax_of_a_padded_chunk_matches_a_direct_computation():
    """Padding neither scores nor serves as a candidate, a candidate equal to the query's answer is left
    out, and every candidate is corrected by its expected count under uniform + in-batch draws."""
    from trainer.likelihood import FactRows, SampledSoftmax

    g = torch.Generator().manual_seed(0)
    n, nr, d, k, chunk = 6, 2, 4, 2, 4
    ent, rel = (
        torch.randn(n, d, generator=g, dtype=torch.float64),
        torch.randn(2 * nr, d, generator=g, dtype=torch.float64),
    )
    facts = torch.tensor([[0, 0, 1], [2, 1, 3], [4, 0, 1]])  # 3 facts in a chunk of 4: one padding row
    neg_ids = torch.tensor([[1, 5]])  # entity 1 is the answer of two tail queries
    likelihood = SampledSoftmax(
        num_relations=nr, entity_frequency=torch.full((n,), 2.0), in_batch=True, num_negatives=k, chunk=chunk,
        num_entities=n, source="global", shard=(0, n), device=torch.device("cpu"),
    )  # fmt: skip
    gathered = Gathered.of(facts, neg_ids)
    rows = FactRows(ent[gathered.ids], gathered, rel, facts)
    got = likelihood.nll(DistMult(), rows, rel, None)

    candidates = [1, 5, *facts[:, 2].tolist(), *facts[:, 0].tolist()]
    rate = chunk * 2.0 / (n * 2.0 / 2)  # expected in-batch draws of an entity of frequency 2
    expected = torch.zeros((), dtype=torch.float64)
    for h, r, t in facts.tolist():
        for query, relation, answer in ((h, r, t), (t, r + nr, h)):
            q = ent[query] * rel[relation]
            positive = (q * ent[answer]).sum()
            terms = [positive] + [(q * ent[c]).sum() - math.log(k / n + rate) for c in candidates if c != answer]
            expected = expected + torch.logsumexp(torch.stack(terms), 0) - positive
    torch.testing.assert_close(got, expected)


def test_bernoulli_keeps_every_negative_but_the_positives_own_entities():
    bernoulli = Bernoulli(
        negative_weight=1.0, exclude_positives=True, num_negatives=4, chunk=2, num_entities=10,
        source="global", shard=(0, 10), device=torch.device("cpu"),
    )  # fmt: skip
    positives = torch.tensor([[1, 0, 2], [3, 0, 4], [5, 1, 6]])
    negative_ids = torch.tensor([[1, 3, 4, 9], [5, 0, 6, 6]])  # [C=2, k=4]: two heads, then two tails
    facts = FactRows(torch.empty(0), Gathered.of(positives, negative_ids), torch.empty(0), positives)
    keep = bernoulli._keep(facts)
    expected = torch.tensor(
        [
            [[False, True, True, True], [True, False, False, True]],  # head 1 is fact 0's; tail 4 is fact 1's
            [[False, True, False, False], [True, True, True, True]],  # fact 2: head 5, tail 6 twice; padding
        ]
    )
    assert torch.equal(keep, expected)


def _positioned_case(num_pos, chunk, num_neg, bias, dim, seed=0):
    """Entity rows as a column range of a wider table [U, dim + 3] (as the owners' packed samples are), the
    positions of s, o and the negatives among them (with repeats), relation rows and ids, a bias or None."""
    g = torch.Generator().manual_seed(seed)
    num_rows, num_rel = max(3, num_pos // 2), 5
    positions = 2 * num_pos + -(-num_pos // chunk) * num_neg
    table = torch.randn(num_rows, dim + 3, generator=g, dtype=torch.float64)
    index = torch.randint(0, num_rows, (positions,), generator=g)
    relations = torch.randn(num_rel, dim, generator=g, dtype=torch.float64)
    facts = torch.stack(
        [index[:num_pos], torch.randint(0, num_rel, (num_pos,), generator=g), index[num_pos : 2 * num_pos]], 1
    )
    return table, index, relations, facts, torch.randn(num_pos, generator=g, dtype=torch.float64) if bias else None


def _positioned_loss_and_grads(scorer, case, dim, chunk, num_neg, dtype, positioned=True):
    table, index, relations, facts, bias = (
        t.to(dtype, copy=True) if t is not None and t.is_floating_point() else t for t in case
    )
    table.requires_grad_(True), relations.requires_grad_(True)
    bias = bias.requires_grad_(True) if bias is not None else None
    entities, num_pos = table[:, :dim], len(facts)
    if positioned:
        rows = positioned_bernoulli_rows(scorer, entities, index, relations, facts[:, 1], num_neg, chunk, bias)
        assert rows is not None
        loss = positioned_bernoulli_nll(rows, 37.5)
    else:
        rows = entities[index]
        neg = rows[2 * num_pos :].view(-1, num_neg, dim)
        loss = bernoulli_nll(scorer, rows[:num_pos], relations[facts[:, 1]], rows[num_pos : 2 * num_pos], neg,
                             chunk=chunk, negative_weight=37.5, bias_B=bias)  # fmt: skip
    loss.backward()
    return loss, [t.grad for t in (table, relations, bias) if t is not None]


@pytest.mark.parametrize("scorer", [DistMult(), ComplEx()], ids=["distmult", "complex"])
@pytest.mark.parametrize(
    ("num_pos", "chunk", "num_neg", "bias", "dim"),
    [(1000, 32, 32, False, 16), (1024, 256, 32, True, 128), (37, 32, 64, True, 22), (7, 5, 3, False, 16)],
)
def test_positioned_bernoulli_matches_gathering_then_the_torch_path(scorer, num_pos, chunk, num_neg, bias, dim):
    """The kernel that reads the rows by position (float32) against gathering them and the torch ops
    (float64): the loss, the table's gradient (each position's summed into its row, none outside the
    entity columns), the relations' and the bias'; bit for bit the same on one thread and on two."""
    assert native.library() is not None, "the C kernels did not build (is cc installed?)"
    case = _positioned_case(num_pos, chunk, num_neg, bias, dim)
    before, results = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(_positioned_loss_and_grads(scorer, case, dim, chunk, num_neg, torch.float32))
    finally:
        torch.set_num_threads(before)
    (loss, grads), (loss_2, grads_2) = results
    assert type(loss.grad_fn).__name__ == "_PositionedBernoulliBackward"
    assert torch.equal(loss, loss_2) and all(torch.equal(a, b) for a, b in zip(grads, grads_2, strict=True))
    want_loss, want_grads = _positioned_loss_and_grads(scorer, case, dim, chunk, num_neg, torch.float64, False)
    torch.testing.assert_close(loss.double(), want_loss, rtol=2e-5, atol=1e-4)
    assert not grads[0][:, dim:].any()
    for got, want in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=max(1e-4, 1e-6 * want.abs().max().item()))


def test_bernoulli_backward_writes_the_entity_gradient_into_wider_rows():
    """``out`` [U, D + 1]: the same gradient in its first D columns, the last column left as it was; an
    ``out`` of the wrong shape is refused."""
    table, index, relations, facts, bias = (
        t.float() if t is not None and t.is_floating_point() else t for t in _positioned_case(37, 8, 6, True, 16)
    )
    rows = native.BernoulliRows(table[:, :16], index, relations, facts[:, 1].contiguous(), bias, 8, 6, True)
    _, probs = native.bernoulli_forward(rows, 2.0)
    want = native.bernoulli_backward(rows, probs, 2.0, 1.5)
    out = torch.full((len(table), 17), 7.0)
    got = native.bernoulli_backward(rows, probs, 2.0, 1.5, out)
    assert got[0] is out and torch.equal(out[:, :16], want[0])
    assert torch.equal(out[:, 16], torch.full((len(table),), 7.0))
    assert torch.equal(got[1], want[1]) and got[2] is not None and want[2] is not None and torch.equal(got[2], want[2])
    for wrong in (torch.zeros(len(table) - 1, 17), torch.zeros(len(table), 15), torch.zeros(len(table), 17).double()):
        with pytest.raises(ValueError, match="cannot take"):
            native.bernoulli_backward(rows, probs, 2.0, 1.5, wrong)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_bernoulli_forward_backward_is_the_two_calls_bit_for_bit(bias, threads):
    """One pass over the chunks, each chunk's backward right after its forward: the same NLL and gradients
    as ``bernoulli_forward`` then ``bernoulli_backward`` (a padded last chunk, an odd k)."""
    table, index, relations, facts, bias_ = (
        t.float() if t is not None and t.is_floating_point() else t for t in _positioned_case(1000, 32, 33, bias, 32)
    )
    rows = native.BernoulliRows(table[:, :32], index, relations, facts[:, 1].contiguous(), bias_, 32, 33, True)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        chunk_nll, probs = native.bernoulli_forward(rows, 3.0)
        want = native.bernoulli_backward(rows, probs, 3.0, 1.0)
        got_nll, *got = native.bernoulli_forward_backward(rows, 3.0)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got_nll, chunk_nll)
    for a, b in zip(got, want, strict=True):
        assert (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
    with pytest.raises(ValueError, match="cannot take"):
        native.bernoulli_forward_backward(
            native.BernoulliRows(table[:, :32], index[:-1], relations, facts[:, 1].contiguous(), bias_, 32, 33, True),
            3.0,
        )


@pytest.mark.parametrize("threads", [1, 2])
def test_bernoulli_check_says_whether_every_gradient_written_is_finite(threads):
    """``check`` is 0 for finite gradients, and NaN where one is not: a gradient that overflows while every
    score (and so the loss) stays finite, an entity row or a relation row that holds a NaN; the gradients
    are the same with the check as without it."""
    table, index, relations, facts, _ = (
        t.float() if t is not None and t.is_floating_point() else t for t in _positioned_case(200, 16, 8, False, 16)
    )

    def run(entities: torch.Tensor, rels: torch.Tensor) -> tuple[float, torch.Tensor]:
        rows = native.BernoulliRows(entities, index, rels, facts[:, 1].contiguous(), None, 16, 8, True)
        check = torch.full((1,), 5.0)
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            chunk_nll, g_entities, g_relations, _ = native.bernoulli_forward_backward(rows, 2.0, None, check)
            _, *plain = native.bernoulli_forward_backward(rows, 2.0)
        finally:
            torch.set_num_threads(before)
        for got, want in ((g_entities, plain[0]), (g_relations, plain[1])):
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
        return check.item(), chunk_nll

    entities = table[:, :16].contiguous()
    assert run(entities, relations)[0] == 0.0
    # Every relation zero in the first complex number, every entity 3e38 there: each score adds 0 * 3e38,
    # while the queries' gradients sum the negatives' 3e38 times their sigmoids and the weight 2 past the
    # float range.
    huge_entities, zeroed = entities.clone(), relations.clone()
    huge_entities[:, 0], zeroed[:, :2] = 3e38, 0.0
    check, chunk_nll = run(huge_entities, zeroed)
    assert math.isnan(check) and torch.isfinite(chunk_nll).all()
    nan_entities, nan_relations = entities.clone(), relations.clone()
    nan_entities[3, 5] = nan_relations[3, 5] = float("nan")
    assert math.isnan(run(nan_entities, relations)[0]) and math.isnan(run(entities, nan_relations)[0])
    # One negative row's gradient alone: a chunk of 64 facts (s, r, o) whose tail queries s * r are 1e38
    # in their first number, against one tiny negative (1e-30 there): its gradient sums 64 queries past the
    # float range while every score (1e8 at most), the loss and the relations' gradient stay finite.
    ents = torch.zeros(3, 4)
    ents[0, 0], ents[1, 0], ents[2, 0] = 1e19, 1e-30, 1e-30  # s, o, the negative
    rels = torch.zeros(1, 4)
    rels[0, 0] = 1e19
    lone = native.BernoulliRows(
        ents, torch.tensor([0] * 64 + [1] * 64 + [2, 2]), rels, torch.zeros(64, dtype=torch.int64), None, 64, 2, True
    )
    check = torch.zeros(1)
    chunk_nll, g_entities, g_relations, _ = native.bernoulli_forward_backward(lone, 1.0, None, check)
    assert torch.isfinite(chunk_nll).all() and torch.isfinite(g_relations).all()
    assert not torch.isfinite(g_entities[2]).all() and torch.isfinite(g_entities[:2]).all()
    assert math.isnan(check.item())
    with pytest.raises(ValueError, match="one float32 element"):
        native.bernoulli_forward_backward(
            native.BernoulliRows(entities, index, relations, facts[:, 1].contiguous(), None, 16, 8, True),
            2.0, None, torch.zeros(2),
        )  # fmt: skip


def test_positioned_bernoulli_takes_only_what_fits_and_checks_its_positions():
    table, index, relations, facts, bias = (
        t.float() if t is not None and t.is_floating_point() else t for t in _positioned_case(10, 4, 6, True, 16)
    )
    entities, r = table[:, :16], facts[:, 1]
    assert native.BernoulliRows(entities, index, relations, r.contiguous(), bias, 4, 6, True).fits()
    misfits = [
        (entities, index[:-1], relations, r, bias, 4, 6),  # one position short
        (entities, index, relations, r, bias, 5, 6),  # 2 chunks, not 3
        (table[:, :15], index, relations[:, :15], r, bias, 4, 6),  # odd D for ComplEx
        (entities, index, relations[:, :8], r, bias, 4, 6),  # widths differ
        (entities.double(), index, relations, r, bias, 4, 6),
        (entities, index.int(), relations, r, bias, 4, 6),
        (table[:, :32:2], index, relations, r, bias, 4, 6),  # a row's elements not adjacent
        (entities, index, relations, r, torch.stack([bias, bias], 1)[:, 0], 4, 6),  # a strided bias
        (entities, index, relations, r, bias, 0, 6),
    ]
    for entities_, index_, relations_, r_, bias_, chunk, num_neg in misfits:
        assert positioned_bernoulli_rows(ComplEx(), entities_, index_, relations_, r_, num_neg, chunk, bias_) is None
    outside = index.clone()
    outside[-1] = len(table)
    with pytest.raises(IndexError, match="outside its table"):
        native.bernoulli_forward(
            native.BernoulliRows(entities, outside, relations, r.contiguous(), bias, 4, 6, True), 1.0
        )
    with pytest.raises(ValueError, match="cannot take"):
        native.bernoulli_forward(
            native.BernoulliRows(entities, index[:-1], relations, r.contiguous(), bias, 4, 6, True), 1.0
        )


def test_the_bernoulli_likelihood_reads_rows_by_position_only_when_its_weights_are_uniform():
    """Plain negatives take the positioned kernel; excluding the positives' own entities (weights per
    negative) gathers the rows for the torch path; either way the loss is the gathered rows' loss."""
    num_pos, chunk, num_neg, dim = 12, 4, 6, 16
    table, index, relations, facts, _ = (
        t.float() if t is not None and t.is_floating_point() else t
        for t in _positioned_case(num_pos, chunk, num_neg, False, dim)
    )
    gathered = Gathered.of(facts, index[2 * num_pos :].view(-1, num_neg))
    rows = FactRows(table[:, :dim][gathered.ids], gathered, relations, facts)
    for exclude, kernel in ((False, "_PositionedBernoulliBackward"), (True, "_BilinearBernoulliBackward")):
        bernoulli = Bernoulli(
            negative_weight=2.0, exclude_positives=exclude, num_negatives=num_neg, chunk=chunk, num_entities=len(table),
            source="global", shard=(0, len(table)), device=torch.device("cpu"),
        )  # fmt: skip
        rows.entities.requires_grad_(True)
        loss = bernoulli.nll(DistMult(), rows, relations, None)
        assert type(loss.grad_fn).__name__ == kernel
        keep = bernoulli._keep(rows) if exclude else None
        want = bernoulli_nll(DistMult(), *(t.double() for t in (rows.s, rows.r, rows.o)),
                             rows.neg.double().view(-1, num_neg, dim), chunk, 2.0, keep_CBK=keep)  # fmt: skip
        torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-4)
