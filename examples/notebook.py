# %% [markdown]
# # nvkg from Python
#
# Train a variational ComplEx (V-ComplEx, LIM) on the bundled *nations* graph, ask it for the tail of a
# test fact with probabilities, calibrate those probabilities on validation, classify facts, and export
# the Gaussian embeddings. Every call is a function of `trainer.api`, the same code the `nvkg` commands
# run. Open this file as a notebook (VS Code, Jupyter with jupytext) or run it: `python examples/notebook.py`
# where nvkg is installed (`pip install .`), or `PYTHONPATH=. python examples/notebook.py` in a checkout.

# %%
import shutil
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

from trainer import api

workdir = Path(tempfile.mkdtemp(prefix="nvkg-notebook-"))

# %% [markdown]
# ## Train
# A shipped config (`api.configs_dir()`), with a few keys overridden as `--set` would: a short run, so
# its numbers are modest. `result.metrics` is the run's metrics.json.

# %%
overrides = {"train.epochs": 20, "model.dim": 64, "train.eval_every": 10, "train.progress": False}
result = api.train(api.configs_dir() / "small-nations.yaml", workdir / "run", overrides=overrides)
test = result.metrics["test"]["filtered"]
print(f"run directory: {result.run_dir}")
print(f"test filtered MRR {test['mrr']:.4f}, Hits@10 {test['hits@10']:.4f}")

# %% [markdown]
# ## Predict the tail of a test fact
# A run holds its config, its dataset (ids and names) and its model; load it once and pass it around.

# %%
run = api.load_run(result.run_dir)
entities = run.dataset.names("entities")["name"].to_pylist()
relations = run.dataset.names("relations")["name"].to_pylist()
h, r, t = run.dataset.test[0].tolist()
head, relation, tail = entities[h], relations[r], entities[t]
print(f"test fact: ({head}, {relation}, {tail})")

answers = api.predict(run, head=head, relation=relation, top_k=5, samples=50)
print(api.format_predictions(answers))

# %% [markdown]
# ## Calibrate
# sigmoid(score) of a 1-vs-all model is not the probability that a fact is true. `calibrate` fits that
# probability on validation, reports it on test and stores it with the run; `predict` then adds it.

# %%
fitted = api.calibrate(run, samples=50)
for measure in ("magnitude", "mc_mean"):
    before, after = fitted["test"][measure]["before"], fitted["test"][measure]["after"]
    print(f"{measure}: test ECE {before['ece']:.4f} -> {after['ece']:.4f}")

answers = api.predict(run, head=head, relation=relation, top_k=5, samples=50)
for row in answers["predictions"]:
    mark = "  <- the test fact" if row["tail"] == tail else ""
    print(f"{row['tail']:15s} p(true) {row['calibrated_probability']:.4f}  from p(mean) {row['probability']:.4f}{mark}")

# %% [markdown]
# ## Classify facts as true or false

# %%
classified = api.classify(run)
print(f"triple classification: test accuracy {classified['test']['accuracy']:.4f}, F1 {classified['test']['f1']:.4f}")

# %% [markdown]
# ## Export the embeddings
# One row per entity and relation: its name, train frequency, mean and variance vectors.

# %%
path = api.export(run, workdir / "embeddings.parquet")
table = pq.read_table(path)
print(f"exported {table.num_rows} rows to {path.name}: {', '.join(table.column_names)}")

# %% [markdown]
# ## The uncertainty report
# PNG figures and report.json in RUN/report: variance against frequency, precision against coverage, the
# reliability diagram (with the stored calibration), the confidence study (docs/uncertainty.md).

# %%
summary = api.report(run, samples=20)
areas = ", ".join(f"{name} {area:.4f}" for name, area in summary["precision_coverage_area"].items())
print(f"report figures: {', '.join(sorted(summary['figures']))}")
print(f"precision-coverage area: {areas}")

# %%
shutil.rmtree(workdir)
