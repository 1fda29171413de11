"""What a trained run says about its own certainty: ``predict``, ``report`` and ``export``.

* predict: the top-k completions of (head, relation, ?) or (?, relation, tail), by name, with the
  probability of the mean embeddings, the Monte-Carlo mean and standard deviation of sigmoid(score),
  whether each completed fact is already known, its calibrated probabilities when the run has a
  calibration (trainer/calibration.py) and, for a 1-vs-all model, its own softmax p(answer | query).
* report: the paper's three analyses plus calibration, as PNG figures and ``report.json``:
  variance against log frequency (Figure 1), precision against coverage (Figure 2) for several
  confidence measures, a reliability diagram with ECE, Brier score and log loss before and after
  calibration, the confidence study (which measure ranks right top-1 answers of link prediction, and
  true facts, first: magnitude against sampling-based measures, with bootstrap intervals), and a fact
  visualisation (Figure 3). Definitions are in trainer/uncertainty.py and docs/uncertainty.md.
* export: every entity's and relation's mean and variance, with names, to Parquet (or TSV).
"""

from __future__ import annotations

import difflib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from sharding.gaussian import Gaussian
from storage.atomic import atomic_path, atomic_write_json, remove_stale_temps, temp_dir_beside
from storage.dataset import KGDataset
from trainer import calibration, evaluate, uncertainty
from trainer.model import KGModel
from trainer.runs import Run

# Points of the variance-against-frequency scatter kept in report.json and the figure.
SCATTER_POINTS = 100_000
# Bootstrap resamples of the confidence study's intervals.
RESAMPLES = 1000
# Test facts of the link-prediction confidence study: each of its 2 queries per fact scores every entity
# under every draw, so its cost is facts x entities x (1 + draws); beyond this, a seeded sample (every
# bundled graph's test split is smaller). Freebase86m's 86M entities want far fewer: --link-facts.
LINK_MAX_FACTS = 10_000


# difflib over every name of a large graph takes minutes: a miss is compared with at most this many names.
HINT_POOL = 10_000
# Candidates scored, and export rows built, at a time: bounded memory whatever the number of entities.
CANDIDATE_ROWS = 1 << 20
EXPORT_ROWS = 1 << 16


def _lookup(names: pa.ChunkedArray, name: str, what: str) -> int:
    index = pc.index(names, pa.scalar(name, pa.string())).as_py()
    if index >= 0:
        return index
    close = difflib.get_close_matches(name, _hint_pool(names, name), n=5, cutoff=0.5)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise ValueError(f"unknown {what} {name!r}{hint}")


def _hint_pool(names: pa.ChunkedArray, name: str) -> list[str]:
    """Every name on a small graph; else the names sharing the longest prefix with ``name`` that
    leaves at most HINT_POOL of them."""
    pool = names
    for length in range(1, len(name) + 1):
        if len(pool) <= HINT_POOL:
            break
        narrower = pc.filter(pool, pc.starts_with(pool, pattern=name[:length]))
        if len(narrower) == 0:
            break
        pool = narrower
    return pool.slice(0, HINT_POOL).to_pylist()


def _candidate_scores(model: KGModel, known_id: int, r: int, num_entities: int, tails: bool) -> torch.Tensor:
    """Scores with the means for the missing tail (``tails``) or head of every entity e, scored as evaluation
    ranks them: a head query of a reciprocal model is the tail query (known, r^-1, e)."""
    ents, rels = model.entities.full(), model.relations.full()
    query, relation, side = model.query(
        ents.mean[known_id].unsqueeze(0), rels.mean, torch.tensor([r]), "tail" if tails else "head"
    )
    bias = model.relation_bias(torch.tensor([r])) if not model.reciprocal else 0.0
    chunks = []
    for lo in range(0, num_entities, CANDIDATE_ROWS):
        candidates = ents.mean[lo : min(num_entities, lo + CANDIDATE_ROWS)]
        chunks.append(model.score_candidates(query, relation, side, candidates)[0] + bias)
    return torch.cat(chunks)


