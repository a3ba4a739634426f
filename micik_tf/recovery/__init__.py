"""Recovery: training a compressed student back to its teacher's accuracy.

The losses (`losses`: cross-layer similarity, inheritance, logits KD), the
data (`datasets` for the sources and their fixed splits, `pipeline` for
batching), the distribution strategies (`strategies`), the custom training
loop (`trainer`) and the accuracy all of them report (`evaluation`).
"""
