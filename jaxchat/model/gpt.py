"""The nanochat GPT in Flax NNX, for two nanochat commits ("recipes"), with a layer stack that scans over
window-pattern repeats.

Recipe 348fbb3 is nanochat's January model; recipe 92d63d4 (nanochat HEAD) adds smear and backout, a 12-channel x3
value-embedding gate, QK x1.2, RoPE base 100000, quarter-context short windows and new initialisations. What differs
is data: one `ModelRecipe` per commit in jaxchat.model.architecture.MODEL_RECIPES, chosen by `GPTConfig.recipe`.

Parameters are float32 and stored stacked over layers (Flax kernel layout (in, out), leading axis = layer), so
the forward pass can `lax.scan` over repeats of the window pattern and compile time stays flat in depth. Each one is
declared once, with its shape, sharding, initial value and nanochat name, in jaxchat.model.params.PARAMS.

Top to bottom: GPTConfig; the building blocks (norm, rotary, embedding lookup); one transformer layer
(`block_forward`: attention inputs, attention, MLP); the layer stack (`layer_runs`: which layers one scan covers);
the GPT (`hidden_states` -> `_trunk` -> `block_forward`, and `decode_step`); the parameter and FLOP counts.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxchat.model import architecture
from jaxchat.model import attention as attentionlib
from jaxchat.model import dense
from jaxchat.model import loss as losslib
from jaxchat.model import mesh as meshlib
from jaxchat.model import params as paramslib
from jaxchat.model import remat as rematlib
from jaxchat.runtime import backend as backendlib
from jaxchat.runtime.common import UserError

VOCAB_PAD = 64
RMS_EPS = float(np.finfo(np.float32).eps)  # torch F.rms_norm(eps=None) uses float32 eps, also for bf16 inputs
LAYER_SCAN = "layer_scan"  # the name scope of the scan over repeated layers (GPT._trunk; jaxchat.training.inventory reads it)




@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Model shape (the fields of nanochat's GPTConfig) and the nanochat commit whose model it is."""

    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"
    recipe: str = architecture.DEFAULT

    def __post_init__(self):
        pattern = self.window_pattern.upper()
        if not pattern or set(pattern) - {"S", "L"}:  # library guard: the command line refuses it first (config.validate)
            raise ValueError(f"window_pattern {self.window_pattern!r} must use only the letters S and L")
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise UserError(f"n_embd {self.n_embd} must divide by n_head {self.n_head}, which must divide by n_kv_head {self.n_kv_head}")
        if self.recipe not in architecture.MODEL_RECIPES:
            raise UserError(f"recipe {self.recipe!r} is not one of {', '.join(architecture.MODEL_RECIPES)}")
        object.__setattr__(self, "window_pattern", pattern)

    @property
    def constants(self) -> architecture.ModelRecipe:
        """The recipe's model constants."""
        return architecture.MODEL_RECIPES[self.recipe]

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab(self) -> int:
        return math.ceil(self.vocab_size / VOCAB_PAD) * VOCAB_PAD

    @property
    def window_sizes(self) -> tuple[int, ...]:
        """Left attention window per layer: L = sequence_len, S = the recipe's short window; the last layer is L."""
        short = self.constants.short_window(self.sequence_len)
        sizes = [self.sequence_len if self.window_pattern[i % len(self.window_pattern)] == "L" else short
                 for i in range(self.n_layer)]
        sizes[-1] = self.sequence_len
        return tuple(sizes)

    @property
    def ve_layers(self) -> tuple[int, ...]:
        """Layers with a value embedding: alternating, the last layer always included."""
        return tuple(i for i in range(self.n_layer) if i % 2 == (self.n_layer - 1) % 2)

    def ve_count(self, layer: int) -> int:
        """How many value-embedding layers come before `layer` (= the VE index of `layer` if it has one)."""
        return sum(1 for i in self.ve_layers if i < layer)

    @property
    def backout_layer(self) -> int | None:
        """The layer whose output residual backout subtracts before the final norm (None: no backout)."""
        return self.constants.backout_layer(self.n_layer)


# ----------------------------------------------------------------------------------------------------------------
# Building blocks


