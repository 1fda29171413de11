"""Runs inside PyTorch-BigGraph's environment (bench/.venv-pbg): times PBG 1.0.0's HOGWILD training of ComplEx.

PBG's own pipeline end to end: its TSV importer converts the dataset, ``torchbiggraph.train`` trains one
unpartitioned entity type with dynamic relations (ComplEx: the ``complex_diagonal`` operator with the
``dot`` comparator, logistic loss, row-wise Adagrad, chunks of ``negatives`` positives sharing
``negatives`` uniform head and tail negatives). With --eval, filtered MRR and Hits@k on test.txt are
computed here from the checkpoint, with nvkg's tie rule, after checking the scores against PBG's model.

Prints one JSON line on stdout; PBG's logs (and its workers') go to stderr.

    bench/.venv-pbg/bin/python bench/pbg_peer.py storage/bundled/kinships --epochs 3 --eval
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

import h5py
import torch
from torchbiggraph.config import ConfigSchema
from torchbiggraph.converters.import_from_tsv import convert_input_data
from torchbiggraph.edgelist import EdgeList
from torchbiggraph.entitylist import EntityList
from torchbiggraph.graph_storages import ENTITY_STORAGES, RELATION_TYPE_STORAGES
from torchbiggraph.model import make_model
from torchbiggraph.train import train_and_report_stats
from torchbiggraph.types import Side
from torchbiggraph.util import SubprocessInitializer, set_logging_verbosity, setup_logging

ENTITY = "all"
SPLITS = ("train", "valid", "test")
HITS_AT = (1, 3, 10)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset_dir", type=Path, help="directory with train.txt, valid.txt, test.txt (head rel tail)")
    parser.add_argument("--complex-dim", type=int, default=64, help="complex dimensions (PBG dimension is twice this)")
    parser.add_argument("--negatives", type=int, default=32, help="uniform negatives per side per chunk")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2, help="PBG's HOGWILD worker processes")
    parser.add_argument("--lr", type=float, default=0.1, help="Adagrad learning rate (PBG's fb15k ComplEx uses 0.1)")
    parser.add_argument("--eval", action="store_true", help="filtered MRR and Hits@k on test.txt after training")
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary one, removed at the end)")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch is not timed")
    if args.work is not None and args.work.exists() and any(args.work.iterdir()):
        # PBG skips the import and resumes from a checkpoint it finds, which would time the wrong thing.
        parser.error(f"--work {args.work} must be empty or absent")
    return args


def stdout_to_stderr() -> TextIO:
    """Point file descriptor 1 at stderr and return the real stdout for the JSON line.

    PBG logs to sys.stdout (setup_logging), its importer prints, and its spawned workers inherit fd 1: only
    redirecting the descriptor itself keeps all of them off the result line.
    """
    sys.stdout.flush()
    real_stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return real_stdout


def make_config(work: Path, args: argparse.Namespace) -> ConfigSchema:
    return ConfigSchema.from_dict(
        {
            "entity_path": str(work / "entities"),
            "edge_paths": [str(work / "edges" / "train")],  # only train is trained on
            "checkpoint_path": str(work / "model"),
            "entities": {ENTITY: {"num_partitions": 1}},
            "relations": [{"name": "all_edges", "lhs": ENTITY, "rhs": ENTITY, "operator": "complex_diagonal"}],
            "dynamic_relations": True,
            "global_emb": False,  # a global embedding cannot be combined with dynamic relations
            "dimension": 2 * args.complex_dim,
            "comparator": "dot",
            "loss_fn": "logistic",
            "lr": args.lr,
            "num_uniform_negs": args.negatives,
            "num_batch_negs": 0,  # chunks of num_uniform_negs positives share num_uniform_negs uniform negatives
            "batch_size": args.batch,
            "workers": args.workers,
            "num_epochs": args.epochs,
            "eval_fraction": 0,  # PBG's in-training evaluation would hold out 5% of train and cost time
        }
    )


def import_dataset(dataset_dir: Path, config: ConfigSchema, work: Path) -> None:
    """PBG's TSV importer over all three splits, so that every valid/test entity has a (possibly untrained) row."""
    random.seed(0)  # the importer shuffles entity and relation ids with the global generator
    convert_input_data(
        config.entities,
        config.relations,
        config.entity_path,
        [str(work / "edges" / split) for split in SPLITS],
        [dataset_dir / f"{split}.txt" for split in SPLITS],
        lhs_col=0,
        rhs_col=2,
        rel_col=1,
        dynamic_relations=True,
    )


