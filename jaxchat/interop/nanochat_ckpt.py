"""nanochat's checkpoint directory, read and written: model state dict, meta json, MuonAdamW shards, tokenizer files.

A nanochat base directory (what nanochat calls NANOCHAT_BASE_DIR) holds, as written by its scripts/base_train.py
through nanochat/checkpoint_manager.py `save_checkpoint` (348fbb3 and 92d63d4 alike), and by scripts/tok_train.py:

    base_checkpoints/<tag>/model_<step:06d>.pt          state dict: reference names, Linear weights (out, in)
    base_checkpoints/<tag>/meta_<step:06d>.json         step, val_bpb, model_config, user_config, ... (indent 2)
    base_checkpoints/<tag>/optim_<step:06d>_rank<r>.pt  MuonAdamW state_dict of rank r (one per training process)
    tokenizer/tokenizer.pkl, tokenizer/token_bytes.pt   pickled tiktoken Encoding; int32 byte length per token

The optimizer mapping is exact both ways: jaxchat's AdamW moments per leaf and Muon momentum / factored second moment
in parameter layout are nanochat's exp_avg / exp_avg_sq per parameter and its per-shape stacked momentum_buffer /
second_momentum_buffer, transposed to (out, in) and split into the rank shards of nanochat/optim.py DistMuonAdamW.
PyTorch is needed only here, imported when a function needs it.
"""

import io
import json
import math
import os
import re
import zipfile
from typing import NamedTuple

import jax
import numpy as np

from jaxchat.interop.convert import Group, Layout, config_from_dict
from jaxchat.runtime.common import UserError, check_name, read_input, replacing
from jaxchat.training import optim

# nanochat's GPTConfig fields: GPT(GPTConfig(**model_config)) rejects any other key.
MODEL_CONFIG_KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern")
# Every meta key nanochat reads: checkpoint_manager.build_model (model_config), base_train resume (step, val_bpb,
# loop_state, dataloader_state_dict), mid_train / chat_sft (device_batch_size, max_seq_len, total_batch_size,
# user_config's learning rates).
META_KEYS = ("step", "val_bpb", "model_config", "user_config", "device_batch_size", "max_seq_len", "total_batch_size",
             "dataloader_state_dict", "loop_state")
LOOP_STATE_KEYS = ("min_val_bpb", "smooth_train_loss", "total_training_time")
REFETCH = "copy or export it again (python -m jaxchat.export writes nanochat's files)"
LARGE_WRITE = 16 * 2**20  # bytes from which a write shows a progress bar (on a terminal)


def torch_module():
    """The torch module, or a UserError saying how to install it."""
    try:
        import torch
    except ImportError:
        raise UserError("reading or writing nanochat's .pt files needs PyTorch: pip install -e '.[torch]'") from None
    return torch


def paths(base: str, tag: str, step: int) -> dict[str, str]:
    """Where each file of step `step` lives under a nanochat base directory (the tag a plain folder name)."""
    ckpt = os.path.join(base, "base_checkpoints", check_name(tag, "--tag"))
    return {"model": os.path.join(ckpt, f"model_{step:06d}.pt"), "meta": os.path.join(ckpt, f"meta_{step:06d}.json"),
            "tokenizer": os.path.join(base, "tokenizer", "tokenizer.pkl"),
            "token_bytes": os.path.join(base, "tokenizer", "token_bytes.pt")}


def optim_path(model_path: str, rank: int) -> str:
    return re.sub(r"model_(\d+)\.pt$", rf"optim_\1_rank{rank}.pt", model_path)


# ---------------------------------------------------------------------------------------------------------------
# Model state dict


