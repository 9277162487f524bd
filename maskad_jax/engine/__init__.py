"""The pure test-time program: masks, nominal pools (k-center, nearest neighbours), M_po, the OT
(association), the scoring stages, smoothing, the metrics. Jittable; no file I/O.
"""
