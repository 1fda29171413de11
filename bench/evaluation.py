"""The cost of one evaluation of Freebase86m at 8 workers (README, docs/evaluation.md).

Measures, on this machine, the (query, candidate) pairs per second that ``trainer.evaluate.evaluate``
ranks under each protocol, on one process with a synthetic graph sized like one worker's share of
Freebase's work; then prices ``configs/freebase.yaml``'s evaluations with ``evaluation_cost``.

    .venv/bin/python -m bench.evaluation
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from bench.common import machine, markdown_table, write_results
from trainer.config import load_config
from trainer.evaluate import CandidateSampler, build_filters, evaluate, evaluation_cost
from trainer.model import build_model

FREEBASE = {"num_entities": 86_054_151, "known_facts": 304_727_650 + 16_929_318 + 16_929_308, "num_relations": 14_824}
WORKERS = 8
CONFIG = Path(__file__).parents[1] / "configs" / "freebase.yaml"


def measure(protocol: str, *, num_entities: int, facts: int, candidates: int, batch: int, dim: int) -> float:
    """Pairs per second of ``evaluate`` on one process, as the largest of the workers would rank them."""
    config = load_config(CONFIG, [f"model.dim={dim}", "train.num_threads=null"])
    g = torch.Generator().manual_seed(0)
    frequency = torch.randint(1, 100, (num_entities,), generator=g)
    model = build_model(config, num_entities, 1000, entity_frequency=frequency)
    queries = torch.stack([torch.randint(0, num_entities, (facts,), generator=g),
                           torch.randint(0, 1000, (facts,), generator=g),
                           torch.randint(0, num_entities, (facts,), generator=g)], dim=1)  # fmt: skip
    known = torch.cat([queries, torch.randint(0, num_entities, (2_000_000, 3), generator=g) % 1000])
    filters = build_filters(known, 1000)
    sampler = None
    if protocol == "sampled":
        half = candidates // 2
        sampler = CandidateSampler(
            num_entities, (0, num_entities), num_uniform=half, num_degree=candidates - half, frequency=frequency,
            seed=0,
        )  # fmt: skip
    started = time.perf_counter()
    evaluate(model, queries, filters, batch_size=batch, candidates=sampler)
    seconds = time.perf_counter() - started
    columns = num_entities if sampler is None else candidates + batch
    return 2 * facts * columns / seconds


def main() -> None:
    config = load_config(CONFIG)
    eval_cfg, dim, batch = config.eval, config.model.dim, config.eval.batch_size
    drawn = eval_cfg.uniform_candidates + eval_cfg.degree_candidates
    # One worker's share: K / W drawn candidates (plus the true answers it owns) per batch.
    sizes = {"num_entities": 1 << 18, "batch": batch, "dim": dim}
    rates = {
        "sampled": measure("sampled", facts=4096, candidates=drawn // WORKERS, **sizes),
        "exact": measure("exact", facts=256, candidates=0, **sizes),
    }
    runs = [
        ("periodic (valid)", eval_cfg.protocol, eval_cfg.max_facts),
        ("final, per split", eval_cfg.final_protocol, eval_cfg.final_max_facts),
    ]
    rows = []
    for name, protocol, facts in runs:
        assert facts is not None, "price a sample of Freebase's facts, not all 16.9M"
        cost = evaluation_cost(
            num_entities=FREEBASE["num_entities"], dim=dim, workers=WORKERS, facts=facts,
            candidates=drawn if protocol == "sampled" else None, batch=batch, known_facts=FREEBASE["known_facts"],
        )  # fmt: skip
        rows.append({
            "evaluation": name, "protocol": protocol, "facts": facts, "pairs per worker": cost.pairs,
            "GFLOP per worker": round(cost.flops / 1e9, 1), "batch GiB": round(cost.batch_bytes / 2**30, 2),
            "filter GiB": round(cost.filter_bytes / 2**30, 2), "pairs/s measured": round(rates[protocol]),
            "seconds": round(cost.seconds(rates[protocol]), 1),
        })  # fmt: skip
    columns = list(rows[0])
    table = markdown_table(rows, columns)
    print(table)
    write_results("evaluation", {"machine": machine(), "rates": rates, "rows": rows}, table + "\n")


if __name__ == "__main__":
    main()
