"""Shared by the helper scripts: the --coordinator/--num-processes/--process-id options, and
jax.distributed.initialize when a coordinator is given."""

import argparse

import jax


def parse_and_initialize(parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    parser = parser or argparse.ArgumentParser()
    parser.add_argument("--coordinator")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    args = parser.parse_args()
    if args.coordinator:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    return args
