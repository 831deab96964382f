"""The vocabulary: the config schema and its checks, the valid option names, the method matrix (trajectories, KL
directions, names).
"""
