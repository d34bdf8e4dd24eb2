"""Move weights between nanochat's state dict (names and PyTorch layouts of nanochat/gpt.py GPT) and jaxchat's parameter tree.

The reference stores each Linear as (out, in) per layer; jaxchat stores kernels as (in, out) stacked over layers.
The round trip is exact (transposes and stacking only).
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxchat.model import params as paramslib
from jaxchat.model.gpt import GPT, GPTConfig
from jaxchat.model.loss import SOFTCAP
from jaxchat.runtime.common import UserError, read_input
from jaxchat.training import optim
from jaxchat.training import recipe as recipes


@dataclasses.dataclass(frozen=True)
class Group:
    """One of nanochat's optimizer param_groups: "adamw" or "muon", jaxchat's group label, its state-dict names in
    nanochat's order."""

    kind: str
    label: str
    names: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Layout:
    """nanochat's state dict and optimizer groups of one model config, derived from jaxchat.model.params once: every
    state-dict name in table order -> (its declaration, its index along the declaration's leading axis or None), its
    shape in nanochat's layout, and the optimizer groups in nanochat's order."""

    config: GPTConfig
    names: dict[str, tuple[paramslib.Param, int | None]]
    shapes: dict[str, tuple[int, ...]]
    groups: tuple[Group, ...]

    @classmethod
    def of(cls, config: GPTConfig) -> "Layout":
        names = paramslib.reference_layout(config)
        shapes = {n: p.reference_shape(config) for n, (p, _) in names.items()}
        return cls(config, names, shapes, _groups(names, shapes, recipes.get(config.recipe).adamw_groups))

    @classmethod
    def of_checkpoint(cls, model_config: dict, state: dict) -> "Layout":
        """The layout of a nanochat checkpoint: its meta's model_config, and the recipe its state dict's names tell
        (nanochat's meta names no commit)."""
        return cls.of(config_from_dict(model_config, recipe=recipe_of_state(state)))

    def to_nanochat(self, params: dict) -> dict[str, np.ndarray]:
        """A jaxchat parameter tree (or a gradient or moment of the same structure) as a nanochat state dict."""
        leaves = dict(_flatten(params))
        return {name: np.asarray(p.to_reference(leaves[p.path] if j is None else leaves[p.path][j]))
                for name, (p, j) in self.names.items()}

    def from_nanochat(self, state: dict[str, np.ndarray]) -> dict:
        """A nanochat state dict (name -> array, PyTorch layout) as a jaxchat parameter tree of float32 arrays."""
        state = {k.removeprefix("_orig_mod."): np.asarray(v, np.float32) for k, v in state.items()}
        if set(state) != set(self.names):
            missing, extra = sorted(set(self.names) - set(state)), sorted(set(state) - set(self.names))
            raise UserError(f"state dict does not match the model config: missing {missing[:4]}, "
                            f"unexpected {extra[:4]}")
        arrays = {}  # declaration -> its tensors in jaxchat's layout, layer by layer
        for name, (p, j) in self.names.items():
            arrays.setdefault(p, []).append(p.from_reference(state[name]))
        params = {}
        for p, xs in arrays.items():
            *parents, leaf = p.path.split("/")
            node = params
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = np.stack(xs) if "{i}" in p.ref else xs[0]
        return params


def _groups(names: dict, shapes: dict, adamw_groups: tuple) -> tuple[Group, ...]:
    """nanochat's optimizer groups (nanochat/gpt.py setup_optimizer): the recipe's `adamw_groups` (optim.AdamWGroup)
    in its order, each holding its parameters in table order (which is setup_optimizer's) and value embeddings by
    layer; then Muon's block matrices, one group per shape in sorted order, each in `transformer.h.parameters()`
    order (params.muon_order). Every parameter must have a group of the recipe."""
    labels = {n: optim.group_of(p, p.path, adamw_groups) for n, (p, _) in names.items()}
    groups = [Group("adamw", g.name, tuple(n for n in names if labels[n] == g.name)) for g in adamw_groups]
    blocks = sorted((n for n in names if labels[n] == "muon"), key=lambda n: paramslib.muon_order(n, names[n][0]))
    groups += [Group("muon", "muon", tuple(n for n in blocks if shapes[n] == shape))
               for shape in sorted({shapes[n] for n in blocks})]
    return tuple(g for g in groups if g.names)


