"""What a trained run says about its own certainty: ``predict``, ``report`` and ``export``.

* predict: the top-k completions of (head, relation, ?) or (?, relation, tail), by name, with the
  probability of the mean embeddings, the Monte-Carlo mean and standard deviation of sigmoid(score),
  and whether each completed fact is already known.
* report: the paper's three analyses plus calibration, as PNG figures and ``report.json``:
  variance against log frequency (Figure 1), precision against coverage (Figure 2) for several
  confidence measures, a reliability diagram with ECE and Brier score, and a fact visualisation
  (Figure 3). Definitions are in trainer/uncertainty.py and docs/uncertainty.md.
* export: every entity's and relation's mean and variance, with names, to Parquet (or TSV).
"""

from __future__ import annotations

import difflib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from storage.atomic import atomic_write_json, atomic_write_text
from trainer import uncertainty
from trainer.runs import Run


def _lookup(names: list[str], name: str, what: str) -> int:
    try:
        return names.index(name)
    except ValueError:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown {what} {name!r}{hint}") from None


@torch.no_grad()
def predict(run: Run, *, head: str | None, relation: str, tail: str | None, top_k: int, samples: int) -> dict:
    """Top-k completions of the one missing side (give exactly one of ``head`` and ``tail``)."""
    if (head is None) == (tail is None):
        raise ValueError("give exactly one of --head and --tail")
    data, model = run.dataset, run.model
    r = _lookup(data.relation_names, relation, "relation")
    known_name = head if head is not None else tail
    assert known_name is not None
    known_id = _lookup(data.entity_names, known_name, "entity")
    ents, rels = model.entities.full(), model.relations.full()
    candidates = torch.arange(data.num_entities)
    fixed = torch.full_like(candidates, known_id)
    facts = torch.stack([fixed, torch.full_like(candidates, r), candidates] if head is not None
                        else [candidates, torch.full_like(candidates, r), fixed], dim=1)  # fmt: skip
    magnitude = torch.sigmoid(model.scorer.score(ents.mean[facts[:, 0]], rels.mean[r], ents.mean[facts[:, 2]]))
    top = torch.topk(magnitude, min(top_k, len(candidates))).indices
    probs = uncertainty.fact_probabilities(model, facts[top], samples, run.config.train.seed)
    known = {tuple(f) for f in data.all_known().tolist()}
    missing = "tail" if head is not None else "head"
    rows = [
        {
            missing: data.entity_names[int(facts[i, 2 if head is not None else 0])],
            "probability": float(magnitude[i]),
            "mc_mean": float(probs.mean[k]),
            "mc_std": float(probs.std[k]),
            "known": tuple(facts[i].tolist()) in known,
        }
        for k, i in enumerate(top.tolist())
    ]
    query = {"head": head, "relation": relation, "tail": tail, "samples": samples if model.variational else 0}
    return {"query": query, "predictions": rows}


def format_predictions(result: dict) -> str:
    q = result["query"]
    missing = "tail" if q["tail"] is None else "head"
    lines = [f"({q['head'] or '?'}, {q['relation']}, {q['tail'] or '?'}), {q['samples']} samples"]
    lines.append(f"{'rank':>4}  {missing:30s} {'p(mean)':>8} {'mc_mean':>8} {'mc_std':>8}  known")
    for i, row in enumerate(result["predictions"], start=1):
        lines.append(f"{i:>4}  {row[missing][:30]:30s} {row['probability']:8.4f} {row['mc_mean']:8.4f} "
                     f"{row['mc_std']:8.4f}  {'yes' if row['known'] else ''}")  # fmt: skip
    return "\n".join(lines)


