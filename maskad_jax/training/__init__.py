"""Everything run once per trained model: backbone features, the pools' fit, the reconstructor's step,
loop and checkpoints, the flow's training, calibration on held-out images, thresholds, learning
curves.
"""
