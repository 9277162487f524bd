"""The configs, as files to pass to run.py (`--config=configs/demo.py:smoke`): each re-exports the one
shipped in the package (maskad_jax/configs/, where every field is defined and explained), which
`--config=demo:smoke` names from any directory once the package is installed."""
