"""Helper for test_train.py: trains a tiny reconstructor on fixed random features, prints the losses.

Run in a fresh process so XLA_FLAGS (forced host devices) and jax.distributed take effect:
  python tests/scripts/train_losses.py [--coordinator HOST:PORT --num-processes N --process-id I]
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from distributed_args import parse_and_initialize  # noqa: E402  (this folder)

parse_and_initialize()

from configs import default  # noqa: E402
from maskad_jax.train import train  # noqa: E402

c = default.get_config()
r = c.model.reconstructor
r.embed_dim, r.encoder_depth, r.decoder_depth, r.num_heads = 32, 1, 1, 2
c.train.epochs, c.train.batch_size, c.train.warmup_epochs, c.train.log_every = 2, 8, 1, 1000
h = np.random.default_rng(0).normal(size=(24, 4, 4, 8)).astype(np.float32)
res = train(c, h, None, None, log=lambda *_: None)
print(
    json.dumps(
        {"devices": jax.device_count(), "processes": jax.process_count(), "losses": [loss for _, loss in res.losses]}
    )
)
