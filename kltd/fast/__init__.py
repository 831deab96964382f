"""The fast path for Llama-family models: arranged weights, the packed forward, the lean decoder, the memory
setting.
"""
