"""Every parameter of the GPT, declared once in PARAMS.

A `Param` is one leaf of `nnx.state(model, nnx.Param)` and everything jaxchat knows about it: its shape (letters of
the legend in jaxchat/__init__.py), logical axes, initial value, nanochat state-dict name and layout, and optimizer.
jaxchat.model.gpt builds its parameters and its per-layer arrays from it, jaxchat.model.mesh shards by its axes,
jaxchat.interop.convert and jaxchat.interop.nanochat_ckpt translate to and from nanochat by its names, layouts and
groups, jaxchat.training.optim labels leaves by its optimizer, and the parameter and FLOP counts read it.

A new parameter is one line here and its use in the forward pass (jaxchat.model.gpt); a new AdamW group also needs its
hyperparameters in each recipe's `adamw_groups` (jaxchat.training.recipe).
"""

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

# nanochat/gpt.py num_scaling_params counts parameters by module; every other parameter is one of its 'scalars'.
COUNT_GROUPS = {"transformer.wte.": "wte", "value_embeds.": "value_embeds", "lm_head.": "lm_head",
                "transformer.h.": "transformer_matrices"}
# nanochat/gpt.py Block.__init__ registers attn before mlp: the order of a layer's matrices in Muon's groups.
BLOCK_MODULES = ("attn", "mlp")


def dims(config) -> dict:
    """The sizes a shape letter stands for in `config` (a model.GPTConfig)."""
    c = config.constants
    return {"L": config.n_layer, "E": len(config.ve_layers), "V": config.padded_vocab, "n": config.n_embd,
            "4n": 4 * config.n_embd, "HD": config.n_head * config.head_dim, "KD": config.n_kv_head * config.head_dim,
            "K": config.n_kv_head, "C": c.ve_gate_channels, "Cs": c.smear_channels}


# ---------------------------------------------------------------------------------------------------------------
# Initial values (nanochat/gpt.py GPT.init_weights): float32, drawn from the model's `params` stream in table order


def _bound(config) -> float:
    """U(-b, b) with b = sqrt(3 / n) has std 1/sqrt(n)."""
    return math.sqrt(3) / math.sqrt(config.n_embd)


def normal(std: Callable) -> Callable:
    """N(0, std(config)^2)."""
    return lambda rngs, shape, config: std(config) * jax.random.normal(rngs.params(), shape, jnp.float32)


def uniform(low: Callable, high: Callable) -> Callable:
    """U(low(config), high(config)); the constant, without drawing, when the interval is empty (zeros at 348fbb3),
    so that a parameter initialised to a constant leaves the random stream as it was."""
    def init(rngs, shape, config):
        lo, hi = low(config), high(config)
        if lo == hi:
            return jnp.full(shape, lo, jnp.float32)
        return jax.random.uniform(rngs.params(), shape, jnp.float32, lo, hi)
    return init


def constant(value: Callable) -> Callable:
    """value(config) everywhere."""
    return lambda rngs, shape, config: jnp.full(shape, value(config), jnp.float32)


def ramp(start_drop: Callable) -> Callable:
    """Layer i: start - drop * i / max(L - 1, 1), in float64 then rounded to float32 as the reference stores it."""
    def init(rngs, shape, config):
        (start, drop), L = start_drop(config), shape[0]
        return jnp.asarray(np.array([start - drop * i / max(L - 1, 1) for i in range(L)], np.float32))
    return init


def _zero(config) -> float:
    return 0.0


def _symmetric(scale: Callable) -> Callable:
    """U(-scale * b, scale * b), b as in `_bound`."""
    return uniform(lambda c: -scale(c) * _bound(c), lambda c: scale(c) * _bound(c))


def _one(config) -> float:
    return 1.0


def _has_smear(config) -> bool:
    return bool(config.constants.smear_channels)


def _has_backout(config) -> bool:
    return config.backout_layer is not None


def _always(config) -> bool:
    return True


