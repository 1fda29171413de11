import argparse
import json

from bench.uncertainty import (
    DATASETS,
    MODELS,
    WN18RR_EPOCHS,
    WORDNET,
    rejudged_note,
    results_name,
    run_name,
    trained_metrics,
)
from storage.dataset import load_data
from trainer.config import load_config
from trainer.loop import train


def args(**changes) -> argparse.Namespace:
    default = {"datasets": list(DATASETS), "models": list(MODELS), "negatives": "sampled",
               "wn18rr_epochs": WN18RR_EPOCHS}  # fmt: skip
    return argparse.Namespace(**{**default, **changes})


def test_a_partial_or_longer_run_is_written_beside_the_default_s_not_over_it():
    assert results_name(args()) == "uncertainty"
    assert results_name(args(negatives="typed", datasets=["wn18rr"])) == "uncertainty-typed-wn18rr"
    longer = args(negatives="typed", datasets=["wn18rr"], models=["V-ComplEx (LIM)"], wn18rr_epochs=20)
    assert results_name(longer) == "uncertainty-typed-wn18rr-v-complex-20epochs"
    # Another WN18RR length names nothing else differently.
    assert results_name(args(datasets=["nations"], wn18rr_epochs=20)) == "uncertainty-nations"
    typed = args(negatives="typed")
    names = {run_name(d, m, s, a) for d in DATASETS for m in MODELS for s in (0, 1) for a in (typed, longer)}
    assert len(names) == len(DATASETS) * len(MODELS) * 2 + len(WORDNET) * len(MODELS) * 2  # longer: WordNet's only
    assert run_name("wn18rr", "V-ComplEx (LIM)", 1, longer) == "uncertainty-typed-wn18rr-v-complex-20epochs-seed1"
    assert run_name("wn18rr", "V-DistMult (LIM)", 0, args()) == "uncertainty-wn18rr-v-distmult-seed0"
    # WN18 trains as WN18RR does: its length names its runs and results too.
    assert run_name("wn18", "V-ComplEx (LIM)", 2, args(wn18rr_epochs=20)) == "uncertainty-wn18-v-complex-20epochs-seed2"
    assert results_name(args(datasets=["wn18"])) == "uncertainty-wn18"
    assert results_name(args(datasets=["wn18", "nations"], wn18rr_epochs=8)) == "uncertainty-wn18-nations-8epochs"


def test_rejudge_reuses_a_run_only_when_it_was_trained_with_the_same_config_and_training_code(tmp_path):
    config = load_config(None, ["data.dataset=nations", "model.dim=4", "train.epochs=1", "train.progress=false",
                                f"data.cache_dir={tmp_path / 'cache'}"])  # fmt: skip
    dataset = load_data(config.data)
    assert trained_metrics(config, tmp_path / "run", dataset) is None  # nothing trained there
    metrics = train(config, tmp_path / "run")
    assert trained_metrics(config, tmp_path / "run", dataset) == json.loads(json.dumps(metrics))
    other = load_config(None, ["data.dataset=nations", "model.dim=4", "train.epochs=1", "train.progress=false",
                               f"data.cache_dir={tmp_path / 'cache'}", "train.seed=1"])  # fmt: skip
    assert trained_metrics(other, tmp_path / "run", dataset) is None
    # The same config trained by other training code, by another torch, or before the code was recorded.
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    ours = written["code"]
    for code in ({**ours, "training_code": "0" * 64}, {**ours, "torch": "2.0.0"}, {"mixed": [ours, ours]}, None):
        (tmp_path / "run" / "metrics.json").write_text(json.dumps({**written, "code": code}))
        assert trained_metrics(config, tmp_path / "run", dataset) is None
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(written))
    assert trained_metrics(config, tmp_path / "run", dataset) == written
    (tmp_path / "run" / "metrics.json").write_text("{not json")
    assert trained_metrics(config, tmp_path / "run", dataset) is None


def test_the_header_names_the_runs_judged_again_rather_than_trained():
    rows = [{"dataset": "wn18rr", "model": "V-ComplEx (LIM)", "rejudged": [True, True]},
            {"dataset": "nations", "model": "V-DistMult (LIM)", "rejudged": [False, False]}]  # fmt: skip
    assert rejudged_note(rows) == ("2 of 4 runs (wn18rr V-ComplEx (LIM)) judged again (--rejudge) from checkpoints "
                                   "an earlier benchmark trained with the same config and training code. ")  # fmt: skip
    assert rejudged_note(rows[1:]) == "" and rejudged_note([{"dataset": "umls", "model": "m"}]) == ""