@torch.no_grad()
def predict(run: Run, *, head: str | None, relation: str, tail: str | None, top_k: int, samples: int) -> dict:
    """Top-k completions of the one missing side (give exactly one of ``head`` and ``tail``).

    With a calibration stored with the run (``trainer calibrate``), each completed fact also has its
    calibrated probabilities of being true (``calibrated_probability`` from the means, ``calibrated_mc_mean``
    from the Monte-Carlo mean), of the fact (s, r, o) whichever side is missing. A reciprocal (1-vs-all)
    model also gives its own p(answer | query): the softmax of the query's scores over every entity.
    """
    if (head is None) == (tail is None):
        raise ValueError("give exactly one of --head and --tail")
    data, model = run.dataset, run.model
    entity_names = data.names("entities")["name"]
    r = _lookup(data.names("relations")["name"], relation, "relation")
    known_name = head if head is not None else tail
    assert known_name is not None
    known_id = _lookup(entity_names, known_name, "entity")
    scores = _candidate_scores(model, known_id, r, data.num_entities, tails=head is not None)
    # Ranked by score: sigmoid in float32 rounds every score above ~17 to 1, and topk would pick among the
    # tie in no particular order. The probability shown is float64's.
    top = torch.topk(scores, min(top_k, data.num_entities)).indices
    magnitude = torch.sigmoid(scores[top].double())
    fixed, relations = torch.full_like(top, known_id), torch.full_like(top, r)
    facts = torch.stack([fixed, relations, top] if head is not None else [top, relations, fixed], dim=1)
    missing = "tail" if head is not None else "head"
    seed = run.config.train.seed
    fact_scores = uncertainty.fact_scores(model, facts, samples, seed, missing=missing)
    probs = fact_scores.probabilities()
    known = uncertainty.known_mask(facts, data.known_chunks())
    rows = [
        {
            missing: entity_names[i].as_py(),
            "probability": float(magnitude[k]),
            "mc_mean": float(probs.mean[k]),
            "mc_std": float(probs.std[k]),
            "known": bool(known[k]),
        }
        for k, i in enumerate(top.tolist())
    ]
    if model.reciprocal:  # the 1-vs-all likelihood's own distribution over answers
        softmax = torch.exp(scores[top] - torch.logsumexp(scores, 0))
        for row, p in zip(rows, softmax.tolist(), strict=True):
            row["softmax_probability"] = p
    found, note = calibration.stored(run)
    if found is not None:
        # The calibrators map triple scores (s, r, o): a reciprocal model's head answers are rescored so.
        rescore = missing == "head" and model.reciprocal
        calibrated, drawn = _calibrated_probabilities(found, model, facts, fact_scores, samples, seed, rescore)
        note += drawn
        for k, row in enumerate(rows):
            row["calibrated_probability"] = float(calibrated["magnitude"][k])
            if "mc_mean" in calibrated:
                row["calibrated_mc_mean"] = float(calibrated["mc_mean"][k])
    query = {"head": head, "relation": relation, "tail": tail, "samples": samples if model.variational else 0,
             "calibration": note, "calibrated": found is not None}  # fmt: skip
    return {"query": query, "predictions": rows}


def format_predictions(result: dict) -> str:
    q, rows = result["query"], result["predictions"]
    missing = "tail" if q["tail"] is None else "head"
    softmax = bool(rows) and "softmax_probability" in rows[0]
    mc = bool(rows) and "calibrated_mc_mean" in rows[0]
    lines = [f"({q['head'] or '?'}, {q['relation']}, {q['tail'] or '?'}), {q['samples']} samples"]
    if "calibration" in q:
        shown = "cal(p), cal(mc): the probability that the fact is true, " if q["calibrated"] else "p(mean), mc_mean: "
        lines.append(f"{shown}{q['calibration']}")
    answer = "p(t|h,r)" if missing == "tail" else "p(h|r,t)"
    if softmax:
        lines.append(f"{answer}: the model's own probability of this {missing} among all entities (softmax)")
    header = f"{'rank':>4}  {missing:30s} {'p(mean)':>8} {'mc_mean':>8} {'mc_std':>8}"
    header += (f" {'cal(p)':>8}" + (f" {'cal(mc)':>8}" if mc else "")) if q.get("calibrated") else ""
    lines.append(header + (f" {answer:>8}" if softmax else "") + "  known")
    for i, row in enumerate(rows, start=1):
        line = f"{i:>4}  {row[missing][:30]:30s} {row['probability']:8.4f} {row['mc_mean']:8.4f} {row['mc_std']:8.4f}"
        if q.get("calibrated"):
            line += f" {row['calibrated_probability']:8.4f}" + (f" {row['calibrated_mc_mean']:8.4f}" if mc else "")
        if softmax:
            line += f" {row['softmax_probability']:8.4f}"
        lines.append(f"{line}  {'yes' if row['known'] else ''}")
    return "\n".join(lines)


