from tfds_builders.synthetic.synthetic import *  # noqa: F401,F403