def model_state(params: dict, layout: Layout, embed_dtype: str = "") -> dict:
    """jaxchat parameters as nanochat's state dict of torch tensors (contiguous, so each file holds only its bytes).

    Every tensor is float32 like nanochat's master weights, except wte and value embeddings, which keep the dtype
    they were trained in (bfloat16 like nanochat on CUDA, float32 like nanochat on CPU) unless `embed_dtype` says.
    """
    torch = torch_module()
    state = {}
    for name, value in layout.to_nanochat(params).items():  # values keep the dtype they were trained in
        dtype = (embed_dtype or str(value.dtype)) if layout.names[name][0].embedding else "float32"
        tensor = torch.from_numpy(np.array(value, np.float32, order="C"))
        state[name] = tensor.to(getattr(torch, dtype)) if dtype != "float32" else tensor
    return state


def to_numpy(tensors: dict) -> dict[str, np.ndarray]:
    """A state dict of torch tensors as float32 numpy arrays (bfloat16 widens exactly), without '_orig_mod.'."""
    return {k.removeprefix("_orig_mod."): v.float().numpy() for k, v in tensors.items()}


# ---------------------------------------------------------------------------------------------------------------
# Optimizer state: nanochat's MuonAdamW rank shards (the moments read and written through jaxchat.training.optim)


def optimizer_shards(opt: dict, layout: Layout, settings: dict, world_size: int) -> list[dict]:
    """nanochat's optimizer state_dict for each of `world_size` ranks (nanochat/optim.py DistMuonAdamW layout:
    AdamW parameters of 1024 or more elements split by rows, Muon stacks zero-padded and split in chunks).

    opt: jaxchat's optimizer state as restored without a target; settings: group label -> nanochat's group fields
    (optim.param_group_fields).
    """
    torch = torch_module()
    first, second, counts = optim.read_moments(opt)
    m1, m2 = layout.to_nanochat(first), layout.to_nanochat(second)
    index = {n: i for i, n in enumerate(n for g in layout.groups for n in g.names)}
    shards = []
    for rank in range(world_size):
        state = {}
        for g in layout.groups:
            if g.kind == "adamw":
                for n in g.names:
                    rows = _rank_rows(m1[n].shape, rank, world_size)
                    state[index[n]] = {"step": counts[g.label], "exp_avg": _tensor(torch, m1[n][rows]),
                                       "exp_avg_sq": _tensor(torch, m2[n][rows])}
            else:
                chunk = math.ceil(len(g.names) / world_size)
                mine = g.names[rank * chunk:(rank + 1) * chunk]
                state[index[g.names[0]]] = {k: _tensor(torch, _padded([m[n] for n in mine], chunk, m[g.names[0]]))
                                            for k, m in (("momentum_buffer", m1), ("second_momentum_buffer", m2))}
        shards.append({"state": state, "param_groups": [
            dict(settings[g.label], params=[index[n] for n in g.names]) for g in layout.groups]})
    return shards


def _rank_rows(shape: tuple, rank: int, world_size: int) -> slice:
    """The rows of an AdamW parameter that a rank keeps state for (all of it below 1024 elements)."""
    if world_size == 1 or math.prod(shape) < 1024:
        return slice(None)
    if shape[0] % world_size:
        raise UserError(f"a parameter of shape {shape} cannot be split over {world_size} ranks as nanochat does: "
                        f"choose a --world-size that divides {shape[0]}")
    rows = shape[0] // world_size
    return slice(rank * rows, (rank + 1) * rows)


def _padded(arrays: list, chunk: int, like: np.ndarray) -> np.ndarray:
    """`chunk` matrices stacked: the given ones, then zeros (a rank past the end of a stack holds only padding)."""
    out = np.zeros((chunk, *like.shape), np.float32)
    for i, a in enumerate(arrays):
        out[i] = a
    return out


def _tensor(torch, array: np.ndarray):
    return torch.from_numpy(np.array(array, np.float32, order="C"))