class EpochStarts(logging.Handler):
    """Records when PBG's trainer logs "Starting epoch ...": the end of the previous epoch's checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        # Called synchronously by the trainer's logger.info, so the clock reads the moment of the call.
        if record.getMessage().startswith("Starting epoch"):
            self.times.append(time.perf_counter())


def train_timed(config: ConfigSchema, subprocess_init: SubprocessInitializer) -> dict[str, list[float]]:
    """Train; return perf_counter times of the start and end of each epoch and of the whole run.

    torchbiggraph.train.train only drains the generator train_and_report_stats, which yields once per
    trained bucket (edge path x chunk x partition pair) right after its HOGWILD pass: with one partition,
    one edge path and one chunk, once per epoch, which marks the ends. The starts are PBG's own "Starting
    epoch" log lines, written after the previous epoch's checkpoint, so that an epoch covers loading and
    shuffling the edges and the HOGWILD pass, but not the checkpoint PBG writes after every epoch (nvkg's
    epoch times leave checkpoints out too).
    """
    starts = EpochStarts()
    logger = logging.getLogger("torchbiggraph")
    logger.addHandler(starts)
    try:
        begin = time.perf_counter()
        ends = [time.perf_counter() for _ in train_and_report_stats(config, subprocess_init=subprocess_init)]
        finish = time.perf_counter()
    finally:
        logger.removeHandler(starts)
    if not len(starts.times) == len(ends) == config.num_epochs:
        raise RuntimeError(
            f"expected {config.num_epochs} epochs of one bucket, saw {len(starts.times)} and {len(ends)}"
        )
    return {"starts": starts.times, "ends": ends, "run": [begin, finish]}


def load_checkpoint(config: ConfigSchema) -> dict[str, torch.Tensor]:
    """Entity rows and the ComplEx operators of both sides from the last checkpoint's h5 files."""
    checkpoint = Path(config.checkpoint_path)
    version = int((checkpoint / "checkpoint_version.txt").read_text())
    with h5py.File(checkpoint / f"embeddings_{ENTITY}_0.v{version}.h5", "r") as hf:
        params = {"embeddings": torch.from_numpy(hf["embeddings"][...])}
    with h5py.File(checkpoint / f"model.v{version}.h5", "r") as hf:
        for side in ("lhs", "rhs"):
            for part in ("real", "imag"):
                params[f"{side}_{part}"] = torch.from_numpy(hf[f"model/relations/0/operator/{side}/{part}"][...])
    return params


def read_triples(dataset_dir: Path, split: str, entities: dict[str, int], relations: dict[str, int]) -> torch.Tensor:
    """[F, 3] (head, relation, tail) ids of one split, in PBG's numbering."""
    rows = [line.split() for line in (dataset_dir / f"{split}.txt").read_text().splitlines() if line.strip()]
    return torch.tensor([[entities[h], relations[r], entities[t]] for h, r, t in rows], dtype=torch.long)


def complex_diagonal(embs: torch.Tensor, real: torch.Tensor, imag: torch.Tensor) -> torch.Tensor:
    """PBG's ComplexDiagonalDynamicOperator: the first half of a row is real, the second imaginary."""
    half = embs.shape[-1] // 2
    re, im = embs[..., :half], embs[..., half:]
    return torch.cat([re * real - im * imag, re * imag + im * real], dim=-1)


def query_vectors(params: dict[str, torch.Tensor], triples: torch.Tensor, direction: str) -> torch.Tensor:
    """[B, D] vectors whose dot product with every entity row is PBG's score of that entity as the answer.

    With dynamic relations PBG scores (h, r, t) two ways (model.py, MultiRelationEmbedder.forward): against
    corrupted tails as dot(lhs_op_r(h), t'), against corrupted heads as dot(h', rhs_op_r(t)).
    """
    embs, rel = params["embeddings"], triples[:, 1]
    if direction == "tail":
        return complex_diagonal(embs[triples[:, 0]], params["lhs_real"][rel], params["lhs_imag"][rel])
    return complex_diagonal(embs[triples[:, 2]], params["rhs_real"][rel], params["rhs_imag"][rel])


def check_against_pbg(config: ConfigSchema, params: dict[str, torch.Tensor], triples: torch.Tensor) -> None:
    """Fail unless our all-entity scores equal PBG's own forward pass with all negatives on ``triples``."""
    settings = config.to_dict()
    settings["relations"] = [{**relation, "all_negs": True} for relation in settings["relations"]]
    model = make_model(ConfigSchema.from_dict(settings))
    for side, operators in (("lhs", model.lhs_operators), ("rhs", model.rhs_operators)):
        operators[0].real.data.copy_(params[f"{side}_real"])
        operators[0].imag.data.copy_(params[f"{side}_imag"])
    weight = torch.nn.Parameter(params["embeddings"].clone())
    model.set_embeddings(ENTITY, weight, Side.LHS)
    model.set_embeddings(ENTITY, weight, Side.RHS)
    edges = EdgeList(EntityList.from_tensor(triples[:, 0]), EntityList.from_tensor(triples[:, 2]), triples[:, 1])
    with torch.no_grad():
        scores = model(edges)
    # PBG masks the true answer's own score with -1e9; compare the rest and the positives.
    expected = {"tail": (scores.rhs_neg, scores.rhs_pos, 2), "head": (scores.lhs_neg, scores.lhs_pos, 0)}
    for direction, (pbg_all, pbg_pos, column) in expected.items():
        ours = query_vectors(params, triples, direction) @ params["embeddings"].T
        kept = pbg_all != -1e9
        ours_pos = ours.gather(1, triples[:, column : column + 1]).squeeze(1)
        if not (torch.allclose(ours[kept], pbg_all[kept], atol=1e-5) and torch.allclose(ours_pos, pbg_pos, atol=1e-5)):
            raise RuntimeError(f"our {direction} scores differ from PBG's model")