def export(run: Run, out: Path, fmt: str = "parquet") -> Path:
    """Names, kinds, train frequencies, means and variances of every entity and relation."""
    data, model = run.dataset, run.model
    rows: dict[str, list] = {"kind": [], "id": [], "name": [], "frequency": [], "mean": [], "variance": []}
    relation_freq = data.store.names("relations")["frequency"].to_pylist()
    tables = (
        ("entity", model.entities.full(), data.entity_names, data.entity_frequency.tolist()),
        ("relation", model.relations.full(), data.relation_names, relation_freq),
    )
    for kind, table, names, frequency in tables:
        count = len(names)
        variance = table.logvar[:count].exp() if table.logvar is not None else torch.zeros_like(table.mean[:count])
        rows["kind"] += [kind] * count
        rows["id"] += list(range(count))
        rows["name"] += names
        rows["frequency"] += frequency[:count]
        rows["mean"] += table.mean[:count].tolist()
        rows["variance"] += variance.tolist()
    out = Path(out)
    if fmt == "parquet":
        tmp = out.with_name(f".{out.name}.tmp")
        pq.write_table(pa.table(rows), tmp)
        tmp.replace(out)
    elif fmt == "tsv":

        def vector(v: list[float]) -> str:
            return ",".join(f"{x:.6g}" for x in v)

        lines = ["kind\tid\tname\tfrequency\tmean\tvariance"]
        lines += [
            f"{k}\t{i}\t{n}\t{f}\t{vector(m)}\t{vector(v)}" for k, i, n, f, m, v in zip(*rows.values(), strict=True)
        ]
        atomic_write_text(out, "\n".join(lines) + "\n")
    else:
        raise ValueError(f"--format {fmt!r}: expected parquet or tsv")
    return out


@torch.no_grad()
def analyse(run: Run, *, samples: int, seed: int) -> dict:
    """The numbers behind every figure of the report."""
    data, model = run.dataset, run.model
    generator = torch.Generator().manual_seed(seed)
    positives = data.test
    negatives = uncertainty.sampled_negatives(positives, data.all_known(), data.num_entities, data.num_relations,
                                              generator)  # fmt: skip
    facts = torch.cat([positives, negatives])
    labels = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))])
    probs = uncertainty.fact_probabilities(model, facts, samples, seed)
    coverage = uncertainty.coverage_grid()
    precision = {name: uncertainty.precision_at_coverage(c, labels, coverage)
                 for name, c in uncertainty.truth_confidences(probs).items()}  # fmt: skip
    predicted = probs.mean > 0.5  # the magnitude of a point model: its one "sample" is the mean
    correct = (predicted == labels.astype(bool)).astype(np.float64)
    selective = {}
    for name, confidence in uncertainty.prediction_confidences(probs).items():
        own_correct = ((probs.magnitude > 0.5) == labels.astype(bool)) if name == "magnitude" else correct
        selective[name] = uncertainty.precision_at_coverage(confidence, own_correct, coverage)
    calibration = {}
    for name, p in (("magnitude", probs.magnitude), ("mc_mean", probs.mean)):
        ece, bins = uncertainty.expected_calibration_error(p, labels)
        calibration[name] = {"ece": ece, "brier": uncertainty.brier_score(p, labels), "bins": bins}
    return {
        "facts": {"positives": len(positives), "negatives": len(negatives), "samples": samples},
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
        "calibration": calibration,
    }


def variance_vs_frequency(run: Run) -> dict:
    data, model = run.dataset, run.model
    result = {}
    relation_freq = np.array(data.store.names("relations")["frequency"].to_pylist()[: data.num_relations])
    for kind, table, frequency in (
        ("entities", model.entities.full(), data.entity_frequency.numpy()),
        ("relations", model.relations.full(), relation_freq),
    ):
        if table.logvar is None:
            continue
        variance = table.logvar[: len(frequency)].exp().mean(1).numpy()
        log_frequency = np.log(np.maximum(frequency, 1))
        result[kind] = {
            "log_frequency": log_frequency.tolist(),
            "mean_variance": variance.tolist(),
            "correlation": uncertainty.pearson(log_frequency, np.log(variance)),
        }
    return result


