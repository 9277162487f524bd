from tfds_builders.real_iad.real_iad import *  # noqa: F401,F403
