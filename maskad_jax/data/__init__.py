"""Images into model inputs: decoding and preprocessing, the geometry (crop / resize / pad), tiles,
ignore masks, and the splits read from the TFDS builders (tfds_builders/).
"""
