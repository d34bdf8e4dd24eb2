"""The device mesh and every sharding decision, declared once: logical axis names mapped to mesh axes.

Mesh axes: `data` (pure data parallel) x `fsdp` (data parallel with parameters sharded over it). The batch is split
over both. Parameters are replicated over `data` and sharded over `fsdp`; optimizer state is additionally sharded over
`data` (ZeRO-2, like the reference's DistMuonAdamW), along the stack axis for Muon matrices so that every matrix is
orthogonalised whole on one device; Muon zero-pads a stack that does not divide the devices (muon_stack_sharding).
"""

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxchat.model import params as paramslib
from jaxchat.runtime.common import UserError

DATA_AXES = ("data", "fsdp")  # the batch is split over every device

# Where logical axes live. Parameters: FSDP shards the model dimension (the stack axis is scanned over, so it stays
# whole). Optimizer state: tables by vocabulary row, matrices by stack entry, over every device.
# Each rule lists candidate mesh axes, first fit wins: a candidate must divide the dimension and use no mesh axis
# that an earlier dimension of the same leaf already uses.
PARAM_RULES = {"embed": [("fsdp",)]}
OPTIMIZER_RULES = {"vocab": [DATA_AXES, ("data",), ("fsdp",)], "stack": [DATA_AXES, ("data",), ("fsdp",)],
                   "embed": [("fsdp",)]}