EXPORT_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),
        ("id", pa.int64()),
        ("name", pa.string()),
        ("frequency", pa.int64()),
        ("mean", pa.list_(pa.float64())),
        ("variance", pa.list_(pa.float64())),
        ("bias", pa.float64()),
    ]
)
"""One row per entity (or per role of one) and per relation (and reciprocal). ``bias``: a relation's score
bias (``objective.relation_bias``; 0 without one), added to every score of its facts; null for entities."""


def export(run: Run, out: Path, fmt: str = "parquet", *, chunk_rows: int = EXPORT_ROWS) -> Path:
    """Names, kinds, train frequencies, means, variances and relation biases of every entity and relation
    (``EXPORT_SCHEMA``), written ``chunk_rows`` rows at a time (the file is the same for any ``chunk_rows``)."""
    if fmt not in ("parquet", "tsv"):
        raise ValueError(f"--format {fmt!r}: expected parquet or tsv")
    out = Path(out)
    chunks = _export_chunks(run, chunk_rows)
    with atomic_path(out) as tmp:
        if fmt == "parquet":
            with pq.ParquetWriter(tmp, EXPORT_SCHEMA) as writer:
                for chunk in chunks:
                    writer.write_table(chunk)
        else:
            with open(tmp, "w") as handle:
                handle.write("\t".join(EXPORT_SCHEMA.names) + "\n")
                for chunk in chunks:
                    handle.writelines(_tsv_lines(chunk))
    return out


def _export_chunks(run: Run, chunk_rows: int) -> Iterator[pa.Table]:
    """Entities, relations and, for a reciprocal model, each relation's reciprocal r^-1 (kind
    ``reciprocal_relation``, the id and name of r): the row head queries are scored with. With
    separate roles an entity is two rows, kinds ``entity_subject`` and ``entity_object``."""
    data, model = run.dataset, run.model
    relations, entities = data.names("relations"), data.names("entities")
    rels, ents = model.relations.full(), model.entities.full()
    dim = rels.mean.shape[1]

    def role(table: Gaussian, index: int) -> Gaussian:
        columns = slice(index * dim, (index + 1) * dim)
        return Gaussian(table.mean[:, columns], None if table.logvar is None else table.logvar[:, columns])

    if ents.mean.shape[1] == dim:
        parts = [("entity", ents, entities, 0)]
    else:
        parts = [("entity_subject", role(ents, 0), entities, 0), ("entity_object", role(ents, 1), entities, 0)]
    parts.append(("relation", rels, relations, 0))
    if model.reciprocal:
        parts.append(("reciprocal_relation", rels, relations, model.num_relations))
    # A reciprocal model has no bias (only the Bernoulli likelihood learns one, and it has no reciprocals).
    bias = model.bias.table.weight[:, 0] if model.bias is not None else torch.zeros(len(rels.mean))
    for kind, table, names, offset in parts:
        for lo in range(0, len(names), chunk_rows):
            hi = min(len(names), lo + chunk_rows)
            mean = table.mean[offset + lo : offset + hi]
            variance = (
                table.logvar[offset + lo : offset + hi].exp() if table.logvar is not None else torch.zeros_like(mean)
            )
            biases = (
                pa.array(bias[offset + lo : offset + hi].double().numpy())
                if kind.endswith("relation")
                else pa.nulls(hi - lo, pa.float64())
            )
            yield pa.table(
                {
                    "kind": pa.array([kind] * (hi - lo), pa.string()),
                    "id": pa.array(np.arange(lo, hi, dtype=np.int64)),
                    "name": names["name"].slice(lo, hi - lo),
                    "frequency": names["frequency"].slice(lo, hi - lo).cast(pa.int64()),
                    "mean": _vectors(mean),
                    "variance": _vectors(variance),
                    "bias": biases,
                },
                schema=EXPORT_SCHEMA,
            )


