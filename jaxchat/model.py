"""The nanochat GPT (reference commit 348fbb3) in Flax NNX, with a layer stack that scans over window-pattern repeats.

Parameters are float32 and stored stacked over layers (Flax kernel layout (in, out), leading axis = layer), so
the forward pass can `lax.scan` over repeats of the window pattern and compile time stays flat in depth.

Parameter tree (`nnx.state(model, nnx.Param)`):
  wte (Vp, n) | lm_head (n, Vp) | resid_lambdas (L,) | x0_lambdas (L,) | value_embeds (n_ve, Vp, n)
  blocks/{c_q (L, n, H*D), c_k (L, n, Hkv*D), c_v (L, n, Hkv*D), c_proj (L, H*D, n),
          c_fc (L, n, 4n), mlp_proj (L, 4n, n), ve_gate (n_ve, 32, Hkv)}
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxchat.common import UserError

SOFTCAP = 15.0
VE_GATE_CHANNELS = 32  # the value-embedding gate reads the first 32 channels of the normalised block input
ROPE_BASE = 10000.0
VOCAB_PAD = 64
RMS_EPS = float(np.finfo(np.float32).eps)  # torch F.rms_norm(eps=None) uses float32 eps, also for bf16 inputs


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Model shape (the fields of nanochat's GPTConfig)."""

    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"

    def __post_init__(self):
        pattern = self.window_pattern.upper()
        if not pattern or set(pattern) - {"S", "L"}:
            raise UserError(f"--window-pattern={self.window_pattern!r} must use only the letters S and L, e.g. SSSL or L")
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise UserError(f"n_embd {self.n_embd} must divide by n_head {self.n_head}, which must divide by n_kv_head {self.n_kv_head}")
        object.__setattr__(self, "window_pattern", pattern)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab(self) -> int:
        return math.ceil(self.vocab_size / VOCAB_PAD) * VOCAB_PAD

    @property
    def window_sizes(self) -> tuple[int, ...]:
        """Left attention window per layer: L = sequence_len, S = sequence_len // 2; the last layer is always L."""
        sizes = [self.sequence_len if self.window_pattern[i % len(self.window_pattern)] == "L" else self.sequence_len // 2
                 for i in range(self.n_layer)]
        sizes[-1] = self.sequence_len
        return tuple(sizes)

    @property
    def ve_layers(self) -> tuple[int, ...]:
        """Layers with a value embedding: alternating, the last layer always included."""
        return tuple(i for i in range(self.n_layer) if i % 2 == (self.n_layer - 1) % 2)


def config_for_depth(depth: int, *, aspect_ratio: int = 64, head_dim: int = 128, max_seq_len: int = 2048,
                     vocab_size: int = 32768, window_pattern: str = "SSSL") -> GPTConfig:
    """The one dial: width = depth * aspect_ratio rounded up to a multiple of head_dim, heads = width / head_dim."""
    for name, value in (("--depth", depth), ("--aspect-ratio", aspect_ratio), ("--head-dim", head_dim),
                        ("--max-seq-len", max_seq_len)):
        if value <= 0:
            raise UserError(f"{name}={value} must be a positive integer (e.g. --depth=12)")
    model_dim = math.ceil(depth * aspect_ratio / head_dim) * head_dim
    n_head = model_dim // head_dim
    return GPTConfig(sequence_len=max_seq_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_kv_head=n_head, n_embd=model_dim, window_pattern=window_pattern)


# ----------------------------------------------------------------------------------------------------------------
# Building blocks


def rmsnorm(x: jax.Array) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) over the last axis, computed in float32, returned in x's dtype; no gain."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + RMS_EPS)).astype(x.dtype)


@functools.lru_cache(maxsize=16)
def rotary_tables(seq_len: int, head_dim: int, base: float = ROPE_BASE) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of shape (seq_len, head_dim/2): computed in float32 then rounded to bfloat16, as the reference does."""
    inv_freq = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    angle = np.outer(np.arange(seq_len, dtype=np.float32), inv_freq.astype(np.float32))
    return np.cos(angle).astype(jnp.bfloat16), np.sin(angle).astype(jnp.bfloat16)


def apply_rotary(x_BTHD: jax.Array, cos_TD: jax.Array, sin_TD: jax.Array) -> jax.Array:
    """Half-split rotary with the reference's sign (a rotation by -angle, so nanochat checkpoints load unchanged)."""
    half = x_BTHD.shape[-1] // 2
    x1, x2 = x_BTHD[..., :half], x_BTHD[..., half:]
    cos, sin = cos_TD[None, :, None, :].astype(x_BTHD.dtype), sin_TD[None, :, None, :].astype(x_BTHD.dtype)
    return jnp.concatenate([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], axis=-1)