def make_mesh(fsdp: int = 1, devices: list | None = None) -> Mesh:
    """A (data, fsdp) mesh over every device of every process (or the given ones); fsdp=1 is pure data parallel."""
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    if fsdp <= 0 or n % fsdp:
        valid = [f for f in range(1, n + 1) if n % f == 0]
        raise UserError(f"--fsdp={fsdp} does not divide the {n} devices; use one of {valid}")
    return jax.make_mesh((n // fsdp, fsdp), ("data", "fsdp"), axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices)


def _spec(logical: tuple, shape: tuple, rules: dict, mesh: Mesh) -> P:
    """PartitionSpec for a leaf: per dimension the first candidate that divides it; otherwise replicated."""
    spec, used = [], set()
    for name, size in zip(logical, shape):
        candidates = [tuple(a for a in axes if mesh.shape[a] > 1) for axes in rules.get(name, [])]
        fits = [axes for axes in candidates if axes and not used & set(axes)
                and size % int(np.prod([mesh.shape[a] for a in axes])) == 0]
        if fits:
            used |= set(fits[0])
            spec.append(fits[0] if len(fits[0]) > 1 else fits[0][0])
        else:
            spec.append(None)
    return P(*spec)


def _logical_axes(name: str, ndim: int) -> tuple | None:
    """The logical axes declared (jaxchat.model.params) for a leaf whose path ends with a parameter's path, such as its
    optimizer state's (None: no parameter's)."""
    return next((p.axes for p in paramslib.PARAMS if name.endswith(p.path) and len(p.axes) == ndim), None)


def _leaf_names(tree) -> list[tuple[str, jax.Array]]:
    """(slash-joined path of its string keys, leaf) for every leaf."""
    return [(paramslib.path_of(path), x) for path, x in jax.tree_util.tree_leaves_with_path(tree)]


def _shardings(tree, rules: dict, mesh: Mesh):
    """NamedShardings for a tree whose leaves follow the parameter paths (optimizer state mirrors them; its other
    leaves, such as schedule values, are replicated)."""
    specs = iter([NamedSharding(mesh, _spec(_logical_axes(name, x.ndim) or (None,) * x.ndim, x.shape, rules, mesh))
                  for name, x in _leaf_names(tree)])
    return jax.tree.map(lambda _: next(specs), tree)


def param_shardings(params, mesh: Mesh):
    """How parameters live on the mesh (replicated, or FSDP-sharded over the model dimension). Every parameter must
    be declared with its logical axes (jaxchat.model.params): one left out would be replicated silently, optimizer state
    included."""
    if undeclared := [name for name, x in _leaf_names(params) if _logical_axes(name, x.ndim) is None]:
        raise ValueError(f"parameters without logical axes (not declared in jaxchat.model.params.PARAMS): {undeclared}")
    return _shardings(params, PARAM_RULES, mesh)


def optimizer_shardings(opt_state, mesh: Mesh):
    """How optimizer state (and gradients entering the update) live: ZeRO-2 over every device."""
    return _shardings(opt_state, OPTIMIZER_RULES, mesh)


def muon_stack_sharding(mesh: Mesh) -> NamedSharding | None:
    """Where Muon orthogonalises: its (zero-padded) stacks of whole matrices split over every device; None on one."""
    return NamedSharding(mesh, P(DATA_AXES)) if mesh.size > 1 else None


def manual_axes() -> frozenset[str]:
    """The mesh axes the code being traced runs per device on (inside a shard_map over them; none outside)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return frozenset()
    return frozenset(a for a, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Manual)


def data_shard_axes(mesh=None) -> tuple[str, ...]:
    """The axes of `mesh` (None: the ambient mesh) that split the batch and are still GSPMD's to split (none without
    a mesh, on one device, or inside the train step's shard_map, where every device already holds only its rows)."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh.empty:
        return ()
    manual = manual_axes()
    return tuple(a for a in DATA_AXES if a in mesh.axis_names and mesh.shape[a] > 1 and a not in manual)


def data_shards() -> int:
    """How many ways the ambient mesh splits the batch (1 without a mesh context)."""
    mesh = jax.sharding.get_abstract_mesh()
    return int(np.prod([mesh.shape[a] for a in data_shard_axes()]))


def split_by_rows(x: jax.Array) -> jax.Array:
    """x constrained to be split over the data axes by its first (batch) dimension and whole otherwise; unchanged
    without a mesh context. Attention's inputs: with FSDP, GSPMD would otherwise carry the weights' split of the model
    dimension over to the heads, which cuDNN attention's partitioner refuses (6 heads over 8 devices at d12)."""
    axes = data_shard_axes()
    return jax.lax.with_sharding_constraint(x, P(axes)) if axes else x


# ----------------------------------------------------------------------------------------------------------------
# Inside the train step's shard_map (jaxchat.training.step): every device computes its own rows' gradients with whole
# weights


def param_spec(p: paramslib.Param, config, mesh) -> P:
    """Where parameter p of `config`'s model lives on `mesh` (PARAM_RULES; what param_shardings gives its leaf)."""
    return _spec(p.axes, p.shape_for(config), PARAM_RULES, mesh)


def whole(p: paramslib.Param, config, x: jax.Array) -> jax.Array:
    """Parameter p's value x (or one layer's slice of it) whole: inside the train step's shard_map over an fsdp axis
    of more than one device, all-gathered over it where FSDP splits it; otherwise x itself.

    Gathered where each layer uses it, so one layer's weights at a time are whole; the gather's transpose is the
    reduce-scatter of that layer's weight gradient over fsdp (ZeRO-3)."""
    if "fsdp" not in manual_axes():
        return x
    spec = tuple(param_spec(p, config, jax.sharding.get_abstract_mesh()))
    spec += (None,) * (len(p.shape) - len(spec))
    dims = [d for d, axes in enumerate(spec) if axes == "fsdp"]
    if not dims:
        return x
    return jax.lax.all_gather(x, "fsdp", axis=dims[0] - (len(spec) - x.ndim), tiled=True)


def gradient_reduction(shape: tuple, param: P, target: P, mesh) -> tuple[tuple[tuple[str, int | None], ...], P]:
    """How the devices' gradients of a leaf of `shape`, each device's part laid out as `param` says, are summed once
    per step: ((mesh axis, dimension to scatter over it, or None for an all-reduce), ...) and the PartitionSpec of the
    result. A mesh axis the parameter is not split over is reduced onto a dimension that `target` (the optimizer's
    ZeRO sharding) splits over it, as a reduce-scatter, where it divides; otherwise all-reduced."""
    spec = [_axes(a) for a in param] + [()] * (len(shape) - len(param))
    target = [_axes(a) for a in target] + [()] * (len(shape) - len(target))
    used = {a for axes in spec for a in axes}
    steps = []
    for axis in (a for a in mesh.axis_names if mesh.shape[a] > 1 and a not in used):
        # a dimension the target splits over this axis right after the axes it is already split over
        split = lambda d: int(np.prod([mesh.shape[a] for a in spec[d]]))  # noqa: E731
        dim = next((d for d, axes in enumerate(target) if axes[:len(spec[d]) + 1] == spec[d] + (axis,)
                    and (shape[d] // split(d)) % mesh.shape[axis] == 0), None)
        steps.append((axis, dim))
        if dim is not None:
            spec[dim] += (axis,)
    return tuple(steps), P(*[axes[0] if len(axes) == 1 else (axes or None) for axes in spec])


def reduce_gradient(g: jax.Array, steps) -> jax.Array:
    """One device's gradient summed over the devices as gradient_reduction's steps say (inside the shard_map)."""
    for axis, dim in steps:
        g = jax.lax.psum(g, axis) if dim is None else jax.lax.psum_scatter(g, axis, scatter_dimension=dim, tiled=True)
    return g


def _axes(entry) -> tuple[str, ...]:
    """A PartitionSpec entry as a tuple of mesh axes."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Micro-batched tokens (accum, rows, T): rows split over every device."""
    return NamedSharding(mesh, P(None, DATA_AXES, None))


def row_sharding(mesh: Mesh) -> NamedSharding:
    """Token rows (rows, T), e.g. validation batches: split over every device."""
    return NamedSharding(mesh, P(DATA_AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def abstract_like(tree, shardings):
    """ShapeDtypeStructs (with shardings) for a tree of arrays or ShapeDtypeStructs: an orbax restore target."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
