"""Helper for test_train.py: trains a tiny reconstructor on fixed random features, prints the losses
and the size of the training mesh it used.

Run in a fresh process so XLA_FLAGS (forced host devices) and jax.distributed take effect:
  python tests/scripts/train_losses.py [--train-devices all|one|auto]
      [--coordinator HOST:PORT --num-processes N --process-id I]
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from distributed_args import parse_and_initialize  # noqa: E402  (this folder)

parser = argparse.ArgumentParser()
parser.add_argument("--train-devices", default="all")
args = parse_and_initialize(parser)

from configs import default  # noqa: E402
from maskad_jax.common.parallel import training_mesh  # noqa: E402
from maskad_jax.common.specs import resolve  # noqa: E402
from maskad_jax.training.train import train  # noqa: E402

c = default.get_config()
r = c.model.reconstructor
r.embed_dim, r.encoder_depth, r.decoder_depth, r.num_heads = 32, 1, 1, 2
c.train.epochs, c.train.batch_size, c.train.warmup_epochs, c.train.log_every = 2, 8, 1, 1000
c.train.devices = args.train_devices
s = resolve(c)
h = np.random.default_rng(0).normal(size=(24, 4, 4, 8)).astype(np.float32)
res = train(s.train, s.model, s.data.image_size, h, None, None, log=lambda *_: None)
print(
    json.dumps(
        {
            "devices": jax.device_count(),
            "mesh": int(training_mesh(c.train.devices).devices.size),
            "processes": jax.process_count(),
            "losses": [loss for _, loss in res.losses],
        }
    )
)
