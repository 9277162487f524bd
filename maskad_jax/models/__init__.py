"""The networks and their weights: the Flax EfficientNet (and its feature taps), the masked ViT
reconstructor, the conditional flow, and the weight readers and converter.
"""
