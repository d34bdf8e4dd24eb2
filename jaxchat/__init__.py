"""jaxchat: nanochat base-model pretraining in JAX / Flax NNX.

Tensor names end in their shape, one letter per axis (`x_BTn`: batch rows x positions x width), the same letters in
every module:

    B  batch rows                 T  positions (query positions in attention)    S  key positions (a KV cache's length)
    n  model width (n_embd)       H  query heads       K  key/value heads          D  head dimension
    G  query heads per key/value head (H = K G)
    V  vocabulary (padded: Vp)    L  layers            N  blocks of positions (a loss head's blocks or chunks)
    E  value-embedding layers     C  a gate's input channels (Cs: the smear gate's)
    R  rows of a flattened batch (tokens; examples in CORE)
    i, o   a dense layer's input and output features
    M, O, I    Muon: matrices of a stack, rows (fan_out) and columns (fan_in) in the reference orientation
    t, s   a block's share of T and S; a digit is a literal size (`spans_R2`, `gate_BT1`)
A parameter's declared shape (jaxchat.model.params) writes products as adjacent letters: HD = H x D, 4n = 4 x n.
"""
