"""Helper for test_train.py: the feature cache of the tiny synthetic dataset's training split.

Run in a fresh process so XLA_FLAGS (forced host devices) and jax.distributed take effect:
  python tests/scripts/extract_features.py TFDS_DIR OUT.npz [--coordinator HOST:PORT --num-processes N --process-id I]
Writes h_in and the image keys as every process holds them after feature_cache.extract_features.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from distributed_args import parse_and_initialize  # noqa: E402  (this folder)

p = argparse.ArgumentParser()
p.add_argument("tfds_dir")
p.add_argument("out")
args = parse_and_initialize(p)

from configs import demo  # noqa: E402
from maskad_jax.app import pipeline  # noqa: E402
from maskad_jax.common.specs import resolve  # noqa: E402
from maskad_jax.training import feature_cache  # noqa: E402

c = demo.get_config("smoke")
c.data.tfds_dir = args.tfds_dir
c.data.eval_batch_size = 4
s = resolve(c)
_, train_data, _ = pipeline.load_data(s.data)
feats = feature_cache.extract_features(
    feature_cache.make_extractor(s.model, s.train.seed), train_data, s.data, feature_cache.FeatureRequest(True)
)
h_in, h_tgt, keys = feats.h_in, feats.h_tgt, feats.keys
np.savez(args.out, h_in=h_in, h_tgt=h_tgt, keys=keys, processes=jax.process_count(), devices=jax.device_count())