def _vectors(rows: torch.Tensor) -> pa.ListArray:
    """[n, D] float rows as a list<double> column (float32 widened exactly, as Python floats were)."""
    offsets = np.arange(len(rows) + 1, dtype=np.int32) * rows.shape[1]
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(rows.double().numpy().reshape(-1)))


def _tsv_lines(chunk: pa.Table) -> Iterator[str]:
    def vector(v: list[float]) -> str:
        return ",".join(f"{x:.6g}" for x in v)

    columns = [chunk[name].to_pylist() for name in EXPORT_SCHEMA.names]
    for k, i, n, f, m, v, b in zip(*columns, strict=True):
        yield f"{k}\t{i}\t{n}\t{f}\t{vector(m)}\t{vector(v)}\t{'' if b is None else f'{b:.6g}'}\n"


@torch.no_grad()
def analyse(
    run: Run,
    *,
    samples: int,
    seed: int,
    link_samples: int | None = None,
    link_facts: int = LINK_MAX_FACTS,
    resamples: int = RESAMPLES,
) -> dict:
    """The numbers behind every figure of the report: ``samples`` draws for the facts, ``link_samples``
    (default ``samples``) and at most ``link_facts`` test facts for the link-prediction confidence study,
    ``resamples`` for its bootstrap."""
    model = run.model
    test = calibration.judged(run, "test", seed)
    labels = test.labels
    scores = uncertainty.fact_scores(model, test.facts, samples, seed)
    probs = scores.probabilities()
    coverage = uncertainty.coverage_grid()
    truth = uncertainty.truth_confidences(scores)
    precision = {name: uncertainty.precision_at_coverage(c, labels) for name, c in truth.items()}
    predicted = probs.mean > 0.5  # the magnitude of a point model: its one "sample" is the mean
    correct = (predicted == labels.astype(bool)).astype(np.float64)
    selective = {}
    for name, confidence in uncertainty.prediction_confidences(scores).items():
        own_correct = ((probs.magnitude > 0.5) == labels.astype(bool)) if name == "magnitude" else correct
        selective[name] = uncertainty.precision_at_coverage(confidence, own_correct)
    calibrator, calibrated = _calibrated(run, scores, test.facts, seed=seed, samples=samples)
    calibration_numbers = {}
    for name, p in (("magnitude", probs.magnitude), ("mc_mean", probs.mean)):
        calibration_numbers[name] = calibration.quality(p, labels)
        if name in calibrated:
            calibration_numbers[name]["calibrated"] = calibration.quality(calibrated[name], labels)
    link_samples = samples if link_samples is None else link_samples
    answers = link_answers(run, "test", samples=link_samples, seed=seed, max_facts=link_facts)
    study = confidence_study(
        answers, truth, labels, samples=link_samples if model.variational else 0,
        softmax=model.reciprocal, seed=seed, resamples=resamples,
    )  # fmt: skip
    study["link_prediction"]["facts_available"] = len(run.dataset.test)
    return {
        "facts": {**test.counts(), "samples": samples},
        "variance_vs_frequency": variance_vs_frequency(run),
        "precision_coverage": {
            "coverage": coverage.tolist(),
            "curves": {k: v.tolist() for k, v in precision.items()},
            "area": {k: uncertainty.area(coverage, v) for k, v in precision.items()},
        },
        "selective_prediction": {
            "curves": {k: v.tolist() for k, v in selective.items()},
            "area": {k: uncertainty.area(coverage, v) for k, v in selective.items()},
        },
        "calibration": calibration_numbers,
        "calibrator": calibrator,
        "confidence": study,
    }


def link_answers(
    run: Run, split: str, *, samples: int, seed: int, max_facts: int = LINK_MAX_FACTS
) -> uncertainty.TopAnswers:
    """``uncertainty.top_answers`` of the tail and head query of every fact of ``split`` ("valid" or
    "test"), each ranked against every entity but its other known answers (train, valid and test). A split
    of more than ``max_facts`` facts gives a sample of that many (``evaluate.sample_facts``, seeded with
    ``seed``): the same facts for every draw and every run of the same seed."""
    check_link_facts(max_facts)
    data = run.dataset
    facts = evaluate.sample_facts(data.valid if split == "valid" else data.test, max_facts, seed)
    filters = evaluate.build_filters(data.known_chunks(), data.num_relations)
    return uncertainty.top_answers(run.model, facts, filters, samples, seed)


