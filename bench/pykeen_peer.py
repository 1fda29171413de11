"""Runs inside the separate PyKEEN environment (bench/.venv-pykeen): times PyKEEN's sLCWA loop.

Prints one JSON line: positives/s of ComplEx with the benchmark's shared settings.
"""

import json
import sys
import time

import torch
from pykeen.models import ComplEx
from pykeen.training import SLCWATrainingLoop
from pykeen.triples import TriplesFactory

train_path, complex_dim, negatives, batch_size, epochs, threads = sys.argv[1:7]
torch.set_num_threads(int(threads))
factory = TriplesFactory.from_path(train_path)
model = ComplEx(triples_factory=factory, embedding_dim=int(complex_dim), random_seed=0)
loop = SLCWATrainingLoop(
    model=model,
    triples_factory=factory,
    optimizer=torch.optim.Adam(model.get_grad_params(), lr=1e-3),
    negative_sampler_kwargs={"num_negs_per_pos": int(negatives)},
)
started = time.perf_counter()
loop.train(triples_factory=factory, num_epochs=int(epochs), batch_size=int(batch_size), use_tqdm=False)
seconds = time.perf_counter() - started
num_positives = int(epochs) * factory.num_triples
print(json.dumps({"positives_per_s": num_positives / seconds, "seconds": seconds, "epochs": int(epochs)}))
