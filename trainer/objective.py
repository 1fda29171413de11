"""The negative ELBO of one batch, as pure functions of the rows it is given (no collectives).

Per epoch the batch losses sum to  -ELBO = -sum_facts E_q[log p(x | H)] + KL[q || p]:
  * the data term is a sum over the batch's positives (each seen once per epoch, weight 1/b+ = 1)
    and, for the Bernoulli likelihood, sampled negatives weighted 1/b- (Propositions 2 and 4);
  * the KL is split across the epoch's batches by a schedule whose shares sum to one.
Expectations over q use one reparameterised sample per row per batch (a row shared by several facts
of the batch uses the same draw: still unbiased per fact, and one draw of noise per row, not per fact).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from sharding.exchange import Exchange, LocalExchange, all_gather_rows, sharded_log_partition
from sharding.kernels import native
from trainer.scorers import BilinearScorer, ComplEx, DistMult, Scorer

KLSchedule = Literal["uniform", "compression"]
Regulariser = Literal["none", "n3"]


def bernoulli_negative_weight(num_entities: int, num_negatives: int) -> float:
    """1/b- = |D-|/|D+| per sampled negative: each positive has 2(Ne-1) corruptions, k are drawn."""
    return 2.0 * (num_entities - 1) / num_negatives


def kl_share(batch_index: int, num_batches: int, schedule: KLSchedule) -> float:
    """Share of the epoch's KL assigned to batch ``batch_index`` (0-based) of ``num_batches``; shares sum to 1.

    compression: pi_i = 2^(M-i) / (2^M - 1) for i = 1..M (Blundell et al., 2015), computed as
    2^-i / (1 - 2^-M) so that large M does not overflow.
    """
    if schedule == "uniform":
        return 1.0 / num_batches
    if schedule == "compression":
        i = batch_index + 1
        return math.pow(2.0, -i) / -math.expm1(-num_batches * math.log(2.0))
    raise ValueError(f"objective.kl_schedule={schedule!r}: expected one of uniform, compression")


def chunk_negatives(
    num_positives: int, chunk: int, num_negatives: int, num_entities: int, generator: torch.Generator
) -> torch.Tensor:
    """Entity ids [num_chunks, k]: each chunk of positives shares k uniform draws, the first k/2
    replace heads and the last k/2 replace tails, so every positive gets exactly k corruptions."""
    num_chunks = -(-num_positives // chunk)
    return torch.randint(num_entities, (num_chunks, num_negatives), generator=generator, device=generator.device)


def position_weights(num_positives: int, num_negatives: int, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights the authors' code gave a batch's positives [B] and negatives [B, k] (for
    ``objective.split_by_position``): it lays the batch out as each positive followed by its k negatives,
    then weighs rows by position, not by label: the first B rows 1 and every later row ``weight``, so only
    the first ~B/(k+1) positives keep weight 1 and most positives carry the negatives' weight."""
    row = torch.arange(num_positives, dtype=torch.float64).unsqueeze(1) * (num_negatives + 1)
    rows = row + torch.arange(num_negatives + 1, dtype=torch.float64)  # [B, 1 + k]: the positive, then its negatives
    weights = torch.where(rows < num_positives, 1.0, weight).float()
    return weights[:, 0], weights[:, 1:]


def negative_weights(
    scores_CBH: torch.Tensor, keep_CBH: torch.Tensor | None, weight: float, temperature: float
) -> torch.Tensor | float:
    """The weight of each of a positive's H negatives on one side [C, B, H] (a float when all are equal).

    Uniform: ``weight`` each, times ``keep`` (a bool mask: 0 where False; or float multipliers).
    Self-adversarial (``temperature`` > 0, RotatE):
    the kept negatives share weight * (#kept) in proportion to softmax(temperature * score), so the
    side's total weight is the uniform one and only its split changes. Constants to the gradient.
    """
    if keep_CBH is None and temperature == 0:
        return weight
    if temperature == 0:
        assert keep_CBH is not None
        return keep_CBH.to(scores_CBH.dtype) * weight
    with torch.no_grad():
        logits = scores_CBH * temperature
        kept = torch.full_like(scores_CBH, float(scores_CBH.shape[-1]))
        if keep_CBH is not None:
            logits = logits.masked_fill(~keep_CBH, -torch.inf)
            kept = keep_CBH.sum(-1, keepdim=True).to(scores_CBH.dtype).expand_as(scores_CBH)
        # A positive with no kept negative has an all -inf row: its softmax is NaN, its weight 0.
        return torch.softmax(logits, -1).nan_to_num_(0.0) * kept * weight