def recomputed_when_narrow(fn):
    """fn under jax.checkpoint when its first input is narrower than float32, as is otherwise.

    The elementwise steps computed in float32 inside a bf16 layer (norms, the lambda mix, relu^2) would keep their
    float32 intermediates for the backward pass, in every layer; recomputed from the bf16 input instead, the
    arithmetic and the gradients are the same. Compiled for H100s (jaxchat.aot), d26 at device batch 16 needs 92.9 GiB
    per device instead of 110.3. In a float32 step (CPU) there is no narrower input to keep: nothing is recomputed.

    Without the barrier (prevent_cse=False): jax.checkpoint's default puts the backward's recomputation behind an
    optimisation barrier, which also fences off the incoming gradient, so XLA cannot fuse the scaling of the fp8
    GEMM that produced it into the fp8 quantisation that reads it (each backward fp8 GEMM's output was rescaled in a
    pass of its own) and keeps the forward's scaled MLP input for the backward besides the GEMM's raw output.
    Compiled for 8 H100s and projected with the roofline of docs/performance.md: the record command 1,142 -> 1,069
    ms per step, peak 55.8 -> 53.5 GiB; configs/d24.py (bf16) 634 -> 638 ms, 55.0 -> 52.9 GiB. So the barrier is
    dropped where the backend says so (Backend.recompute_barrier: on GPU), and stays inside a layer that a --remat
    policy recomputes or a scanned run of layers (remat.keeping_barrier), where XLA kept more without it (H100, d24
    at device batch 32, bf16, --remat=dots: 62.2 -> 85.5 GiB), and on TPU (tests/test_aot.py's small v5e step: 0.43
    -> 0.49 GiB)."""
    own = jax.checkpoint(fn, prevent_cse=False)
    kept = jax.checkpoint(fn)

    @functools.wraps(fn)
    def wrapper(x, *args):
        if jnp.dtype(x.dtype).itemsize >= 4:
            return fn(x, *args)
        return (kept if rematlib.keeps_barrier() else own)(x, *args)
    return wrapper


@recomputed_when_narrow
def rmsnorm(x: jax.Array) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) over the last axis, computed in float32, returned in x's dtype; no gain."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + RMS_EPS)).astype(x.dtype)


def scale(x: jax.Array, factor: float) -> jax.Array:
    """factor * x in float32, rounded to x's dtype once: torch's `tensor * python_float` on a bf16 tensor."""
    return (x.astype(jnp.float32) * factor).astype(x.dtype)


@functools.lru_cache(maxsize=16)
def rotary_tables(seq_len: int, head_dim: int, base: float = architecture.ModelRecipe.rope_base,
                  dtype=jnp.dtype(architecture.ModelRecipe.rope_dtype)) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of shape (seq_len, head_dim/2): computed in float32 then rounded to `dtype`, as the reference does."""
    inv_freq = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    angle = np.outer(np.arange(seq_len, dtype=np.float32), inv_freq.astype(np.float32))
    return np.cos(angle).astype(dtype), np.sin(angle).astype(dtype)


def apply_rotary(x_BTHD: jax.Array, cos_TD: jax.Array, sin_TD: jax.Array) -> jax.Array:
    """Half-split rotary with the reference's sign (a rotation by -angle, so nanochat checkpoints load unchanged)."""
    half = x_BTHD.shape[-1] // 2
    x1, x2 = x_BTHD[..., :half], x_BTHD[..., half:]
    cos, sin = cos_TD[None, :, None, :].astype(x_BTHD.dtype), sin_TD[None, :, None, :].astype(x_BTHD.dtype)
    return jnp.concatenate([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], axis=-1)




def lookup(table_Vn: jax.Array, idx_BT: jax.Array, dtype) -> jax.Array:
    """Rows of an embedding table in the compute dtype, gathered from the table rounded to it (the same values as
    rounding after the gather): the gathered rows and their gradient before the scatter-add into the table are then
    bf16 in a bf16 step, as in nanochat, whose tables are bf16 on CUDA (gpt.py GPT.init_weights), not float32 copies
    per token and layer (d26 at device batch 16: 2.6 GiB each, measured with jaxchat.aot)."""
    return jnp.take(table_Vn.astype(dtype), idx_BT, axis=0)


@recomputed_when_narrow
def _mix(x_BTn, x0_BTn, resid_lambda, x0_lambda):
    """resid_lambda * x + x0_lambda * x0 in float32, rounded to x's dtype (nanochat gpt.py GPT.forward)."""
    return (resid_lambda * x_BTn.astype(jnp.float32) + x0_lambda * x0_BTn.astype(jnp.float32)).astype(x_BTn.dtype)