# ---------------------------------------------------------------------------------------------------------------
# The declaration


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter.

    path: where it lives in the parameter tree ("blocks/c_q"); shape: dims() letters (or literal ints), a leading L
    or E stacks it over layers or value-embedding layers, and the forward pass gets one slice per layer; axes: its
    logical axes (jaxchat.model.mesh maps them to mesh axes); init(rngs, shape, config) -> float32 array; ref: its
    nanochat state-dict name, "{i}" standing for the layer when nanochat keeps one tensor per layer; layout: "linear" (a
    torch Linear weight: nanochat (out, in), jaxchat (in, out)), "scalar" (nanochat (1,), jaxchat ()) or "same";
    optimizer: "muon" or the name of an AdamW group (jaxchat.training.recipe gives each group its hyperparameters);
    embedding: stored in the model's embed_dtype (bfloat16 like nanochat on CUDA); present: whether `config` has it.
    """

    path: str
    shape: tuple
    axes: tuple
    init: Callable
    ref: str
    layout: str
    optimizer: str
    embedding: bool = False
    present: Callable = _always

    @property
    def name(self) -> str:
        """The leaf's own name (the last part of its path): the key of its slice in a layer's arrays."""
        return self.path.rsplit("/", 1)[-1]

    @property
    def per_layer(self) -> bool:
        """Stacked over layers (L) or value-embedding layers (E): the forward pass reads one slice per layer."""
        return bool(self.shape) and self.shape[0] in ("L", "E")

    @property
    def linear(self) -> bool:
        """A weight of a matmul with the token stream (nanochat counts these in estimate_flops: its Linear weights)."""
        return self.layout == "linear"

    @property
    def count_group(self) -> str:
        """nanochat's num_scaling_params group."""
        return next((g for prefix, g in COUNT_GROUPS.items() if self.ref.startswith(prefix)), "scalars")

    def shape_for(self, config) -> tuple[int, ...]:
        d = dims(config)
        return tuple(d[s] if isinstance(s, str) else s for s in self.shape)

    def layers(self, config) -> tuple[int, ...]:
        """The model layers the leading axis runs over (per_layer parameters)."""
        return tuple(range(config.n_layer)) if self.shape[0] == "L" else config.ve_layers

    def initial(self, config, rngs, embed_dtype) -> jax.Array:
        """The initial value (drawn from rngs), in embed_dtype if an embedding."""
        value = self.init(rngs, self.shape_for(config), config)
        return value.astype(embed_dtype) if self.embedding else value

    def reference_names(self, config) -> list[str]:
        """Its nanochat state-dict names: one per layer where ref has "{i}"."""
        return [self.ref.format(i=i) for i in self.layers(config)] if "{i}" in self.ref else [self.ref]

    def reference_shape(self, config) -> tuple[int, ...]:
        """Its shape in nanochat's state dict (one layer's where ref has "{i}"), as `to_reference` lays it out."""
        shape = self.shape_for(config)[1:] if "{i}" in self.ref else self.shape_for(config)
        return {"linear": shape[::-1], "scalar": (1,), "same": shape}[self.layout]

    def to_reference(self, x: np.ndarray) -> np.ndarray:
        """One jaxchat array (or one layer's slice of it) in nanochat's layout."""
        return {"linear": lambda: np.asarray(x).T, "scalar": lambda: np.asarray(x).reshape(1),
                "same": lambda: np.asarray(x)}[self.layout]()

    def from_reference(self, x: np.ndarray) -> np.ndarray:
        """One nanochat tensor in jaxchat's layout (the inverse of to_reference)."""
        return {"linear": lambda: np.asarray(x).T, "scalar": lambda: np.asarray(x).reshape(()),
                "same": lambda: np.asarray(x)}[self.layout]()


def recipe_value(name: str) -> Callable:
    """The recipe constant `name` (jaxchat.model.architecture.ModelRecipe) of a config."""
    return lambda config: getattr(config.constants, name)


