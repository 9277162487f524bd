from tfds_builders.mvtec_ad.mvtec_ad import *  # noqa: F401,F403