@recomputed_when_narrow  # and keep the MLP's input only, not relu's output and its mask as well
def _relu_squared(h: jax.Array) -> jax.Array:
    """relu(h)^2 (nanochat gpt.py MLP.forward)."""
    h = jax.nn.relu(h)
    return h * h


# ----------------------------------------------------------------------------------------------------------------
# One transformer layer (nanochat gpt.py Block.forward). `layer` holds the layer's slice of each per-layer parameter
# (jaxchat.model.params), by name; `matmul(x, w)` is every dense layer's matmul (GPT.train_matmul or GPT.plain_matmul).


def attention_inputs(a_BTn, idx_BT, layer: dict, *, cos, sin, config: GPTConfig, matmul):
    """q, k, v of one layer from its normalised input (nanochat gpt.py CausalSelfAttention.forward up to the
    attention): the value embedding gated into v where the layer has one (`layer["value_embeds"]` is not None), then
    rotary, QK-norm and the recipe's QK scale."""
    B, T, _ = a_BTn.shape
    c = config.constants
    q = matmul(a_BTn, layer["c_q"]).reshape(B, T, config.n_head, config.head_dim)
    k = matmul(a_BTn, layer["c_k"]).reshape(B, T, config.n_kv_head, config.head_dim)
    v = matmul(a_BTn, layer["c_v"]).reshape(B, T, config.n_kv_head, config.head_dim)
    if layer["value_embeds"] is not None:
        ve = lookup(layer["value_embeds"], idx_BT, a_BTn.dtype).reshape(v.shape)
        gate_BTK = scale(jax.nn.sigmoid(matmul(a_BTn[..., :c.ve_gate_channels], layer["ve_gate"])), c.ve_gate_scale)
        v = v + gate_BTK[..., None] * ve
    q, k = (scale(rmsnorm(apply_rotary(t, cos, sin)), c.qk_scale) for t in (q, k))
    return q, k, v


def mlp(a_BTn, layer: dict, matmul) -> jax.Array:
    """relu(a @ c_fc)^2 @ mlp_proj (nanochat gpt.py MLP.forward); the up-projection is named for the remat policies."""
    h_BTf = matmul(a_BTn, layer["c_fc"], name="mlp_up")
    return matmul(_relu_squared(h_BTf), layer["mlp_proj"])


def block_forward(x_BTn, layer: dict, *, x0_BTn, idx_BT, attend, cos, sin, config: GPTConfig, matmul):
    """One transformer layer: lambda mix, attention, relu^2 MLP (nanochat gpt.py Block.forward). `attend(q, k, v)`
    -> (output, anything the caller wants back: nothing in training, the updated caches in decoding). Returns
    (x, attend's second output)."""
    B, T, n = x_BTn.shape
    x = _mix(x_BTn, x0_BTn, layer["resid_lambdas"], layer["x0_lambdas"])
    q, k, v = attention_inputs(rmsnorm(x), idx_BT, layer, cos=cos, sin=sin, config=config, matmul=matmul)
    y, kept = attend(q, k, v)
    x = x + matmul(y.reshape(B, T, n), layer["c_proj"])
    return x + mlp(rmsnorm(x), layer, matmul), kept


def sequence_attention(q, k, v, *, window_left: int, backend: backendlib.Backend):
    """`attend` for training and evaluation: the backend's attention kernel over the whole sequence; keeps nothing."""
    return attentionlib.attention(q, k, v, window_left=window_left, impl=backend.attention, mesh=backend.mesh), None


def decode_attention(q, k, v, *, cache: dict, i: int, pos, window_left: int):
    """`attend` for decoding at position `pos`: this token's k, v written into layer i's caches, then attention over
    them; keeps the layer's updated caches."""
    k_cache = jax.lax.dynamic_update_slice_in_dim(cache["k"][i], k.astype(cache["k"].dtype), pos, axis=1)
    v_cache = jax.lax.dynamic_update_slice_in_dim(cache["v"][i], v.astype(cache["v"].dtype), pos, axis=1)
    return attentionlib.cached_attention(q, k_cache, v_cache, pos, window_left), (k_cache, v_cache)


# ----------------------------------------------------------------------------------------------------------------
# The layer stack: runs of layers, scanned where they repeat