def optimizer_from_shards(shards: list[dict], layout: Layout) -> dict:
    """The inverse of `optimizer_shards`: {"first": tree, "second": tree (parameter layout), "count": AdamW step}.

    shards: checked against the layout's groups (check_optimizer).
    """
    m1, m2, steps = {}, {}, set()
    for g, s in zip(layout.groups, shards[0]["param_groups"]):
        if g.kind == "adamw":
            for n, i in zip(g.names, s["params"]):
                split = len(shards) > 1 and math.prod(layout.shapes[n]) >= 1024  # the rows of each rank, concatenated
                for key, m in (("exp_avg", m1), ("exp_avg_sq", m2)):
                    parts = [shard["state"][i][key].float().numpy() for shard in (shards if split else shards[:1])]
                    m[n] = np.concatenate(parts)
                steps.add(int(shards[0]["state"][i]["step"]))
        else:
            first = s["params"][0]
            for key, m in (("momentum_buffer", m1), ("second_momentum_buffer", m2)):
                stack = np.concatenate([shard["state"][first][key].float().numpy() for shard in shards])
                m.update(zip(g.names, stack[:len(g.names)]))
    if len(steps) > 1:
        raise UserError(f"the optimizer file's AdamW step counts differ ({sorted(steps)}); start without "
                        f"--resume-optimizer")
    return {"first": layout.from_nanochat(m1), "second": layout.from_nanochat(m2), "count": max(steps, default=0)}


# ---------------------------------------------------------------------------------------------------------------
# Reading a nanochat checkpoint


def find_model_file(source: str) -> str:
    """The newest model_<step>.pt of a file, a checkpoint directory, or a base directory with one model tag."""
    if os.path.isfile(source):
        return source
    if not os.path.isdir(source):
        raise UserError(f"--init-from={source}: no such file or directory (give a nanochat model_<step>.pt, its "
                        f"directory, or a nanochat base directory)")
    ckpts = os.path.join(source, "base_checkpoints")
    if os.path.isdir(ckpts):
        tags = sorted(t for t in os.listdir(ckpts) if os.path.isdir(os.path.join(ckpts, t)))
        if len(tags) != 1:
            raise UserError(f"--init-from={source} holds {len(tags)} model tags {tags}: point it at one of them, "
                            f"{ckpts}/<tag>")
        source = os.path.join(ckpts, tags[0])
    steps = sorted(int(m.group(1)) for f in os.listdir(source) if (m := re.fullmatch(r"model_(\d+)\.pt", f)))
    if not steps:
        raise UserError(f"--init-from={source}: no model_<step>.pt in it")
    return os.path.join(source, f"model_{steps[-1]:06d}.pt")


def read_meta(model_path: str) -> dict:
    """The meta json beside a nanochat model_<step>.pt (its model_config checked)."""
    meta_path = re.sub(r"model_(\d+)\.pt$", r"meta_\1.json", model_path)
    return read_input(meta_path, _read_meta_json, f"meta file of {os.path.basename(model_path)}", REFETCH)


def _read_meta_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    config_from_dict(meta["model_config"])  # KeyError / ValueError / TypeError: not nanochat's meta
    return meta


def read_torch(path: str, what: str, fix: str | None = None):
    """A torch.save file, its tensors memory-mapped (read from disk only when used), through read_input: a garbage
    or truncated file is one line naming it."""
    torch = torch_module()

    def read(p):
        if not zipfile.is_zipfile(p):  # the archive's directory is at its end: a truncated file has none
            raise ValueError("not a complete zip archive, which torch.save writes")
        return torch.load(p, map_location="cpu", weights_only=True, mmap=True)

    return read_input(path, read, what, fix or REFETCH)


def read_state(model_path: str) -> dict:
    """A nanochat model_<step>.pt: {name: tensor} (memory-mapped)."""
    state = read_torch(model_path, "nanochat model file")
    torch = torch_module()
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{model_path} holds a {type(state).__name__}, not a state dict of tensors: {REFETCH}")
    return state


