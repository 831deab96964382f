"""The edge: the kltd commands, the Hydra entry of kltd train, the sweep-end callback, process-wide settings. The
only layer that imports Hydra.
"""
