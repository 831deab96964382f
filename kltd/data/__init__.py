"""Examples from any source (the built-in task, files, hub datasets), row formats, chat templates, answer
checkers, the data order.
"""