def check_state(state: dict, layout: Layout, model_path: str) -> None:
    """Every parameter of the layout's model, with its shape, and nothing else: checked on the file's tensors before
    anything is read into memory or compiled."""
    expected = layout.shapes
    shapes = {k.removeprefix("_orig_mod."): tuple(v.shape) for k, v in state.items()}
    if set(shapes) != set(expected):
        missing, extra = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
        raise UserError(f"{model_path} does not hold the model its meta file describes: missing {missing[:4]}, "
                        f"unexpected {extra[:4]}: {REFETCH}")
    if wrong := [k for k in expected if shapes[k] != expected[k]]:
        raise UserError(f"{model_path}: {wrong[0]} has shape {shapes[wrong[0]]}, the model of its meta file "
                        f"{expected[wrong[0]]} ({len(wrong)} tensor(s) differ): {REFETCH}")
    check_values(state, model_path, REFETCH)


# No weight or optimizer moment of a trained model comes near this; a flipped exponent bit gives ~1e38.
IMPLAUSIBLE = 1e15


def check_values(tensors: dict, path: str, fix: str, non_negative: tuple[str, ...] = ()) -> None:
    """Every floating-point tensor finite and of a plausible size, and those named in `non_negative` (second moments)
    not negative: a file whose bytes were damaged but whose zip and shapes are intact passed every other check and
    gave a NaN loss at step 1, whose line blamed the learning rate. (The values are read once here, from the
    memory-mapped file.)"""
    torch = torch_module()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
            continue
        bad = ("non-finite values" if not bool(torch.isfinite(t).all()) else
               f"values beyond {IMPLAUSIBLE:.0e}" if float(t.abs().max()) > IMPLAUSIBLE else
               "negative values in a second moment" if name.endswith(non_negative) and float(t.min()) < 0 else None)
        if bad:
            raise UserError(f"{path}: {name} holds {bad}, which no trained model has (damaged bytes?): {fix}")


def read_checkpoint(model_path: str) -> tuple:
    """(GPTConfig, reference state dict as float32 numpy, meta) of a nanochat model_<step>.pt and its meta json: the
    one reader of nanochat model files (base_eval's --nanochat-checkpoint, --init-from), every file checked."""
    meta = read_meta(model_path)
    state = read_state(model_path)
    layout = Layout.of_checkpoint(meta["model_config"], state)
    check_state(state, layout, model_path)
    return layout.config, to_numpy(state), meta


def read_optimizer(model_path: str) -> list[dict]:
    """Every rank's optimizer state_dict saved beside a model file, in rank order (memory-mapped, each checked to be
    a MuonAdamW state_dict), or a UserError if there is none."""
    fix = "copy it again, or start without --resume-optimizer"
    shards = []
    while os.path.exists(path := optim_path(model_path, len(shards))):
        shard = read_torch(path, "nanochat optimizer file", fix)
        if not (isinstance(shard, dict) and isinstance(shard.get("state"), dict)
                and isinstance(shard.get("param_groups"), list)
                and all(isinstance(g, dict) and "params" in g for g in shard["param_groups"])):
            raise UserError(f"{path} is not an optimizer state_dict (state and param_groups): {fix}")
        shards.append(shard)
    if not shards:
        raise UserError(f"--resume-optimizer: no {optim_path(model_path, 0)}; start without --resume-optimizer")
    return shards


def check_optimizer(shards: list[dict], groups: tuple[Group, ...], model_path: str) -> None:
    """The optimizer files' groups against this model's (sizes, and each group's state entries in every rank's
    file), before anything is compiled or read into memory."""
    saved = shards[0]["param_groups"]
    if [len(g["params"]) for g in saved] != [len(g.names) for g in groups]:
        raise UserError(f"the optimizer file's groups ({[len(g['params']) for g in saved]} parameters) differ from "
                        f"this model's ({[len(g.names) for g in groups]}): start without --resume-optimizer")
    for rank, shard in enumerate(shards):
        for g, s in zip(groups, shard["param_groups"]):
            keys = ("step", "exp_avg", "exp_avg_sq") if g.kind == "adamw" else ("momentum_buffer",
                                                                                "second_momentum_buffer")
            for i in s["params"] if g.kind == "adamw" else s["params"][:1]:
                if not all(k in shard["state"].get(i, {}) for k in keys):
                    raise UserError(f"{optim_path(model_path, rank)} lacks the {'/'.join(keys)} of parameter {i}: "
                                    f"copy it again, or start without --resume-optimizer")
        check_values({f"state[{i}].{k}": v for i, entry in shard["state"].items() for k, v in entry.items()},
                     optim_path(model_path, rank), "copy it again, or start without --resume-optimizer",
                     non_negative=("exp_avg_sq", "second_momentum_buffer"))