# In the order initial values are drawn: reordering changes every seed's weights.
PARAMS = (
    Param("wte", ("V", "n"), ("vocab", "embed"), normal(recipe_value("wte_std")),
          "transformer.wte.weight", "same", "wte", embedding=True),
    Param("lm_head", ("n", "V"), ("embed", "vocab"), normal(lambda c: 0.001),
          "lm_head.weight", "linear", "lm_head"),
    Param("blocks/c_q", ("L", "n", "HD"), ("stack", "embed", "heads"), _symmetric(_one),
          "transformer.h.{i}.attn.c_q.weight", "linear", "muon"),
    Param("blocks/c_k", ("L", "n", "KD"), ("stack", "embed", "heads"), _symmetric(_one),
          "transformer.h.{i}.attn.c_k.weight", "linear", "muon"),
    Param("blocks/c_v", ("L", "n", "KD"), ("stack", "embed", "heads"), _symmetric(_one),
          "transformer.h.{i}.attn.c_v.weight", "linear", "muon"),
    Param("blocks/c_proj", ("L", "HD", "n"), ("stack", "heads", "embed"), constant(_zero),
          "transformer.h.{i}.attn.c_proj.weight", "linear", "muon"),
    Param("blocks/c_fc", ("L", "n", "4n"), ("stack", "embed", "mlp"), _symmetric(recipe_value("c_fc_scale")),
          "transformer.h.{i}.mlp.c_fc.weight", "linear", "muon"),
    Param("blocks/mlp_proj", ("L", "4n", "n"), ("stack", "mlp", "embed"), constant(_zero),
          "transformer.h.{i}.mlp.c_proj.weight", "linear", "muon"),
    Param("blocks/ve_gate", ("E", "C", "K"), ("stack", None, None), uniform(_zero, recipe_value("ve_gate_init")),
          "transformer.h.{i}.attn.ve_gate.weight", "linear", "muon"),
    Param("resid_lambdas", ("L",), (None,), ramp(recipe_value("resid_init")),
          "resid_lambdas", "same", "resid_lambdas"),
    Param("x0_lambdas", ("L",), (None,), ramp(recipe_value("x0_init")),
          "x0_lambdas", "same", "x0_lambdas"),
    Param("smear_gate", ("Cs", 1), (None, None), uniform(_zero, recipe_value("smear_gate_init")),
          "smear_gate.weight", "linear", "smear", present=_has_smear),
    Param("smear_lambda", (), (), constant(recipe_value("smear_lambda_init")),
          "smear_lambda", "scalar", "smear", present=_has_smear),
    # in AdamW group "smear" as nanochat 92d63d4 gpt.py GPT.setup_optimizer puts it in `smear_params`
    # (jaxchat.training.recipe)
    Param("backout_lambda", (), (), constant(recipe_value("backout_lambda_init")),
          "backout_lambda", "scalar", "smear", present=_has_backout),
    Param("value_embeds", ("E", "V", "KD"), ("stack", "vocab", "embed"), _symmetric(_one),
          "value_embeds.{i}.weight", "same", "value_embeds", embedding=True),
)


def path_of(keys) -> str:
    """The slash-joined path (as `Param.path` writes it) of a jax tree key path, from its string keys only (the
    positions inside optimizer-state tuples are skipped)."""
    names = [getattr(k, "key", getattr(k, "name", None)) for k in keys]
    return "/".join(str(n) for n in names if isinstance(n, str))


def declared(config) -> tuple[Param, ...]:
    """The parameters `config`'s model has, in table order."""
    return tuple(p for p in PARAMS if p.present(config))


def named(name: str) -> Param:
    """The parameter whose leaf is called `name` (leaf names are unique: a layer's arrays are keyed by them)."""
    return next(p for p in PARAMS if p.name == name)


def declaring(path: str) -> Param | None:
    """The declaration of the leaf at `path`, or of a leaf under it ("smear_gate/kernel"); None if nothing declares it."""
    return next((p for p in PARAMS if path == p.path or path.startswith(p.path + "/")), None)


def reference_layout(config) -> dict[str, tuple[Param, int | None]]:
    """Every nanochat state-dict name of `config`'s model -> (its declaration, its index along the declaration's
    leading axis, or None for a whole array), in table order."""
    return {name: (p, j if "{i}" in p.ref else None) for p in declared(config)
            for j, name in enumerate(p.reference_names(config))}


def muon_order(name: str, p: Param) -> tuple[int, int, int]:
    """Where a block matrix sits in nanochat's `transformer.h.parameters()`: by layer, then module, then table order."""
    layer, module = name.split(".")[2:4]
    return int(layer), BLOCK_MODULES.index(module), PARAMS.index(p)