def attention(q_BTHD: jax.Array, k_BTKD: jax.Array, v_BTKD: jax.Array, window_left: int) -> jax.Array:
    """Causal attention where query t sees keys t-window_left..t; the cuDNN flash kernel on GPU, XLA elsewhere."""
    seq_len = q_BTHD.shape[1]
    local = None if window_left >= seq_len else (window_left, 0)  # plain causal is the fastest kernel
    on_gpu = jax.default_backend() == "gpu" and q_BTHD.dtype in (jnp.bfloat16, jnp.float16)
    return jax.nn.dot_product_attention(q_BTHD, k_BTKD, v_BTKD, is_causal=True, local_window_size=local,
                                        implementation="cudnn" if on_gpu else "xla")


def cached_attention(q_B1HD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, pos: jax.Array,
                     window_left: int) -> jax.Array:
    """One query at position `pos` against a KV cache: keys pos-window_left..pos are visible."""
    B, _, H, D = q_B1HD.shape
    K = k_BSKD.shape[2]
    q = q_B1HD.reshape(B, K, H // K, D)  # GQA: query heads grouped by their kv head
    scores_BKGS = jnp.einsum("bkgd,bskd->bkgs", q, k_BSKD).astype(jnp.float32) / math.sqrt(D)
    key_pos = jnp.arange(k_BSKD.shape[1])
    visible = (key_pos <= pos) & (key_pos >= pos - window_left)
    probs = jax.nn.softmax(jnp.where(visible, scores_BKGS, -jnp.inf), axis=-1).astype(v_BSKD.dtype)
    return jnp.einsum("bkgs,bskd->bkgd", probs, v_BSKD).reshape(B, 1, H, D)


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Per-token cross-entropy in float32; targets of -1 are ignored and give 0."""
    valid = targets_BT >= 0
    logz = jax.nn.logsumexp(logits_BTV, axis=-1)
    picked = jnp.take_along_axis(logits_BTV, jnp.where(valid, targets_BT, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(valid, logz - picked, 0.0)


def softcapped_logits(x_BTn: jax.Array, lm_head_nV: jax.Array, vocab_size: int) -> jax.Array:
    """float32 logits over the real vocabulary, squashed into (-SOFTCAP, SOFTCAP)."""
    logits = _matmul(x_BTn, lm_head_nV)[..., :vocab_size].astype(jnp.float32)
    return SOFTCAP * jnp.tanh(logits / SOFTCAP)


def chunked_cross_entropy(x_BTn: jax.Array, lm_head_nV: jax.Array, targets_BT: jax.Array, vocab_size: int,
                          chunk: int) -> jax.Array:
    """Per-token losses (B, T) computed `chunk` positions at a time, rematerialised in the backward pass, so the
    (B, T, V) float32 logits never exist at once: at most (B, chunk, V) does, forward and backward."""
    B, T, n = x_BTn.shape
    n_chunks = -(-T // chunk)
    pad = n_chunks * chunk - T
    if pad:  # padded positions get target -1, hence loss 0, and are cut off below
        x_BTn = jnp.pad(x_BTn, ((0, 0), (0, pad), (0, 0)))
        targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)), constant_values=-1)
    x_CBcn = x_BTn.reshape(B, n_chunks, chunk, n).swapaxes(0, 1)
    targets_CBc = targets_BT.reshape(B, n_chunks, chunk).swapaxes(0, 1)

    @jax.checkpoint  # keep only each chunk's inputs; its logits are recomputed in the backward pass
    def one_chunk(x_Bcn, targets_Bc):
        return cross_entropy(softcapped_logits(x_Bcn, lm_head_nV, vocab_size), targets_Bc)

    _, losses_CBc = jax.lax.scan(lambda carry, xs: (carry, one_chunk(*xs)), None, (x_CBcn, targets_CBc))
    return losses_CBc.swapaxes(0, 1).reshape(B, n_chunks * chunk)[:, :T]


def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w in x's (compute) dtype; the float32 master weight is cast per use, like torch autocast."""
    return jnp.einsum("...i,io->...o", x, w.astype(x.dtype))


def block_forward(x_BTn, x0_BTn, idx_BT, layer: dict, *, attend, ve_Vn, ve_gate, cos, sin, n_head: int,
                  n_kv_head: int):
    """One transformer layer: lambda mix, attention (`attend(q, k, v)`, with optional value embedding), relu^2 MLP."""
    B, T, n = x_BTn.shape
    head_dim = n // n_head
    dtype = x_BTn.dtype
    x = (layer["resid_lambda"] * x_BTn.astype(jnp.float32) + layer["x0_lambda"] * x0_BTn.astype(jnp.float32)).astype(dtype)
    a = rmsnorm(x)
    q = _matmul(a, layer["c_q"]).reshape(B, T, n_head, head_dim)
    k = _matmul(a, layer["c_k"]).reshape(B, T, n_kv_head, head_dim)
    v = _matmul(a, layer["c_v"]).reshape(B, T, n_kv_head, head_dim)
    if ve_Vn is not None:
        ve = jnp.take(ve_Vn, idx_BT, axis=0).astype(dtype).reshape(B, T, n_kv_head, head_dim)
        gate_BTK = 2 * jax.nn.sigmoid(_matmul(a[..., :VE_GATE_CHANNELS], ve_gate))
        v = v + gate_BTK[..., None] * ve
    q, k = rmsnorm(apply_rotary(q, cos, sin)), rmsnorm(apply_rotary(k, cos, sin))
    y = attend(q, k, v).reshape(B, T, n)
    x = x + _matmul(y, layer["c_proj"])
    h = jax.nn.relu(_matmul(rmsnorm(x), layer["c_fc"]))
    return x + _matmul(h * h, layer["mlp_proj"])


# Rematerialisation policies per transformer layer (--remat): what the backward pass keeps instead of recomputing.
REMAT_POLICIES = {
    "none": None,  # no jax.checkpoint: every activation is kept
    "block": jax.checkpoint_policies.nothing_saveable,  # keep only each layer's input; recompute the layer
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep the matmul outputs, recompute the rest
}


def remat_layer(fn, remat: str):
    """`fn` wrapped in jax.checkpoint with the named policy ('none' returns it unchanged)."""
    if remat not in REMAT_POLICIES:
        raise UserError(f"--remat={remat!r}: choose one of {', '.join(REMAT_POLICIES)}")
    return fn if remat == "none" else jax.checkpoint(fn, policy=REMAT_POLICIES[remat])


# ----------------------------------------------------------------------------------------------------------------
# The model


class Blocks(nnx.Module):
    """Every transformer layer's matrices, stacked over layers (kernels in (in, out) layout)."""

    def __init__(self, config: GPTConfig, rngs: nnx.Rngs):
        n, L = config.n_embd, config.n_layer
        q_dim, kv_dim = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        bound = math.sqrt(3) / math.sqrt(n)  # uniform bound with std 1/sqrt(n)
        uniform = lambda shape: jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound)
        self.c_q = nnx.Param(uniform((L, n, q_dim)))
        self.c_k = nnx.Param(uniform((L, n, kv_dim)))
        self.c_v = nnx.Param(uniform((L, n, kv_dim)))
        self.c_proj = nnx.Param(jnp.zeros((L, q_dim, n), jnp.float32))
        self.c_fc = nnx.Param(uniform((L, n, 4 * n)))
        self.mlp_proj = nnx.Param(jnp.zeros((L, 4 * n, n), jnp.float32))
        self.ve_gate = nnx.Param(jnp.zeros((len(config.ve_layers), VE_GATE_CHANNELS, config.n_kv_head), jnp.float32))


