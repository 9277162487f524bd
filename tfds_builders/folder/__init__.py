from tfds_builders.folder.folder import *  # noqa: F401,F403