def fact_visualisation(run: Run, fact_index: int, seed: int, points: int = 1000) -> dict:
    """Paper Figure 3: PCA of means and NMF of variances to 2-D, ``points`` samples per symbol."""
    data, model = run.dataset, run.model
    ents, rels = model.entities.full(), model.relations.full()
    if ents.logvar is None or rels.logvar is None:
        raise ValueError("the fact visualisation needs a variational model")
    means = torch.cat([ents.mean, rels.mean]).numpy()
    variances = torch.cat([ents.logvar, rels.logvar]).exp().numpy()
    centre, projection = uncertainty.pca_2d(means)
    weights, _ = uncertainty.nmf_2d(variances, seed=seed)
    if not 0 <= fact_index < len(data.test):
        raise ValueError(f"--fact {fact_index}: the test split has facts 0 to {len(data.test) - 1}")
    s, r, o = data.test[fact_index].tolist()
    rng = np.random.default_rng(seed)
    corrupted = int(rng.choice([e for e in range(data.num_entities) if e not in (s, o)]))
    symbols = {
        f"subject {data.entity_names[s]}": s,
        f"relation {data.relation_names[r]}": data.num_entities + r,
        f"object {data.entity_names[o]}": o,
        f"corrupted {data.entity_names[corrupted]}": corrupted,
    }
    out = {}
    for label, row in symbols.items():
        mean2 = (means[row] - centre) @ projection
        var2 = np.maximum(weights[row], 1e-12)
        samples = rng.normal(mean2, np.sqrt(var2), size=(points, 2))
        out[label] = {"mean": mean2.tolist(), "variance": var2.tolist(), "samples": samples.tolist()}
    return out


def write_report(run: Run, out_dir: Path, *, samples: int, seed: int, fact_index: int = 0) -> dict:
    """Figures (PNG) and report.json under ``out_dir``; returns the JSON written (without raw curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    numbers = analyse(run, samples=samples, seed=seed)
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
    for name, values in numbers["calibration"].items():
        bins = values["bins"]
        ax.plot([b["mean_probability"] for b in bins], [b["fraction_true"] for b in bins], "o-",
                label=f"{name}: ECE {values['ece']:.3f}, Brier {values['brier']:.3f}")  # fmt: skip
    ax.set(xlabel="predicted probability", ylabel="fraction of true facts", title="Reliability diagram")
    ax.legend(fontsize=8)
    figures["reliability"] = _save(fig, out_dir / "reliability.png")

    if run.model.variational:
        visual = fact_visualisation(run, fact_index, seed)
        numbers["fact_visualisation"] = {k: {"mean": v["mean"], "variance": v["variance"]} for k, v in visual.items()}
        figures["fact"] = _plot_fact(plt, visual, out_dir / "fact.png")

    summary = {k: v for k, v in numbers.items() if k not in ("precision_coverage", "selective_prediction")}
    summary["precision_coverage_area"] = numbers["precision_coverage"]["area"]
    summary["selective_prediction_area"] = numbers["selective_prediction"]["area"]
    atomic_write_json(out_dir / "report.json", {**numbers, "figures": figures})
    return {**summary, "figures": figures}


def _plot_fact(plt, visual: dict, path: Path) -> str:
    everything = np.concatenate([np.array(v["samples"]) for v in visual.values()])
    lo, hi = everything.min(0), everything.max(0)
    grid_x, grid_y = np.linspace(lo[0], hi[0], 120), np.linspace(lo[1], hi[1], 120)
    fig, ax = plt.subplots(figsize=(6, 5))
    for (label, values), colour in zip(visual.items(), ("C0", "C1", "C2", "C3"), strict=True):
        density = uncertainty.kde_2d(np.array(values["samples"]), grid_x, grid_y)
        ax.contour(grid_x, grid_y, density, levels=4, colors=colour)
        ax.plot(*values["mean"], "x", color=colour, label=label)
    ax.set(xlabel="PCA 1 of means", ylabel="PCA 2 of means", title="A test fact: KDE of 1,000 samples each")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> str:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    fig.clf()
    tmp.replace(path)
    return path.name