def confidence_study(
    answers: uncertainty.TopAnswers,
    truth: dict[str, np.ndarray],
    labels: np.ndarray,
    *,
    samples: int,
    softmax: bool,
    seed: int,
    resamples: int = RESAMPLES,
) -> dict:
    """Which confidence ranks right answers first: for the top-1 answers of link prediction
    (``uncertainty.link_confidences``) and for facts (``truth``: ``uncertainty.truth_confidences``, whose
    true ones are ``labels``), each measure's area under precision against coverage, and each sampling
    measure's difference from ``magnitude`` with a 95% bootstrap interval over the queries (facts)."""
    coverage = uncertainty.coverage_grid()
    link = uncertainty.link_confidences(answers)
    curves = {name: uncertainty.precision_at_coverage(c, answers.correct) for name, c in link.items()}
    fact_curves = {name: uncertainty.precision_at_coverage(c, labels) for name, c in truth.items()}
    return {
        "link_prediction": {
            "queries": len(answers.correct),
            "samples": samples,
            "probability": "softmax over the candidates" if softmax else "sigmoid(score + relation bias)",
            "top1_accuracy": float(answers.correct.mean()) if len(answers.correct) else float("nan"),
            "curves": {k: v.tolist() for k, v in curves.items()},
            "area": {k: uncertainty.area(coverage, v) for k, v in curves.items()},
            "versus_magnitude": uncertainty.area_differences(link, answers.correct, resamples=resamples, seed=seed),
        },
        "triples": {
            "facts": len(labels),
            "area": {k: uncertainty.area(coverage, v) for k, v in fact_curves.items()},
            "versus_magnitude": uncertainty.area_differences(truth, labels, resamples=resamples, seed=seed),
        },
        "bootstrap": {
            "resamples": resamples,
            "seed": seed,
            "level": 0.95,
            "resampled": "queries (link prediction), facts (triples)",
        },
    }


def _calibrated(
    run: Run, scores: uncertainty.FactScores, facts: torch.Tensor, *, seed: int, samples: int
) -> tuple[dict, dict[str, np.ndarray]]:
    """The calibration stored with the run, else one fitted here on validation with the defaults and not
    written (the report shows what calibration would do; ``trainer calibrate`` stores it): what it is,
    and the calibrated probabilities of ``facts``, which ``samples`` draws scored ``scores``."""
    found, note = calibration.stored(run)
    is_stored = found is not None
    if found is None:
        found = calibration.fit(run, seed=seed, samples=samples, likelihood=False)  # the report shows none
        note = f"{found.describe()}, fitted for this report and not stored ({note})"
    probabilities, drawn = _calibrated_probabilities(found, run.model, facts, scores, samples, seed)
    about = {"description": note + drawn, "stored": is_stored, "method": found.method,
             "per_relation": found.per_relation, "fitted_on": found.fitted_on}  # fmt: skip
    return about, probabilities


def _calibrated_probabilities(
    found: calibration.Calibration,
    model: KGModel,
    facts: torch.Tensor,
    scores: uncertainty.FactScores,
    samples: int,
    seed: int,
    rescore: bool = False,
) -> tuple[dict[str, np.ndarray], str]:
    """``found``'s probabilities of ``facts``, which ``samples`` draws scored ``scores`` (``rescore``: scored
    as other than the triples), and what a note should add. Its MC mean's calibrator maps a mean of as many
    draws as it was fitted with (``calibration.fitted_draws``): facts are rescored with those where they
    differ, and the note says so."""
    draws = calibration.fitted_draws(found, samples) if model.variational else samples
    if rescore or draws != samples:
        scores = uncertainty.fact_scores(model, facts, draws, seed)
    logits = calibration.measure_logits(scores, model.variational)
    drawn = f"; its MC mean from the {draws} draws it was fitted with" if draws != samples else ""
    return found.probabilities(logits, facts[:, 1].numpy()), drawn