def known_answers(known: torch.Tensor, direction: str) -> dict[tuple[int, int], list[int]]:
    """(head, relation) -> true tails, or (relation, tail) -> true heads, over train + valid + test."""
    answers: dict[tuple[int, int], list[int]] = {}
    for h, r, t in known.tolist():
        key, answer = ((h, r), t) if direction == "tail" else ((r, t), h)
        answers.setdefault(key, []).append(answer)
    return answers


def filtered_ranks(
    params: dict[str, torch.Tensor], test: torch.Tensor, known: torch.Tensor, batch: int = 512
) -> torch.Tensor:
    """Filtered ranks of the true tail and head of every test triple among all entities.

    nvkg's tie rule: 1 + #(higher scores) + #(equal scores) / 2 over the candidates that are not other
    known true answers; a NaN true score ranks last.
    """
    num_entities = params["embeddings"].shape[0]
    ranks = []
    for direction, column in (("tail", 2), ("head", 0)):
        answers = known_answers(known, direction)
        for start in range(0, len(test), batch):
            chunk = test[start : start + batch]
            scores = query_vectors(params, chunk, direction) @ params["embeddings"].T
            true = chunk[:, column]
            true_scores = scores.gather(1, true.unsqueeze(1))
            for row, (h, r, t) in enumerate(chunk.tolist()):
                key = (h, r) if direction == "tail" else (r, t)
                # Every known answer, the true one too: its score is kept in true_scores.
                scores[row, answers[key]] = float("-inf")
            higher = (scores > true_scores).sum(1)
            equal = (scores == true_scores).sum(1)
            rank = 1 + higher + equal / 2
            ranks.append(torch.where(true_scores.squeeze(1).isnan(), float(num_entities), rank))
    return torch.cat(ranks)


def evaluate(dataset_dir: Path, config: ConfigSchema) -> dict[str, float]:
    names = ENTITY_STORAGES.make_instance(config.entity_path).load_names(ENTITY, 0)
    relation_names = RELATION_TYPE_STORAGES.make_instance(config.entity_path).load_names()
    entities = {name: i for i, name in enumerate(names)}
    relations = {name: i for i, name in enumerate(relation_names)}
    splits = {split: read_triples(dataset_dir, split, entities, relations) for split in SPLITS}
    params = load_checkpoint(config)
    check_against_pbg(config, params, splits["test"][:64])
    ranks = filtered_ranks(params, splits["test"], torch.cat(list(splits.values())))
    metrics = {"mrr": ranks.reciprocal().mean().item()}
    metrics.update({f"hits@{k}": (ranks <= k).double().mean().item() for k in HITS_AT})
    return metrics


def count_lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def run(args: argparse.Namespace, work: Path) -> dict:
    config = make_config(work, args)
    set_logging_verbosity(config.verbose)
    subprocess_init = SubprocessInitializer()
    subprocess_init.register(setup_logging, config.verbose)
    import_dataset(args.dataset_dir, config, work)
    times = train_timed(config, subprocess_init)
    starts, ends = times["starts"], times["ends"]
    # Epochs 2..N: the first holds the spawn of the worker pool and PBG's hogwild_delay (2 s by default,
    # during which all workers but the first wait in epoch 1).
    seconds = sum(end - start for start, end in zip(starts[1:], ends[1:], strict=True))
    timed_epochs = args.epochs - 1
    positives = count_lines(args.dataset_dir / "train.txt")
    result = {
        "positives_per_s": timed_epochs * positives / seconds,
        "seconds": seconds,
        "epochs": timed_epochs,
        "train_seconds": times["run"][1] - times["run"][0],
        # Left out of "seconds": the checkpoints PBG wrote between the timed epochs (after epochs 1..N-1).
        "checkpoint_seconds": sum(start - end for start, end in zip(starts[1:], ends[:-1], strict=True)),
    }
    if args.eval:
        result.update(evaluate(args.dataset_dir, config))
    return result


def main() -> None:
    args = parse_args()
    real_stdout = stdout_to_stderr()
    setup_logging()
    torch.manual_seed(0)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        result = run(args, args.work)
    else:
        with tempfile.TemporaryDirectory(prefix="pbg-peer-") as work:
            result = run(args, Path(work))
    print(json.dumps(result), file=real_stdout, flush=True)


if __name__ == "__main__":  # PBG's worker pool uses spawn, which re-imports this module
    main()