@dataclass(frozen=True)
class NegativeWeighting:
    """How a chunked batch weighs its head and tail negatives (``negative_weights`` per side)."""

    weight: float
    keep_heads: torch.Tensor | None
    keep_tails: torch.Tensor | None
    temperature: float

    def __call__(
        self, head_scores: torch.Tensor, tail_scores: torch.Tensor
    ) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        return (
            negative_weights(head_scores, self.keep_heads, self.weight, self.temperature),
            negative_weights(tail_scores, self.keep_tails, self.weight, self.temperature),
        )


def bernoulli_nll(
    scorer: Scorer,
    s_BD: torch.Tensor,
    r_BD: torch.Tensor,
    o_BD: torch.Tensor,
    neg_CKD: torch.Tensor,
    chunk: int,
    negative_weight: float,
    *,
    keep_CBK: torch.Tensor | None = None,
    adversarial_temperature: float = 0.0,
    positive_weight_B: torch.Tensor | None = None,
    bias_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """-sum w_pos log sigmoid(x_pos) - sum_neg w_neg log sigmoid(-x_neg) for a batch of B positives.

    ``neg_CKD`` holds the sampled negative embeddings of the C = ceil(B/chunk) chunks; positives are
    padded to C*chunk so each chunk's scoring is one batched matrix product, and padding is masked.
    The first k//2 negatives replace heads, the rest tails. w_neg is ``negative_weight`` unless
    ``keep_CBK`` [C, chunk, k] scales the negatives of a positive (a bool mask: False is not counted) or
    ``adversarial_temperature`` reweights them (``negative_weights``); w_pos is 1 unless
    ``positive_weight_B`` gives it. ``bias_B`` is added to every score of a positive's facts (its
    relation's bias).
    """
    num_pos = len(s_BD)
    num_chunks, num_neg, _ = neg_CKD.shape
    pad = num_chunks * chunk - num_pos

    def chunked(x: torch.Tensor) -> torch.Tensor:
        # Its own width: with separate roles an entity row is twice a relation's.
        return (F.pad(x, (0, 0, 0, pad)) if pad else x).view(num_chunks, chunk, x.shape[-1])

    def chunked_values(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else (F.pad(x, (0, pad)) if pad else x).view(num_chunks, chunk)

    s, r, o = chunked(s_BD), chunked(r_BD), chunked(o_BD)
    pos_weight, bias = chunked_values(positive_weight_B), chunked_values(bias_B)
    half = num_neg // 2
    keep_heads, keep_tails = (None, None) if keep_CBK is None else (keep_CBK[..., :half], keep_CBK[..., half:])
    weigh = NegativeWeighting(negative_weight, keep_heads, keep_tails, adversarial_temperature)
    if isinstance(scorer, BilinearScorer):
        query_tail, query_head = scorer.tail_query(s, r), scorer.head_query(r, o)
        return _BilinearBernoulli.apply(query_tail, query_head, o, neg_CKD, weigh, num_pos, pos_weight, bias)
    pos_scores, tail_scores = scorer.score_and_tails(s, r, o, neg_CKD[:, half:])  # [C, chunk], [C, chunk, k - k//2]
    head_scores = scorer.score_heads(r, o, neg_CKD[:, :half])
    if bias is not None:
        pos_scores, tail_scores, head_scores = (
            pos_scores + bias,
            tail_scores + bias.unsqueeze(-1),
            head_scores + bias.unsqueeze(-1),
        )
    w_heads, w_tails = weigh(head_scores, tail_scores)
    neg_nll = (F.softplus(head_scores) * w_heads).sum(-1) + (F.softplus(tail_scores) * w_tails).sum(-1)
    pos_nll = F.softplus(-pos_scores)
    nll = (pos_nll if pos_weight is None else pos_nll * pos_weight) + neg_nll  # [C, chunk]
    return (nll.view(-1)[:num_pos] if pad else nll).sum()


_KERNEL_SCORERS: dict[type[Scorer], bool] = {DistMult: False, ComplEx: True}
"""The scorers bilinear.c computes, whether complex-valued; the exact classes: a subclass may score otherwise."""


def kernel_scores(scorer: Scorer) -> bool:
    """Whether the compiled Bernoulli kernel scores with ``scorer`` (and is built) on the CPU."""
    return type(scorer) in _KERNEL_SCORERS and native.library() is not None


def positioned_bernoulli_rows(
    scorer: Scorer,
    entities: torch.Tensor,
    index: torch.Tensor,
    relations: torch.Tensor,
    relation_ids: torch.Tensor,
    num_negatives: int,
    chunk: int,
    bias: torch.Tensor | None,
) -> native.BernoulliRows | None:
    """B facts whose rows are given by position, as the compiled Bernoulli kernel (sharding/kernels/bilinear.c)
    takes them: s, o and the negatives [C, num_negatives] at ``entities[index]`` (index [2B + C*num_negatives],
    in that order), the relations at ``relations[relation_ids]``. The kernel reads the rows where they are and
    sums their gradients into the tables' rows: queries, scores, softplus and sigmoids in one pass per chunk,
    where the torch path dispatches some fifty operations each way around a gather of the rows and a scatter
    of their gradients. None where it cannot take them (DistMult and ComplEx themselves on the CPU only; then
    the caller gathers the rows for ``bernoulli_nll``)."""
    complex_valued = _KERNEL_SCORERS.get(type(scorer))
    if complex_valued is None:
        return None
    rows = native.BernoulliRows(
        entities, index.contiguous(), relations, relation_ids.contiguous(), bias, chunk, num_negatives,
        complex_valued,
    )  # fmt: skip
    return rows if rows.fits() else None


def positioned_bernoulli_nll(rows: native.BernoulliRows, weight: float) -> torch.Tensor:
    """``bernoulli_nll`` with uniform weights ``weight`` of the facts ``rows`` places, as an autograd node."""
    return _PositionedBernoulli.apply(rows.entities, rows.relations, rows.bias, rows, float(weight))


def positioned_bernoulli_gradients(
    rows: native.BernoulliRows, weight: float, grad_out: torch.Tensor | None = None, check: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``positioned_bernoulli_nll`` and its gradients, written out without autograd: (the NLL, the gradient of
    the entity rows [U, D] (in the first D columns of ``grad_out`` when given), of the relation rows [R, D], of
    the bias [B] or None). What ``_PositionedBernoulli`` computes each way, for a step that writes its
    gradients (``KGModel.forward_backward``). ``check``: see ``native.bernoulli_forward_backward``."""
    chunk_nll, grad_entities, grad_relations, grad_bias = native.bernoulli_forward_backward(
        rows, weight, grad_out, check
    )
    return chunk_nll.sum().to(rows.entities.dtype), grad_entities, grad_relations, grad_bias


class _PositionedBernoulli(torch.autograd.Function):
    """``positioned_bernoulli_nll`` as an autograd node: the gradients of the entity rows, the relation rows
    and the bias."""

    @staticmethod
    def forward(ctx, entities, relations, bias, rows: native.BernoulliRows, weight: float):
        chunk_nll, probs = native.bernoulli_forward(rows, weight)
        # Saved, not kept on ctx: autograd then checks that nothing changed them before the backward.
        ctx.save_for_backward(entities, relations, bias, rows.index, rows.relation_ids, probs)
        ctx.layout, ctx.weight = (rows.chunk, rows.num_neg, rows.complex_valued), weight
        return chunk_nll.sum().to(entities.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        entities, relations, bias, index, relation_ids, probs = ctx.saved_tensors
        rows = native.BernoulliRows(entities, index, relations, relation_ids, bias, *ctx.layout)
        return (*native.bernoulli_backward(rows, probs, ctx.weight, float(grad)), None, None)


class _BilinearBernoulli(torch.autograd.Function):
    """The Bernoulli NLL of chunks of facts for a bilinear scorer, from its queries: the fact scores
    <q_tail, o>, the tail corruptions q_tail . c and the head corruptions q_head . c, with a written
    backward (sigmoids and four batched products) in place of autograd's ~50 small nodes.

    Inputs [C, chunk, D] (queries, objects), negatives [C, k, D] (the first k//2 replace heads), how the
    negatives are weighed, how many of the C*chunk rows are real facts (the rest is padding), and
    optionally the positives' weights and score biases [C, chunk].
    """

    @staticmethod
    def forward(ctx, query_tail, query_head, o, neg, weigh: NegativeWeighting, num_pos: int, pos_weight, bias):
        half = neg.shape[1] // 2
        neg_head, neg_tail = neg[:, :half], neg[:, half:]
        pos = torch.linalg.vecdot(query_tail, o)  # [C, chunk]
        tails = torch.bmm(query_tail, neg_tail.transpose(1, 2))  # [C, chunk, k - k//2]
        heads = torch.bmm(query_head, neg_head.transpose(1, 2))
        if bias is not None:
            pos.add_(bias)
            tails.add_(bias.unsqueeze(-1))
            heads.add_(bias.unsqueeze(-1))
        w_heads, w_tails = weigh(heads, tails)
        neg_nll = (F.softplus(tails) * w_tails).sum(-1).add_((F.softplus(heads) * w_heads).sum(-1))
        pos_nll = F.softplus(-pos)
        nll = (pos_nll if pos_weight is None else pos_nll.mul_(pos_weight)).add_(neg_nll)
        ctx.save_for_backward(query_tail, query_head, o, neg, pos, tails, heads)
        ctx.w_heads, ctx.w_tails, ctx.num_pos, ctx.pos_weight = w_heads, w_tails, num_pos, pos_weight
        ctx.has_bias = bias is not None
        return nll.view(-1)[:num_pos].sum()

    @staticmethod
    def backward(ctx, grad):
        query_tail, query_head, o, neg, pos, tails, heads = ctx.saved_tensors
        half = neg.shape[1] // 2
        # d softplus(-x)/dx = -sigmoid(-x);  d softplus(x)/dx = sigmoid(x); the weights are constants.
        g_pos = torch.sigmoid(-pos).mul_(-grad)
        if ctx.pos_weight is not None:
            g_pos.mul_(ctx.pos_weight)
        g_tails = torch.sigmoid(tails).mul_(ctx.w_tails).mul_(grad)
        g_heads = torch.sigmoid(heads).mul_(ctx.w_heads).mul_(grad)
        if ctx.num_pos < pos.numel():  # padding carries no gradient
            for g in (g_pos, g_tails, g_heads):
                g.view(pos.numel(), -1)[ctx.num_pos :] = 0
        # A bias enters every score of its positive's facts with derivative 1.
        grad_bias = g_pos + g_tails.sum(-1) + g_heads.sum(-1) if ctx.has_bias else None
        g_pos = g_pos.unsqueeze(-1)
        grad_tail = torch.baddbmm(g_pos * o, g_tails, neg[:, half:])
        grad_head = torch.bmm(g_heads, neg[:, :half])
        grad_o = g_pos * query_tail
        grad_neg = torch.cat([g_heads.transpose(1, 2) @ query_head, g_tails.transpose(1, 2) @ query_tail], dim=1)
        return grad_tail, grad_head, grad_o, grad_neg, None, None, None, grad_bias


def local_log_partition(logits_BN: torch.Tensor) -> torch.Tensor:
    """log sum_c exp(logit_c) over the candidates this process holds (all of them at world size 1): the
    sharded log-partition of a world of one."""
    return sharded_log_partition(logits_BN, LocalExchange())


LogZ = Callable[[Scorer, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(scorer, s_BD, r_BD, candidates_ND) -> log Z [B] of each query over all entities."""


def local_log_z(scorer: Scorer, s_BD: torch.Tensor, r_BD: torch.Tensor, candidates_ND: torch.Tensor) -> torch.Tensor:
    """log Z when this process holds every candidate (world size 1)."""
    return local_log_partition(scorer.score_tails(s_BD, r_BD, candidates_ND))


def sharded_log_z(exchange: Exchange) -> LogZ:
    """log Z when the candidates are split across ranks: every rank scores every rank's queries against its
    own candidates and log Z is assembled (vocabulary-parallel softmax); ``local_log_z`` at world size 1."""
    if exchange.world_size == 1:
        return local_log_z

    def log_z(scorer: Scorer, s_BD: torch.Tensor, r_BD: torch.Tensor, candidates_ND: torch.Tensor) -> torch.Tensor:
        all_queries, offset = all_gather_rows(s_BD, exchange)
        all_rel, _ = all_gather_rows(r_BD, exchange)
        total = sharded_log_partition(scorer.score_tails(all_queries, all_rel, candidates_ND), exchange)
        return total[offset : offset + len(s_BD)]

    return log_z


def softmax_nll(
    scorer: Scorer,
    s_BD: torch.Tensor,
    r_BD: torch.Tensor,
    target_BD: torch.Tensor,
    candidates_ND: torch.Tensor,
    log_z: LogZ = local_log_z,
) -> torch.Tensor:
    """-sum log softmax of the true tail over all entities, for queries (s, r, ?).

    Written as log Z - score(s, r, target) so the candidates can be split across workers: each scores
    its shard and ``log_z`` assembles log Z (the sharded trainer passes one that all-gathers the queries
    and all-reduces the max and the sum of exponentials, as vocabulary-parallel cross-entropy does).
    """
    return (log_z(scorer, s_BD, r_BD, candidates_ND) - scorer.score(s_BD, r_BD, target_BD)).sum()


def sampled_softmax_nll(
    pos_CB: torch.Tensor, cand_CBM: torch.Tensor, log_q_CM: torch.Tensor, hit_CBM: torch.Tensor
) -> torch.Tensor:
    """-log softmax of each query's true answer [C, B], log Z estimated from sampled candidates (Jean et
    al., 2015; Bengio and Senecal, 2008): log Z ~ logsumexp([x_pos, x_c - log Q(c) for each candidate c]),
    Q(c) the expected number of times the proposal draws c. Candidates that are the query's own answer
    (``hit``: accidental hits) or padding are left out. C chunks of B queries, M candidates each chunk
    shares: ``pos`` [C, B], ``cand`` [C, B, M], ``log_q`` [C, M], ``hit`` [C, B, M] (bool)."""
    adjusted = (cand_CBM - log_q_CM.unsqueeze(1)).masked_fill(hit_CBM, -torch.inf)
    log_z = torch.logsumexp(torch.cat([pos_CB.unsqueeze(-1), adjusted], dim=-1), dim=-1)
    return log_z - pos_CB


def n3_penalty(*embeddings: torch.Tensor, complex_valued: bool) -> torch.Tensor:
    """Nuclear 3-norm (Lacroix et al., 2018): sum of |x|^3 over components (complex modulus for ComplEx)."""
    total = embeddings[0].new_zeros(())
    for x in embeddings:
        if complex_valued:  # (real, imaginary) pairs
            total = total + x.unflatten(-1, (-1, 2)).square().sum(-1).pow(1.5).sum()
        else:
            total = total + x.abs().pow(3).sum()
    return total