def variance_vs_frequency(run: Run, *, max_points: int = SCATTER_POINTS, seed: int = 0) -> dict:
    """Paper Figure 1: the correlation over every row, and the scatter's points (every row up to
    ``max_points``, else a seeded uniform sample of them: report.json stays small on Freebase86m)."""
    data, model = run.dataset, run.model
    result = {}
    relation_freq = data.names("relations")["frequency"].to_numpy()
    for kind, table, frequency in (
        ("entities", model.entities.full(), data.entity_frequency.numpy()),
        ("relations", model.relations.full(), relation_freq),
    ):
        if table.logvar is None:
            continue
        variance = _mean_variance(table.logvar[: len(frequency)])
        log_frequency = np.log(np.maximum(frequency, 1))
        shown = np.arange(len(frequency))
        if len(shown) > max_points:
            shown = np.sort(np.random.default_rng(seed).choice(len(shown), max_points, replace=False))
        result[kind] = {
            "log_frequency": log_frequency[shown].tolist(),
            "mean_variance": variance[shown].tolist(),
            "correlation": uncertainty.pearson(log_frequency, np.log(variance)),
            **({"points_of": len(frequency)} if len(shown) < len(frequency) else {}),
        }
    return result


def _mean_variance(logvar: torch.Tensor) -> np.ndarray:
    """Mean variance of each row, CANDIDATE_ROWS rows at a time (the whole [N, D] exp of Freebase86m's
    table would be ~69 GB)."""
    return torch.cat(
        [logvar[lo : lo + CANDIDATE_ROWS].exp().mean(1) for lo in range(0, len(logvar), CANDIDATE_ROWS)]
    ).numpy()


def fact_visualisation(run: Run, fact_index: int, seed: int, points: int = 1000) -> dict:
    """Paper Figure 3: PCA of means and NMF of variances to 2-D, ``points`` samples per symbol."""
    data, model = run.dataset, run.model
    check_fact_index(data, fact_index)
    ents, rels = model.entities.full(), model.relations.full()
    if ents.logvar is None or rels.logvar is None:
        raise ValueError("the fact visualisation needs a variational model")
    # With separate roles an entity row holds its subject then its object embedding: each is a point.
    dim = rels.mean.shape[1]
    roles = ents.mean.shape[1] // dim
    means = torch.cat([*ents.mean.split(dim, 1), rels.mean]).numpy()
    variances = torch.cat([*ents.logvar.split(dim, 1), rels.logvar]).exp().numpy()
    object_row = (roles - 1) * data.num_entities
    centre, projection = uncertainty.pca_2d(means)
    weights, _ = uncertainty.nmf_2d(variances, seed=seed)
    s, r, o = data.test[fact_index].tolist()
    rng = np.random.default_rng(seed)
    corrupted = _uniform_other(rng, data.num_entities, {s, o})
    entity_names, relation_names = data.names("entities")["name"], data.names("relations")["name"]
    symbols = {
        f"subject {entity_names[s].as_py()}": s,
        f"relation {relation_names[r].as_py()}": roles * data.num_entities + r,
        f"object {entity_names[o].as_py()}": object_row + o,
        f"corrupted {entity_names[corrupted].as_py()}": object_row + corrupted,
    }
    out = {}
    for label, row in symbols.items():
        mean2 = (means[row] - centre) @ projection
        var2 = np.maximum(weights[row], 1e-12)
        samples = rng.normal(mean2, np.sqrt(var2), size=(points, 2))
        out[label] = {"mean": mean2.tolist(), "variance": var2.tolist(), "samples": samples.tolist()}
    return out


def check_link_facts(link_facts: int) -> None:
    if link_facts < 1:
        raise ValueError(f"link_facts (--link-facts) {link_facts}: expected at least 1")


def check_fact_index(data: KGDataset, fact_index: int) -> None:
    """``--fact``: the index of a test fact, else a ValueError that gives the valid range."""
    if len(data.test) == 0:
        raise ValueError(f"--fact {fact_index}: the test split has no facts to draw")
    if not 0 <= fact_index < len(data.test):
        raise ValueError(f"--fact {fact_index}: the test split has facts 0 to {len(data.test) - 1}")


def _uniform_other(rng: np.random.Generator, num_entities: int, excluded: set[int]) -> int:
    """A uniform entity outside ``excluded``, drawing what ``rng.choice`` of the list of the others
    would (the same report as before), without building that list of every entity."""
    if num_entities <= len(excluded):
        raise ValueError(
            f"no entity to draw as the corrupted one: the graph's {num_entities} entities are all in the "
            f"fact ({', '.join(map(str, sorted(excluded)))})"
        )
    index = int(rng.integers(0, num_entities - len(excluded)))
    for entity in sorted(excluded):
        index += index >= entity
    return index


