"""Pure functions of logits: divergences, the chunked autograd, one-token estimators, the losses, offline-RL
weights, the fused head.
"""