def layer_runs(config: GPTConfig, scan: bool) -> list[tuple[int, int, int]]:
    """(start, period, repeats) runs covering the layers in order; runs with repeats >= 2 are scanned.

    Layers repeat with period P = lcm(pattern length, 2) (window and value-embedding parity). Runs end before the
    last layer (always a long window) and after the backout layer, whose output the forward pass keeps.
    """
    L, period = config.n_layer, math.lcm(len(config.window_pattern), 2)
    cuts = {0, L - 1, L} | ({config.backout_layer + 1} if config.backout_layer is not None else set())
    cuts = sorted(cuts)
    runs = []
    for lo, hi in zip(cuts, cuts[1:]):
        repeats = (hi - lo) // period if scan else 0
        if repeats >= 2:
            runs.append((lo, period, repeats))
            lo += period * repeats
        runs += [(i, 1, 1) for i in range(lo, hi)]
    return runs


def _over_ve_layers(name: str) -> bool:
    """Whether a per-layer parameter runs over the value-embedding layers only (a leading E, not L)."""
    return paramslib.named(name).shape[0] == "E"


def run_arrays(layers: dict, config: GPTConfig, start: int, period: int, repeats: int) -> dict:
    """The arrays of a run's layers with leading axes (repeats, period) (VE arrays: (repeats, VE layers per period))."""
    stop = start + period * repeats
    arrays = {}
    for k, v in layers.items():
        lo, hi = (config.ve_count(start), config.ve_count(stop)) if _over_ve_layers(k) else (start, stop)
        arrays[k] = v[lo:hi].reshape(repeats, (hi - lo) // repeats, *v.shape[1:])
    return arrays


def layer_at(arrays: dict, config: GPTConfig, start: int, j: int) -> dict:
    """Layer start + j's arrays from one repeat of a run starting at `start`; VE arrays are None without VE."""
    has_ve = start + j in config.ve_layers
    ve_index = config.ve_count(start + j) - config.ve_count(start)
    return {k: (v[ve_index] if has_ve else None) if _over_ve_layers(k) else v[j] for k, v in arrays.items()}


# ----------------------------------------------------------------------------------------------------------------
# The model


class Blocks(nnx.Module):
    """Every transformer layer's matrices, stacked over layers: the `blocks/*` parameters of jaxchat.model.params, which
    declares each one's shape, sharding, initial value and nanochat name (GPT.__init__ builds them from it)."""

    c_q: nnx.Param  # (L, n, HD) queries (nanochat attn.c_q)
    c_k: nnx.Param  # (L, n, KD) keys, n_kv_head heads (attn.c_k)
    c_v: nnx.Param  # (L, n, KD) values (attn.c_v)
    c_proj: nnx.Param  # (L, HD, n) attention output projection (attn.c_proj)
    c_fc: nnx.Param  # (L, n, 4n) MLP up-projection (mlp.c_fc)
    mlp_proj: nnx.Param  # (L, 4n, n) MLP down-projection (mlp.c_proj)
    ve_gate: nnx.Param  # (E, C, K) per value-embedding layer: how much of its value embedding each kv head takes


class GPT(nnx.Module):
    """nanochat's GPT: untied embeddings, value embeddings, sliding windows, QK-norm, relu^2, softcapped logits,
    and per recipe smear and backout (nanochat gpt.py GPT).

    Its parameters are the annotated attributes below and `blocks`' (tests/test_model.py checks they are exactly
    jaxchat.model.params.PARAMS, which declares each one's shape, sharding, initial value and nanochat name)."""

    wte: nnx.Param  # (V, n) token embedding (nanochat transformer.wte), in embed_dtype
    lm_head: nnx.Param  # (n, V) untied output projection to the (padded) vocabulary
    blocks: Blocks  # the transformer layers' matrices, stacked over layers
    resid_lambdas: nnx.Param  # (L,) per layer: the weight of the residual stream in the layer's input mix
    x0_lambdas: nnx.Param  # (L,) per layer: the weight of the first layer's input x0 in that mix
    smear_gate: nnx.Param  # (Cs, 1) recipes with smear: the gate mixing the previous token's embedding into each
    smear_lambda: nnx.Param  # () recipes with smear: that mix's strength
    backout_lambda: nnx.Param  # () recipes with backout: how much mid-stack residual to subtract before the final norm
    value_embeds: nnx.Param  # (E, V, KD) per value-embedding layer: a token's embedding added to the attention values

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs, compute_dtype=jnp.float32, scan_layers: bool | None = None,
                 remat: str = "none", loss_chunk: int = 0, embed_dtype=jnp.float32, fp8: bool = False,
                 backend: backendlib.Backend | None = None):
        """remat: per-layer policy (jaxchat.model.remat.REMAT_POLICIES); loss_chunk > 0: chunked cross-entropy over that
        many positions; embed_dtype: storage dtype of wte and value_embeds (bfloat16 like the reference on CUDA); fp8:
        the forward and backward pass (`__call__`) run the qualifying dense layers in fp8 (jaxchat.model.fp8),
        decode_step never; backend: the attention kernel and loss head of the devices the model runs on (None: this
        process's); scan_layers: scan repeated layers (None: the backend's choice, Backend.scan_layers)."""
        rematlib.remat_layer(lambda: None, remat)  # validate the name now
        self.config = config
        self.compute_dtype = jnp.dtype(compute_dtype)
        self.remat = remat
        self.loss_chunk = loss_chunk
        self.backend = backend or backendlib.local(self.compute_dtype.name)
        self.scan_layers = self.backend.scan_layers if scan_layers is None else scan_layers
        self.plain_matmul = dense.choose(self.backend)  # never fp8: decode_step and the smear gate
        self.set_fp8(fp8)
        self.blocks = Blocks()
        for p in paramslib.declared(config):  # in table order, which is the order initial values are drawn in
            setattr(self._holder(p), p.name, nnx.Param(p.initial(config, rngs, jnp.dtype(embed_dtype))))

    def __call__(self, idx_BT: jax.Array, targets_BT: jax.Array | None = None, *, reduction: str = "mean"):
        """Softcapped float32 logits (B, T, vocab), or with targets the mean loss (reduction='none': per-token losses)."""
        x_BTn = self.hidden_states(idx_BT)
        lm_head, vocab = self._whole("lm_head"), self.config.vocab_size
        if targets_BT is None:
            return losslib.softcapped_logits(x_BTn, lm_head, vocab, self.train_matmul)
        if reduction == "none":
            return self.loss_head.per_token(x_BTn, lm_head, targets_BT, vocab, self.train_matmul)
        return self.loss_head.mean(x_BTn, lm_head, targets_BT, vocab, self.train_matmul)

    def set_fp8(self, fp8: bool) -> None:
        """fp8 on or off in the forward and backward pass: the dense layers' matmul and the loss head that goes with it."""
        self.fp8 = fp8
        self.train_matmul = dense.choose(self.backend, fp8)  # __call__'s dense layers and lm_head: fp8 when on
        self.loss_head = losslib.choose(self.backend, self.loss_chunk, fp8)

    def hidden_states(self, idx_BT: jax.Array) -> jax.Array:
        """Final normalised hidden states (B, T, n) before the lm_head (nanochat gpt.py GPT.forward up to it)."""
        cfg = self.config
        T = idx_BT.shape[1]
        if T > 10 * cfg.sequence_len:
            raise UserError(f"sequence of {T} tokens exceeds the rotary cache of {10 * cfg.sequence_len}")
        cos, sin = self._rotary(T)
        # the only differentiated pass: here the backend decides whether the norms', lambda mix's and relu^2's own
        # recomputation keeps jax.checkpoint's barrier (recomputed_when_narrow)
        with rematlib.barrier_kept(self.backend.recompute_barrier):
            x = self._embed(idx_BT)
            x0 = self._smear(x, jnp.pad(x[:, :-1], ((0, 0), (1, 0), (0, 0))))  # token 0 has no predecessor: unchanged
            layer_fn = functools.partial(block_forward, x0_BTn=x0, idx_BT=idx_BT, cos=cos, sin=sin, config=cfg,
                                         matmul=self.train_matmul)
            # One layer function per window size, under the --remat policy: the layers of a scanned run share it.
            by_window = {w: rematlib.remat_layer(functools.partial(layer_fn, attend=functools.partial(
                sequence_attention, window_left=w, backend=self.backend)), self.remat) for w in set(cfg.window_sizes)}
            x, _ = self._trunk(x0, lambda i, x, layer: by_window[cfg.window_sizes[i]](x, layer), self.scan_layers)
        return x

    def decode_step(self, token_B: jax.Array, pos: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        """One token per row at position `pos` with a cache of fixed shape: (logits (B, vocab), updated cache).

        `cache` from `init_cache`: "k", "v" (L, B, max_len, Hkv, D) and "prev" (B, 1, n), the previous token's
        normalised, un-smeared embedding (zeros at position 0). Layers run unrolled; shapes never change, so a whole
        generation compiles once.
        """
        cfg = self.config
        idx_BT = token_B[:, None]
        cos, sin = (jax.lax.dynamic_slice_in_dim(t, pos, 1) for t in self._rotary(cache["k"].shape[2]))
        embedding = self._embed(idx_BT)
        x0 = self._smear(embedding, cache["prev"])
        layer_fn = functools.partial(block_forward, x0_BTn=x0, idx_BT=idx_BT, cos=cos, sin=sin, config=cfg,
                                     matmul=self.plain_matmul)

        def layer_call(i, x, layer):  # layer i, reading and writing its own caches
            attend = functools.partial(decode_attention, cache=cache, i=i, pos=pos, window_left=cfg.window_sizes[i])
            return layer_fn(x, layer, attend=attend)

        x, caches = self._trunk(x0, layer_call, scan=False)
        logits = losslib.softcapped_logits(x, self._whole("lm_head"), cfg.vocab_size, self.plain_matmul)[:, 0]
        return logits, {"k": jnp.stack([k for k, _ in caches]), "v": jnp.stack([v for _, v in caches]),
                        "prev": embedding.astype(cache["prev"].dtype)}

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        """An empty cache for `decode_step`."""
        cfg = self.config
        shape = (cfg.n_layer, batch_size, max_len, cfg.n_kv_head, cfg.head_dim)
        return {"k": jnp.zeros(shape, self.compute_dtype), "v": jnp.zeros(shape, self.compute_dtype),
                "prev": jnp.zeros((batch_size, 1, cfg.n_embd), self.compute_dtype)}

    def _embed(self, idx_BT: jax.Array) -> jax.Array:
        """Normalised token embeddings in the compute dtype."""
        return rmsnorm(lookup(self._whole("wte"), idx_BT, self.compute_dtype))

    def _rotary(self, length: int) -> tuple[jax.Array, jax.Array]:
        """The recipe's rotary tables for positions 0..length-1 (rounded to bf16 or to the compute dtype)."""
        c = self.config.constants
        dtype = jnp.dtype(c.rope_dtype) if c.rope_dtype else self.compute_dtype
        return tuple(jnp.asarray(t) for t in rotary_tables(length, self.config.head_dim, c.rope_base, dtype))

    def _smear(self, x_BTn: jax.Array, prev_BTn: jax.Array) -> jax.Array:
        """nanochat 92d63d4 GPT.forward smear: x_t + lambda * sigmoid(x_t[:24] @ smear_gate) * x_{t-1}, where
        prev_BTn holds x_{t-1} (un-smeared; zeros where there is none). Identity in recipes without smear."""
        channels = self.config.constants.smear_channels
        if not channels:
            return x_BTn
        gate_BT1 = self._whole("smear_lambda").astype(x_BTn.dtype) * jax.nn.sigmoid(
            self.plain_matmul(x_BTn[..., :channels], self._whole("smear_gate")))
        return x_BTn + gate_BT1 * prev_BTn

    def _trunk(self, x0_BTn: jax.Array, layer_call, scan: bool) -> tuple[jax.Array, list]:
        """Every layer in order, then backout and the final norm: (x, each layer's output). `layer_call(i, x, layer)`
        applies layer i to its arrays and returns (x, output).

        The layer stacking: parameters are stored stacked over layers, and `layer_runs` cuts the layers into runs.
        With `scan`, a run of repeated layers (one window-pattern period, repeated) is one `lax.scan` over the
        repeats, so its body is compiled once and compile time stays flat in depth (layer_call must then depend on i
        only through its window); otherwise, and for the layers outside such runs, each layer is traced on its own
        (unrolled: Backend.scan_layers says why GPUs unroll; decode_step always does)."""
        cfg = self.config
        layers = self._layer_arrays()
        x, x_mid, outputs = x0_BTn, None, []
        for start, period, repeats in layer_runs(cfg, scan):
            arrays = run_arrays(layers, cfg, start, period, repeats)
            one_repeat = functools.partial(self._run_period, layer_call=layer_call, start=start, period=period)
            if repeats > 1:
                with jax.named_scope(LAYER_SCAN):  # the name jaxchat.training.inventory finds the scan's stacked writes by
                    x, outs = jax.lax.scan(rematlib.keeping_barrier(one_repeat), x, arrays)  # outputs stacked
                outputs += [jax.tree.map(lambda t, r=r: t[r], outs[j]) for r in range(repeats) for j in range(period)]
            else:
                x, outs = one_repeat(x, {k: v[0] for k, v in arrays.items()})
                outputs += list(outs)
            if start + period * repeats - 1 == cfg.backout_layer:
                x_mid = x
        if x_mid is not None:  # nanochat 92d63d4 GPT.forward: subtract the mid-stack residual before the final norm
            x = x - self._whole("backout_lambda").astype(x.dtype) * x_mid
        return rmsnorm(x), outputs

    def _run_period(self, x: jax.Array, arrays: dict, *, layer_call, start: int,
                    period: int) -> tuple[jax.Array, tuple]:
        """Layers start .. start + period - 1 from one repeat of their run's arrays (a scan body, or called once):
        (x, each layer's output)."""
        outs = []
        for j in range(period):
            layer = {k: v if v is None else meshlib.whole(paramslib.named(k), self.config, v)
                     for k, v in layer_at(arrays, self.config, start, j).items()}
            x, out = layer_call(start + j, x, layer)
            outs.append(out)
        return x, tuple(outs)

    def _whole(self, name: str) -> jax.Array:
        """A parameter that is not per layer, whole (all-gathered where FSDP splits it: jaxchat.model.mesh.whole)."""
        p = paramslib.named(name)
        return meshlib.whole(p, self.config, getattr(self._holder(p), name)[...])

    def _layer_arrays(self) -> dict[str, jax.Array]:
        """Every per-layer parameter by name, with its leading layer (or value-embedding layer) axis."""
        return {p.name: getattr(self._holder(p), p.name)[...] for p in paramslib.declared(self.config) if p.per_layer}

    def _holder(self, p: paramslib.Param) -> nnx.Module:
        """The module that holds parameter p as an attribute: `blocks` for blocks/*, else the GPT."""
        return self.blocks if p.path.startswith("blocks/") else self

# ----------------------------------------------------------------------------------------------------------------
# Counting (nanochat gpt.py GPT.num_scaling_params and GPT.estimate_flops)

def abstract_model(config: GPTConfig, **model_options) -> GPT:
    """The model with shapes only (no memory allocated): for counting, checkpoint targets and compiling the step.

    model_options: GPT's compute_dtype, scan_layers, remat, loss_chunk, embed_dtype (they shape the graph, not the
    parameters, except embed_dtype)."""
    return nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0), **model_options))