def write_report(
    run: Run,
    out_dir: Path,
    *,
    samples: int,
    seed: int,
    fact_index: int = 0,
    link_samples: int | None = None,
    link_facts: int = LINK_MAX_FACTS,
    resamples: int = RESAMPLES,
) -> dict:
    """Figures (PNG) and report.json under ``out_dir``; returns the JSON written (without raw curves).

    Every file is written to a directory beside ``out_dir`` and moved in once all are: a report that fails
    part-way leaves ``out_dir`` as it was, not old and new figures mixed. Files are moved one by one, not
    the directory swapped (``storage.atomic.swap_dir``): ``out_dir`` may hold files that are not the report's.
    """
    if run.model.variational:  # the fact figure is drawn last: a bad --fact fails before the analysis
        check_fact_index(run.dataset, fact_index)
    check_link_facts(link_facts)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)
    with temp_dir_beside(out_dir) as staging:
        try:
            summary = _write_report_files(run, staging, samples=samples, seed=seed, fact_index=fact_index,
                                          link_samples=link_samples, link_facts=link_facts,
                                          resamples=resamples)  # fmt: skip
            _move_files(staging, out_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return summary


def _move_files(source: Path, target: Path) -> None:
    """Every file of ``source`` into ``target``, report.json last: a reader that finds the new report.json
    finds the figures it names."""
    for path in sorted(source.iterdir(), key=lambda p: p.name == "report.json"):
        os.replace(path, target / path.name)


def _write_report_files(
    run: Run,
    out_dir: Path,
    *,
    samples: int,
    seed: int,
    fact_index: int,
    link_samples: int | None,
    link_facts: int,
    resamples: int,
) -> dict:
    """``write_report``'s files, written straight into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numbers = analyse(run, samples=samples, seed=seed, link_samples=link_samples, link_facts=link_facts,
                      resamples=resamples)  # fmt: skip
    figures = {}

    vf = numbers["variance_vs_frequency"]
    if vf:
        fig, axes = plt.subplots(1, len(vf), figsize=(5 * len(vf), 4))
        for ax, (kind, values) in zip(np.atleast_1d(axes), vf.items(), strict=True):
            ax.scatter(values["log_frequency"], values["mean_variance"], s=6, alpha=0.5)
            ax.set(xlabel="log frequency in train", ylabel="mean variance", yscale="log",
                   title=f"{kind}: corr(log f, log var) = {values['correlation']:.2f}")  # fmt: skip
        figures["variance_vs_frequency"] = _save(fig, out_dir / "variance_vs_frequency.png")

    for key, title, ylabel in (
        ("precision_coverage", "Precision against coverage (ranking true facts)", "precision (fraction true)"),
        ("selective_prediction", "Selective prediction (most confident labels)", "accuracy"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        coverage = numbers["precision_coverage"]["coverage"]
        for name, curve in numbers[key]["curves"].items():
            ax.plot(coverage, curve, label=f"{name} (area {numbers[key]['area'][name]:.3f})")
        ax.set(xlabel="coverage", ylabel=ylabel, title=title, ylim=(0, 1.02))
        ax.legend(fontsize=8)
        figures[key] = _save(fig, out_dir / f"{key}.png")

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    for colour, (name, measure) in zip(("C0", "C1"), numbers["calibration"].items(), strict=True):
        for values, style, label in ((measure, "o-", name), (measure.get("calibrated"), "s--", f"{name} calibrated")):
            if values is None:
                continue
            bins = values["bins"]
            ax.plot([b["mean_probability"] for b in bins], [b["fraction_true"] for b in bins], style, color=colour,
                    label=f"{label}: ECE {values['ece']:.3f}, Brier {values['brier']:.3f}")  # fmt: skip
    calibrated_on = "stored" if numbers["calibrator"]["stored"] else "fitted for this report"
    ax.set(xlabel="predicted probability", ylabel="fraction of true facts",
           title=f"Reliability diagram (calibrated: {numbers['calibrator']['method']}, {calibrated_on})")  # fmt: skip
    ax.legend(fontsize=8)
    figures["reliability"] = _save(fig, out_dir / "reliability.png")

    figures["confidence"] = _plot_confidence(plt, numbers["confidence"], out_dir / "confidence.png")

    if run.model.variational:
        visual = fact_visualisation(run, fact_index, seed)
        numbers["fact_visualisation"] = {k: {"mean": v["mean"], "variance": v["variance"]} for k, v in visual.items()}
        figures["fact"] = _plot_fact(plt, visual, out_dir / "fact.png")

    summary = {k: v for k, v in numbers.items() if k not in ("precision_coverage", "selective_prediction")}
    link = {k: v for k, v in numbers["confidence"]["link_prediction"].items() if k != "curves"}
    summary["confidence"] = {**numbers["confidence"], "link_prediction": link}
    summary["precision_coverage_area"] = numbers["precision_coverage"]["area"]
    summary["selective_prediction_area"] = numbers["selective_prediction"]["area"]
    atomic_write_json(out_dir / "report.json", {**numbers, "figures": figures})
    return {**summary, "figures": figures}


def format_calibration(summary: dict) -> str:
    """The report's calibration lines: each measure's ECE, Brier score and log loss, before -> after."""
    lines = [f"calibration on test ({summary['calibrator']['description']}), before -> after:"]
    for name, before in summary["calibration"].items():
        after = before.get("calibrated", {})
        numbers = [f"{label} {before[key]:.4f}" + (f" -> {after[key]:.4f}" if after else "")
                   for key, label in (("ece", "ECE"), ("brier", "Brier"), ("log_loss", "log loss"))]  # fmt: skip
        lines.append(f"  {name:10s} " + "   ".join(numbers))
    return "\n".join(lines)


def _plot_confidence(plt, study: dict, path: Path) -> str:
    """Left: precision of the top-1 answers against coverage per measure. Right: each sampling measure's
    area minus magnitude's, with its 95% bootstrap interval, for link prediction and for facts."""
    link = study["link_prediction"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    coverage = uncertainty.coverage_grid()
    for name, curve in link["curves"].items():
        left.plot(coverage, curve, label=f"{name} (area {link['area'][name]:.3f})")
    title = f"Link prediction: {link['queries']:,} queries, top-1 accuracy {link['top1_accuracy']:.3f}"
    left.set(xlabel="coverage", ylabel="precision (top-1 answer right)", ylim=(0, 1.02), title=title)
    left.legend(fontsize=8)
    rows = [(f"{task}: {name}", d) for task, key in (("link", "link_prediction"), ("facts", "triples"))
            for name, d in study[key]["versus_magnitude"].items()]  # fmt: skip
    for y, (label, d) in enumerate(rows):
        colour = "C0" if label.startswith("link") else "C1"
        # The interval from its ends, not errorbar's lengths from the point: a percentile bootstrap interval
        # need not contain the difference, and errorbar refuses the negative length that gives.
        right.plot(d["interval"], [y, y], "|-", color=colour)
        right.plot(d["difference"], y, "o", color=colour)
    right.axvline(0, color="k", lw=1)
    right.invert_yaxis()  # the first row on top
    right.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=8)
    right.set(xlabel="area minus magnitude's (95% bootstrap interval)", title="Sampling against magnitude")
    return _save(fig, path)


def _plot_fact(plt, visual: dict, path: Path) -> str:
    everything = np.concatenate([np.array(v["samples"]) for v in visual.values()])
    lo, hi = everything.min(0), everything.max(0)
    grid_x, grid_y = np.linspace(lo[0], hi[0], 120), np.linspace(lo[1], hi[1], 120)
    fig, ax = plt.subplots(figsize=(6, 5))
    for (label, values), colour in zip(visual.items(), ("C0", "C1", "C2", "C3"), strict=True):
        density = uncertainty.kde_2d(np.array(values["samples"]), grid_x, grid_y)
        levels = uncertainty.contour_levels(density)
        if len(levels):
            ax.contour(grid_x, grid_y, density, levels=levels, colors=colour)
        ax.plot(*values["mean"], "x", color=colour, label=label)
    ax.set(xlabel="PCA 1 of means", ylabel="PCA 2 of means", title="A test fact: KDE of 1,000 samples each")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> str:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    import matplotlib.pyplot as plt  # imported by _write_report_files already

    plt.close(fig)  # clf alone leaves the figure open in pyplot: a process writing many reports would grow
    tmp.replace(path)
    return path.name