# Which training flag sets each model_config field (for the line that says how to match a checkpoint).
FLAG_FOR = {"n_layer": "--depth", "n_embd": "--depth x --aspect-ratio (rounded to --head-dim)", "n_head": "--head-dim",
            "n_kv_head": "--head-dim", "sequence_len": "--max-seq-len", "window_pattern": "--window-pattern",
            "vocab_size": "the tokenizer (--data)", "recipe": "--recipe"}


def check_config(config, saved, source: str) -> None:
    """UserError naming every model_config field (and the recipe) where the checkpoint and this run's flags differ."""
    differ = [k for k in MODEL_CONFIG_KEYS + ("recipe",) if getattr(config, k) != getattr(saved, k)]
    if differ:
        raise UserError(f"--init-from={source} holds another model: " + "; ".join(
            f"{k} {getattr(saved, k)} there, {getattr(config, k)} here (set by {FLAG_FOR[k]})" for k in differ))


class Source(NamedTuple):
    """--init-from's checkpoint, read and checked against this run (before anything compiles); tensors are
    memory-mapped from the files until placed."""

    path: str  # the model_<step>.pt
    meta: dict
    state: dict  # nanochat's state dict
    layout: Layout  # its names, shapes and optimizer groups (this run's model: checked)
    shards: list | None  # every rank's optimizer state_dict (with --resume-optimizer)


def check_source(source: str, config, with_optimizer: bool, tok=None) -> Source:
    """--init-from's files (model, meta, optimizer with `with_optimizer`) read and checked against this run's model
    config, recipe and tokenizer (`tok`; the one in the nanochat base directory's tokenizer/, when there is one)."""
    torch_module()
    path = find_model_file(source)
    meta = read_meta(path)
    # The tokenizer first: another one also explains a vocab_size that differs below.
    if tok is not None:
        check_tokenizer_present(f"--init-from={source}", path, mine=tok.directory)
        from jaxchat.data.tokenizer import Tokenizer, check_recorded
        tok_dir = tokenizer_of(path)
        check_recorded(tok, Tokenizer.load(tok_dir).fingerprint(), f"--init-from={source}", recorded_at=tok_dir,
                       otherwise="--init-from a model trained with this run's tokenizer")
    state = read_state(path)
    layout = Layout.of_checkpoint(meta["model_config"], state)
    check_config(config, layout.config, source)
    check_state(state, layout, path)
    return Source(path, meta, state, layout, read_checked_optimizer(path, layout) if with_optimizer else None)


def read_checked_optimizer(model_path: str, layout: Layout) -> list[dict]:
    """Every rank's optimizer state_dict beside a model file, checked against the layout's groups."""
    shards = read_optimizer(model_path)
    check_optimizer(shards, layout.groups, model_path)
    return shards


def check_tokenizer_present(what: str, model_path: str, mine: str | None = None, flag: str | None = None) -> None:
    """A nanochat model's tokenizer is its base directory's tokenizer/ (as nanochat's tok_train and jaxchat.export
    write it): nanochat's model and meta files record none (nanochat/checkpoint_manager.py at 348fbb3 saves the model
    config and the step only), so without that folder nothing says which tokenizer the weights were trained with,
    and a same-size tokenizer of other merges trained (--init-from) or evaluated (base_eval --nanochat-checkpoint)
    silently on wrongly tokenized text. Refused in one line naming the folder, or the `flag`, that says which.

    what: the flag and value that named the model; mine: the command's own tokenizer folder (suggested to copy)."""
    tok_dir = tokenizer_of(model_path)
    if os.path.isfile(os.path.join(tok_dir, "tokenizer.pkl")):
        return
    layout = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(model_path)))) == "base_checkpoints"
    where = ("" if layout else f"; its files are not in nanochat's layout <base>/base_checkpoints/<tag>/"
             f"model_<step>.pt beside <base>/tokenizer/, so copy them into one first")
    copy = f" (if it is this run's: cp -r {mine} {tok_dir})" if mine else ""
    say = f"pass {flag}=DIR naming the tokenizer it was trained with, or " if flag else ""
    raise UserError(f"{what}: no tokenizer at {tok_dir}, and nanochat's model files do not record which tokenizer "
                    f"the model was trained with, so it cannot be checked: {say}copy the tokenizer folder it was "
                    f"trained with (tokenizer.pkl) to {tok_dir}{copy}{where}")