class GPT(nnx.Module):
    """nanochat's GPT: untied embeddings, value embeddings, sliding windows, QK-norm, relu^2, softcapped logits."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs, compute_dtype=jnp.float32, scan_layers: bool = True,
                 remat: str = "none", loss_chunk: int = 0, embed_dtype=jnp.float32):
        """remat: per-layer policy (REMAT_POLICIES); loss_chunk > 0: chunked cross-entropy over that many positions;
        embed_dtype: storage dtype of wte and value_embeds (bfloat16 like the reference on CUDA)."""
        remat_layer(lambda: None, remat)  # validate the name now
        if loss_chunk < 0:
            raise UserError(f"--loss-chunk={loss_chunk} must be 0 (off) or a positive number of positions")
        self.config = config
        self.compute_dtype = jnp.dtype(compute_dtype)
        self.scan_layers = scan_layers
        self.remat = remat
        self.loss_chunk = loss_chunk
        embed_dtype = jnp.dtype(embed_dtype)
        n, L, Vp = config.n_embd, config.n_layer, config.padded_vocab
        bound = math.sqrt(3) / math.sqrt(n)
        self.wte = nnx.Param(jax.random.normal(rngs.params(), (Vp, n), jnp.float32).astype(embed_dtype))
        self.lm_head = nnx.Param(0.001 * jax.random.normal(rngs.params(), (n, Vp), jnp.float32))
        self.blocks = Blocks(config, rngs)
        self.resid_lambdas = nnx.Param(jnp.ones((L,), jnp.float32))
        self.x0_lambdas = nnx.Param(jnp.full((L,), 0.1, jnp.float32))
        kv_dim = config.n_kv_head * config.head_dim
        self.value_embeds = nnx.Param(
            jax.random.uniform(rngs.params(), (len(config.ve_layers), Vp, kv_dim), jnp.float32, -bound,
                               bound).astype(embed_dtype))

    def __call__(self, idx_BT: jax.Array, targets_BT: jax.Array | None = None, *, reduction: str = "mean"):
        """Softcapped float32 logits (B, T, vocab), or with targets the mean loss (reduction='none': per-token losses)."""
        x_BTn = self.hidden_states(idx_BT)
        if targets_BT is None:
            return softcapped_logits(x_BTn, self.lm_head[...], self.config.vocab_size)
        if self.loss_chunk:
            losses_BT = chunked_cross_entropy(x_BTn, self.lm_head[...], targets_BT, self.config.vocab_size,
                                              self.loss_chunk)
        else:
            losses_BT = cross_entropy(softcapped_logits(x_BTn, self.lm_head[...], self.config.vocab_size), targets_BT)
        if reduction == "none":
            return losses_BT
        return losses_BT.sum() / jnp.maximum((targets_BT >= 0).sum(), 1)

    def hidden_states(self, idx_BT: jax.Array) -> jax.Array:
        """Final normalised hidden states (B, T, n) before the lm_head."""
        cfg = self.config
        T = idx_BT.shape[1]
        if T > 10 * cfg.sequence_len:
            raise UserError(f"sequence of {T} tokens exceeds the rotary cache of {10 * cfg.sequence_len}")
        cos, sin = (jnp.asarray(t) for t in rotary_tables(T, cfg.head_dim))
        x = rmsnorm(jnp.take(self.wte[...], idx_BT, axis=0).astype(self.compute_dtype))
        x0 = x
        layers = self._layer_arrays()
        ve_of_layer = {layer: j for j, layer in enumerate(cfg.ve_layers)}

        @functools.lru_cache(maxsize=None)  # one wrapped function per window size and VE presence
        def layer_fn(window_left: int, has_ve: bool):
            def one_layer(x, layer, ve_Vn, ve_gate):
                return block_forward(x, x0, idx_BT, layer, attend=functools.partial(attention, window_left=window_left),
                                     ve_Vn=ve_Vn if has_ve else None, ve_gate=ve_gate if has_ve else None, cos=cos,
                                     sin=sin, n_head=cfg.n_head, n_kv_head=cfg.n_kv_head)
            return remat_layer(one_layer, self.remat)

        def run(x, i, layer, arrays, ve_index):
            ve = None if ve_index is None else arrays["value_embeds"][ve_index]
            gate = None if ve_index is None else arrays["ve_gate"][ve_index]
            return layer_fn(cfg.window_sizes[i], ve_index is not None)(x, layer, ve, gate)

        # Layers [0, n_rep * P) are n_rep identical repeats of a period P (window pattern and VE parity): scan them.
        period = math.lcm(len(cfg.window_pattern), 2)
        n_rep = (cfg.n_layer - 1) // period if self.scan_layers else 0
        if n_rep >= 2:
            ve_per_period = period // 2
            stacked = {k: v[: n_rep * period].reshape(n_rep, period, *v.shape[1:]) for k, v in layers.items()
                       if k not in ("value_embeds", "ve_gate")}
            for k in ("value_embeds", "ve_gate"):
                v = layers[k][: n_rep * ve_per_period]
                stacked[k] = v.reshape(n_rep, ve_per_period, *v.shape[1:])

            def period_body(x, arrays):
                for j in range(period):
                    layer = {k: v[j] for k, v in arrays.items() if k not in ("value_embeds", "ve_gate")}
                    ve_index = ve_of_layer.get(j)  # VE positions repeat with the period
                    x = run(x, j, layer, arrays, ve_index)
                return x, None

            x, _ = jax.lax.scan(period_body, x, stacked)
        start = n_rep * period if n_rep >= 2 else 0
        for i in range(start, cfg.n_layer):
            layer = {k: v[i] for k, v in layers.items() if k not in ("value_embeds", "ve_gate")}
            x = run(x, i, layer, layers, ve_of_layer.get(i))
        return rmsnorm(x)

    def decode_step(self, token_B: jax.Array, pos: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        """One token per row at position `pos` with a KV cache of fixed shape: (logits (B, vocab), updated cache).

        `cache` = {"k", "v"}: (L, B, max_len, Hkv, D) from `init_cache`. Layers run unrolled; shapes never change,
        so a whole generation compiles once.
        """
        cfg = self.config
        idx_BT = token_B[:, None]
        cos_full, sin_full = (jnp.asarray(t) for t in rotary_tables(cache["k"].shape[2], cfg.head_dim))
        cos = jax.lax.dynamic_slice_in_dim(cos_full, pos, 1)
        sin = jax.lax.dynamic_slice_in_dim(sin_full, pos, 1)
        x = rmsnorm(jnp.take(self.wte[...], idx_BT, axis=0).astype(self.compute_dtype))
        x0 = x
        layers = self._layer_arrays()
        ve_of_layer = {layer: j for j, layer in enumerate(cfg.ve_layers)}
        new_k, new_v = [], []
        for i in range(cfg.n_layer):
            def attend(q, k, v, i=i):
                k_cache = jax.lax.dynamic_update_slice_in_dim(cache["k"][i], k.astype(cache["k"].dtype), pos, axis=1)
                v_cache = jax.lax.dynamic_update_slice_in_dim(cache["v"][i], v.astype(cache["v"].dtype), pos, axis=1)
                new_k.append(k_cache)
                new_v.append(v_cache)
                return cached_attention(q, k_cache, v_cache, pos, cfg.window_sizes[i])
            j = ve_of_layer.get(i)
            layer = {k: v[i] for k, v in layers.items() if k not in ("value_embeds", "ve_gate")}
            x = block_forward(x, x0, idx_BT, layer, attend=attend, cos=cos, sin=sin, n_head=cfg.n_head,
                              n_kv_head=cfg.n_kv_head, ve_Vn=None if j is None else layers["value_embeds"][j],
                              ve_gate=None if j is None else layers["ve_gate"][j])
        logits = _matmul(rmsnorm(x), self.lm_head[...])[:, 0, : cfg.vocab_size].astype(jnp.float32)
        return SOFTCAP * jnp.tanh(logits / SOFTCAP), {"k": jnp.stack(new_k), "v": jnp.stack(new_v)}

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        """An empty KV cache for `decode_step`."""
        cfg = self.config
        shape = (cfg.n_layer, batch_size, max_len, cfg.n_kv_head, cfg.head_dim)
        return {"k": jnp.zeros(shape, self.compute_dtype), "v": jnp.zeros(shape, self.compute_dtype)}

    def _layer_arrays(self) -> dict[str, jax.Array]:
        """Per-layer arrays with a leading layer axis (VE arrays: leading VE-layer axis)."""
        b = self.blocks
        return dict(c_q=b.c_q[...], c_k=b.c_k[...], c_v=b.c_v[...], c_proj=b.c_proj[...], c_fc=b.c_fc[...],
                    mlp_proj=b.mlp_proj[...], resid_lambda=self.resid_lambdas[...], x0_lambda=self.x0_lambdas[...],
                    value_embeds=self.value_embeds[...], ve_gate=b.ve_gate[...])


# ----------------------------------------------------------------------------------------------------------------
# Counting (spec §2)


def abstract_model(config: GPTConfig) -> GPT:
    """The model with shapes only (no memory allocated): for counting and checkpoint targets."""
    return nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0)))


def num_scaling_params(config: GPTConfig) -> dict[str, int]:
    """Parameter counts by group, read off the (abstract) model; 'scaling' = transformer_matrices + lm_head."""
    sizes = {"/".join(str(k) for k in path): int(np.prod(v.shape))
             for path, v in nnx.to_flat_state(nnx.state(abstract_model(config), nnx.Param))}
    counts = {
        "wte": sizes.pop("wte"),
        "value_embeds": sizes.pop("value_embeds"),
        "lm_head": sizes.pop("lm_head"),
        "transformer_matrices": sum(v for k, v in sizes.items() if k.startswith("blocks/")),
        "scalars": sizes.pop("resid_lambdas") + sizes.pop("x0_lambdas"),
    }
    assert all(k.startswith("blocks/") for k in sizes), f"uncounted parameters: {sorted(sizes)}"
    counts["total"] = sum(counts.values())
    counts["scaling"] = counts["transformer_matrices"] + counts["lm_head"]
    return counts


def estimate_flops(config: GPTConfig) -> int:
    """Training FLOPs per token: 6 x matmul params + attention (12 * H * D * window per layer, not halved)."""
    counts = num_scaling_params(config)
    matmul_params = counts["total"] - counts["wte"] - counts["value_embeds"] - counts["scalars"]
    attn = sum(12 * config.n_head * config.head_dim * min(w, config.sequence_len) for w in config.window_sizes)
    return 6 * matmul_params + attn
