"""The jobs a user runs: the config's validation, the workdir, pipeline (train_and_evaluate),
evaluation, predict, update, export, the report.
"""
