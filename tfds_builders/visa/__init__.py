from tfds_builders.visa.visa import *  # noqa: F401,F403