def tokenizer_of(model_path: str) -> str:
    """The tokenizer directory of a nanochat base directory holding `model_path` (base_checkpoints/<tag>/model_*.pt),
    as nanochat's tok_train and jaxchat.export write it."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(model_path)))), "tokenizer")


def start_from(source: str | Source, config, targets: tuple, opt_state, with_optimizer: bool) -> tuple:
    """(params, opt_state, meta) for --init-from: a nanochat checkpoint's weights (and with `with_optimizer` its
    optimizer moments) placed like `targets` (abstract params and optimizer state with shardings); the rest of
    `opt_state` (schedule values) is kept.

    source: a Source (check_source), or a model_<step>.pt, its directory, or a nanochat base directory, checked
    here against this run's model `config`.
    """
    if not isinstance(source, Source):
        source = check_source(source, config, with_optimizer)
    if with_optimizer and source.shards is None:  # read without them
        source = source._replace(shards=read_checked_optimizer(source.path, source.layout))
    state = to_numpy(source.state)
    moments = load_moments(source) if with_optimizer else None
    params = jax.tree.map(_place, source.layout.from_nanochat(state), targets[0])
    if moments is not None:
        opt_state = optim.write_moments(opt_state, targets[1], moments, _place)
    return params, opt_state, dict(source.meta, path=source.path)


def load_moments(source: Source) -> dict:
    """The optimizer moments of a Source read with its optimizer files (optimizer_from_shards), or a UserError."""
    try:
        return optimizer_from_shards(source.shards, source.layout)
    except (KeyError, IndexError, ValueError, TypeError) as e:  # tensors of the wrong shapes
        raise UserError(f"cannot use the optimizer state beside {source.path} ({type(e).__name__}: "
                        f"{str(e)[:100]}): start without --resume-optimizer") from None


def _place(value, target):
    """A host array as a global array with the target's dtype and sharding (each process supplies its own shards)."""
    value = np.asarray(value).astype(target.dtype)
    if value.shape != target.shape:
        raise UserError(f"a nanochat tensor of shape {value.shape} does not fit this model's {target.shape}")
    return jax.make_array_from_callback(target.shape, target.sharding, lambda index: value[index])


# ---------------------------------------------------------------------------------------------------------------
# Writing


def save(obj, path: str, label: str) -> None:
    """torch.save through a temporary file and a rename, with a byte progress bar for large files on a terminal."""
    from tqdm import tqdm
    torch = torch_module()
    total = _nbytes(obj)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with replacing(path) as tmp:
        with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=label,
                                        disable=True if total < LARGE_WRITE else None) as bar:
            torch.save(obj, _Counting(f, bar))


def write_json(obj: dict, path: str) -> None:
    """JSON with indent 2 (as nanochat writes meta files), through a temporary file and a rename."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)


def _nbytes(obj) -> int:
    if hasattr(obj, "nbytes"):
        return int(obj.nbytes)
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


class _Counting(io.RawIOBase):
    """A writable file that advances a progress bar by the bytes written."""

    def __init__(self, f, bar):
        self.f, self.bar = f, bar

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        n = self.f.write(data)
        self.bar.update(n)
        return n

    def flush(self) -> None:
        self.f.flush()