def _leaf_sizes(config: GPTConfig) -> dict[paramslib.Param, int]:
    """Number of elements of every parameter of `config`'s model."""
    return {p: math.prod(p.shape_for(config)) for p in paramslib.declared(config)}


def num_scaling_params(config: GPTConfig) -> dict[str, int]:
    """Parameter counts by nanochat's groups (jaxchat.model.params Param.count_group); 'scaling' = transformer_matrices
    + lm_head."""
    counts = dict.fromkeys(("wte", "value_embeds", "lm_head", "transformer_matrices", "scalars"), 0)
    for p, size in _leaf_sizes(config).items():
        counts[p.count_group] += size
    counts["total"] = sum(counts.values())
    counts["scaling"] = counts["transformer_matrices"] + counts["lm_head"]
    return counts


def estimate_flops(config: GPTConfig) -> int:
    """Training FLOPs per token: 6 x matmul weights + attention (12 * H * D * window per layer, not halved).

    The matmul weights are the `linear` parameters (jaxchat.model.params): blocks/*, lm_head and (92d63d4) the smear
    gate, as nanochat 92d63d4 counts every weight of its `Linear` modules. (With --fp8, nanochat 92d63d4 miscounts, as
    its fp8 layers are not `Linear`s; this is its bf16 count.)
    """
    matmul = sum(size for p, size in _leaf_sizes(config).items() if p.linear)
    attn = sum(12 * config.n_head * config.head_dim * min(w, config.sequence_len) for w in config.window_sizes)
    return 6 * matmul + attn