def from_reference(state: dict[str, np.ndarray], config: GPTConfig) -> dict:
    """A nanochat state dict (name -> array, PyTorch layout) as a jaxchat parameter tree of float32 numpy arrays."""
    return Layout.of(config).from_nanochat(state)


def to_reference(params: dict, config: GPTConfig) -> dict[str, np.ndarray]:
    """A jaxchat parameter tree (or a gradient of the same structure) as a nanochat state dict."""
    return Layout.of(config).to_nanochat(params)


def to_reference_names(config: GPTConfig) -> list[str]:
    """Every key of the reference state dict for this config."""
    return list(paramslib.reference_layout(config))


def load_params(model: GPT, params: dict) -> None:
    """Write a parameter tree (e.g. from `from_reference`) into a model, checking every shape."""
    state = nnx.state(model, nnx.Param)
    current = nnx.to_pure_dict(state)
    flat_new = dict(_flatten(params))
    for path, value in _flatten(current):
        if path not in flat_new or flat_new[path].shape != value.shape:
            got = flat_new[path].shape if path in flat_new else "missing"
            raise UserError(f"parameter {path}: expected shape {value.shape}, got {got}")
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    nnx.update(model, state)


def model_from_reference(config: GPTConfig, state: dict[str, np.ndarray], compute_dtype=jnp.float32) -> GPT:
    """A jaxchat GPT holding the reference's weights."""
    model = GPT(config, rngs=nnx.Rngs(0), compute_dtype=compute_dtype)
    load_params(model, from_reference(state, config))
    return model


def _flatten(tree: dict, prefix: str = ""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


def config_from_dict(model_config: dict, recipe: str | None = None) -> GPTConfig:
    """A GPTConfig from nanochat's `model_config` (checkpoint meta); a missing window_pattern means 'L', as in the
    reference; the recipe is `recipe`, else the dict's own (jaxchat checkpoints), else 348fbb3 (saved before recipes)."""
    keys = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")
    return GPTConfig(**{k: int(model_config[k]) for k in keys},
                     window_pattern=str(model_config.get("window_pattern", "L")),
                     recipe=str(recipe or model_config.get("recipe", recipes.DEFAULT)))


def read_reference_npz(path: str) -> tuple[GPTConfig, dict[str, np.ndarray], "np.lib.npyio.NpzFile"]:
    """A parity-fixture-format .npz: (config from config/*, reference state dict from param/*, the open file)."""
    data = read_input(path, _read_npz, ".npz file", "pass a file in the parity-fixture format")
    model_config = {k.removeprefix("config/"): data[k].item() for k in data.files if k.startswith("config/")
                    and k != "config/window_sizes"}
    config = config_from_dict(model_config, recipe=model_config.get("rev"))  # config/rev: the nanochat commit
    if "config/json" in data.files:
        check_constants(config, json.loads(str(data["config/json"])), path)
    if "config/window_sizes" in data.files and tuple(data["config/window_sizes"].tolist()) != config.window_sizes:
        raise UserError(f"{path}: window sizes {data['config/window_sizes'].tolist()} differ from the pattern's "
                        f"{list(config.window_sizes)}")
    state = {k.removeprefix("param/"): data[k] for k in data.files if k.startswith("param/")}
    return config, state, data


def _read_npz(path: str):
    data = np.load(path)
    for k in data.files:  # every member read once now: a truncated file fails here, through read_input
        _ = data[k]
    return data


def recipe_of_state(state: dict) -> str:
    """The recipe of a nanochat state dict, whose meta names no commit: a smear gate marks 92d63d4's model
    (a825e63's has the same forward pass), its absence 348fbb3's."""
    has_smear = any(k.removeprefix("_orig_mod.") == paramslib.declaring("smear_gate").ref for k in state)
    return "92d63d4" if has_smear else "348fbb3"


def check_constants(config: GPTConfig, constants: dict, path: str) -> None:
    """A fixture's `config/json` model constants (rope base, VE gate, smear, backout, QK scale, softcap) against
    jaxchat's for its recipe."""
    c = config.constants
    ours = {"rope_base": c.rope_base, "ve_gate_channels": c.ve_gate_channels, "ve_gate_scale": c.ve_gate_scale,
            "smear_channels": c.smear_channels, "backout_layer": config.backout_layer, "qk_scale": c.qk_scale,
            "softcap": SOFTCAP}
    differ = {k: (constants[k], v) for k, v in ours.items() if k in constants and constants[k] != v}
    if differ:
        raise UserError(f"{path}: model constants (fixture, jaxchat recipe {config.recipe}) differ: {differ}")
