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

import numpy as np

from jaxchat.common import UserError
from jaxchat.convert import config_from_dict, from_reference, to_reference

# nanochat's GPTConfig fields: GPT(GPTConfig(**model_config)) rejects any other key.
MODEL_CONFIG_KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern")
# Every meta key nanochat reads: checkpoint_manager.build_model (model_config), base_train resume (step, val_bpb,
# loop_state, dataloader_state_dict), mid_train / chat_sft (device_batch_size, max_seq_len, total_batch_size,
# user_config's learning rates).
META_KEYS = ("step", "val_bpb", "model_config", "user_config", "device_batch_size", "max_seq_len", "total_batch_size",
             "dataloader_state_dict", "loop_state")
LOOP_STATE_KEYS = ("min_val_bpb", "smooth_train_loss", "total_training_time")
# The reference's AdamW groups (nanochat/gpt.py setup_optimizer): jaxchat optimizer label -> parameters, in order.
ADAMW_GROUP_PARAMS = {
    "lm_head": ("lm_head.weight",),
    "wte": ("transformer.wte.weight",),
    "value_embeds": ("value_embeds.",),  # every value_embeds.<layer>.weight, by layer
    "resid_lambdas": ("resid_lambdas",),
    "x0_lambdas": ("x0_lambdas",),
    "smear": ("smear_gate.weight", "smear_lambda", "backout_lambda"),  # 92d63d4
}
# Order of a block's parameters in `transformer.h.parameters()` (module registration order), which orders Muon groups.
BLOCK_ORDER = ("attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight", "attn.c_proj.weight", "attn.ve_gate.weight",
               "mlp.c_fc.weight", "mlp.c_proj.weight")
LARGE_WRITE = 16 * 2**20  # bytes from which a write shows a progress bar (on a terminal)


def torch_module():
    """The torch module, or a UserError saying how to install it."""
    try:
        import torch
    except ImportError:
        raise UserError("reading or writing nanochat's .pt files needs PyTorch: pip install -e '.[torch]'") from None
    return torch


def paths(base: str, tag: str, step: int) -> dict[str, str]:
    """Where each file of step `step` lives under a nanochat base directory."""
    ckpt = os.path.join(base, "base_checkpoints", tag)
    return {"model": os.path.join(ckpt, f"model_{step:06d}.pt"), "meta": os.path.join(ckpt, f"meta_{step:06d}.json"),
            "tokenizer": os.path.join(base, "tokenizer", "tokenizer.pkl"),
            "token_bytes": os.path.join(base, "tokenizer", "token_bytes.pt")}


def optim_path(model_path: str, rank: int) -> str:
    return re.sub(r"model_(\d+)\.pt$", rf"optim_\1_rank{rank}.pt", model_path)


# ---------------------------------------------------------------------------------------------------------------
# Model state dict


def model_state(params: dict, config, embed_dtype: str = "") -> dict:
    """jaxchat parameters as nanochat's state dict of torch tensors (contiguous, so each file holds only its bytes).

    Every tensor is float32 like nanochat's master weights, except wte and value embeddings, which keep the dtype
    they were trained in (bfloat16 like nanochat on CUDA, float32 like nanochat on CPU) unless `embed_dtype` says.
    """
    torch = torch_module()
    embeds = {k: str(np.asarray(params[k]).dtype) for k in ("wte", "value_embeds")}
    state = {}
    for name, value in to_reference(params, config).items():
        kind = "wte" if name == "transformer.wte.weight" else "value_embeds" if name.startswith("value_embeds.") else ""
        dtype = (embed_dtype or embeds[kind]) if kind else "float32"
        tensor = torch.from_numpy(np.array(value, np.float32, order="C"))
        state[name] = tensor.to(getattr(torch, dtype)) if dtype != "float32" else tensor
    return state


def to_numpy(tensors: dict) -> dict[str, np.ndarray]:
    """A state dict of torch tensors as float32 numpy arrays (bfloat16 widens exactly); '_orig_mod.' prefixes dropped."""
    return {k.removeprefix("_orig_mod."): v.float().numpy() for k, v in tensors.items()}


# ---------------------------------------------------------------------------------------------------------------
# Optimizer state: jaxchat's restored optimizer tree (orbax, no target: dicts, None where optax masks a leaf)


def _merge(trees: list) -> dict:
    """One parameter-shaped tree from masked ones (each leaf present in exactly one)."""
    out = {}
    for tree in trees:
        for k, v in tree.items():
            if isinstance(v, dict):
                out[k] = _merge([out.get(k, {}), v])
            elif v is not None:
                out[k] = np.asarray(v)
    return out


def _moments(opt: dict) -> tuple[dict, dict, dict[str, int]]:
    """(first moments, second moments, AdamW step count per label) as parameter-shaped trees."""
    groups = opt["inner"]["inner_states"]
    firsts, seconds, counts = [], [], {}
    for label, group in groups.items():
        state = group["inner_state"]
        if "momentum" in state:
            firsts.append(state["momentum"])
            seconds.append(state["second_moment"])
        else:
            firsts.append(state["mu"])
            seconds.append(state["nu"])
            counts[label] = int(state["count"])
    return _merge(firsts), _merge(seconds), counts


def param_groups(names: list[str], labels: list[str], hyper: dict, shapes: dict[str, tuple]) -> list[dict]:
    """nanochat's param_groups (without 'params'), each with its parameter names under 'names', in nanochat's order.

    labels: jaxchat's AdamW groups in the reference's order; hyper: label (and 'muon') -> kind, lr, betas / beta2,
    weight_decay, as the optimizer runs them; shapes: reference name -> shape.
    """
    groups = []
    for label in labels:
        members = [n for p in ADAMW_GROUP_PARAMS[label] for n in names if n == p or (p.endswith(".") and n.startswith(p))]
        h = hyper[label]
        groups.append(dict(kind="adamw", lr=h["lr"], betas=list(h["betas"]), eps=h["eps"],
                           weight_decay=h["weight_decay"], initial_lr=h["initial_lr"], names=members))
    blocks = [n for n in names if n.startswith("transformer.h.")]
    unknown = [n for n in blocks if n.split(".", 3)[3] not in BLOCK_ORDER]
    if unknown:
        raise UserError(f"no Muon group order for {unknown[:3]}: extend nanochat_ckpt.BLOCK_ORDER")
    blocks.sort(key=lambda n: (int(n.split(".")[2]), BLOCK_ORDER.index(n.split(".", 3)[3])))
    h = hyper["muon"]
    for shape in sorted({shapes[n] for n in blocks}):
        groups.append(dict(kind="muon", lr=h["lr"], momentum=h["momentum"], ns_steps=h["ns_steps"], beta2=h["beta2"],
                           weight_decay=h["weight_decay"], initial_lr=h["initial_lr"],
                           names=[n for n in blocks if shapes[n] == shape]))
    return groups


def optimizer_shards(opt: dict, config, groups: list[dict], world_size: int) -> list[dict]:
    """nanochat's optimizer state_dict for each of `world_size` ranks (nanochat/optim.py DistMuonAdamW layout:
    AdamW parameters of 1024 or more elements split by rows, Muon stacks zero-padded and split in chunks)."""
    torch = torch_module()
    first, second, counts = _moments(opt)
    m1, m2 = to_reference(first, config), to_reference(second, config)
    index = {n: i for i, n in enumerate(n for g in groups for n in g["names"])}
    label_of = {n: label for label, ps in ADAMW_GROUP_PARAMS.items() for n in m1
                if n in ps or any(p.endswith(".") and n.startswith(p) for p in ps)}
    shards = []
    for rank in range(world_size):
        state = {}
        for g in groups:
            if g["kind"] == "adamw":
                for n in g["names"]:
                    rows = _rank_rows(m1[n].shape, m1[n].size, rank, world_size)
                    state[index[n]] = {"step": counts[label_of[n]], "exp_avg": _tensor(torch, m1[n][rows]),
                                       "exp_avg_sq": _tensor(torch, m2[n][rows])}
            else:
                chunk = math.ceil(len(g["names"]) / world_size)
                mine = g["names"][rank * chunk:(rank + 1) * chunk]
                state[index[g["names"][0]]] = {k: _tensor(torch, _padded([m[n] for n in mine], chunk, m[g["names"][0]]))
                                               for k, m in (("momentum_buffer", m1), ("second_momentum_buffer", m2))}
        shards.append({"state": state, "param_groups": [
            {**{k: v for k, v in g.items() if k != "names"}, "params": [index[n] for n in g["names"]]} for g in groups]})
    return shards


def _rank_rows(shape: tuple, size: int, rank: int, world_size: int) -> slice:
    """The rows of an AdamW parameter that a rank keeps state for (all of it below 1024 elements)."""
    if world_size == 1 or size < 1024:
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


def optimizer_from_shards(shards: list[dict], config, groups: list[dict], shapes: dict[str, tuple]) -> dict:
    """The inverse of `optimizer_shards`: {"first": tree, "second": tree (parameter layout), "count": AdamW step}.

    groups: this model's `param_groups` (checked against the file's group sizes); shapes: reference name -> shape.
    """
    saved = shards[0]["param_groups"]
    if [len(g["params"]) for g in saved] != [len(g["names"]) for g in groups]:
        raise UserError(f"the optimizer file's groups ({[len(g['params']) for g in saved]} parameters) differ from "
                        f"this model's ({[len(g['names']) for g in groups]}): start without --resume-optimizer")
    m1, m2, steps = {}, {}, set()
    for g, s in zip(groups, saved):
        if g["kind"] == "adamw":
            for n, i in zip(g["names"], s["params"]):
                split = len(shards) > 1 and math.prod(shapes[n]) >= 1024  # the rows of each rank, concatenated
                for key, m in (("exp_avg", m1), ("exp_avg_sq", m2)):
                    parts = [shard["state"][i][key].float().numpy() for shard in (shards if split else shards[:1])]
                    m[n] = np.concatenate(parts)
                steps.add(int(shards[0]["state"][i]["step"]))
        else:
            first = s["params"][0]
            for key, m in (("momentum_buffer", m1), ("second_momentum_buffer", m2)):
                stack = np.concatenate([shard["state"][first][key].float().numpy() for shard in shards])
                m.update(zip(g["names"], stack[:len(g["names"])]))
    if len(steps) > 1:
        raise UserError(f"the optimizer file's AdamW step counts differ ({sorted(steps)}); start without "
                        f"--resume-optimizer")
    return {"first": from_reference(m1, config), "second": from_reference(m2, config), "count": max(steps, default=0)}


# ---------------------------------------------------------------------------------------------------------------
# Reading a nanochat checkpoint


def find_model_file(source: str, tag: str = "", step: int | None = None) -> str:
    """model_<step>.pt from a file, a checkpoint directory, or a base directory with base_checkpoints/<tag>."""
    if os.path.isfile(source):
        return source
    if not os.path.isdir(source):
        raise UserError(f"--init-from={source}: no such file or directory (give a nanochat model_<step>.pt, its "
                        f"directory, or a nanochat base directory)")
    ckpts = os.path.join(source, "base_checkpoints")
    if os.path.isdir(ckpts):
        tags = sorted(t for t in os.listdir(ckpts) if os.path.isdir(os.path.join(ckpts, t)))
        if tag and tag in tags:
            tags = [tag]
        if len(tags) != 1:
            raise UserError(f"--init-from={source} holds {len(tags)} model tags {tags}: point it at one of "
                            f"{ckpts}/<tag>")
        source = os.path.join(ckpts, tags[0])
    steps = sorted(int(m.group(1)) for f in os.listdir(source) if (m := re.fullmatch(r"model_(\d+)\.pt", f)))
    if not steps:
        raise UserError(f"--init-from={source}: no model_<step>.pt in it")
    if step is not None and step not in steps:
        raise UserError(f"--init-from={source}: no step {step}; steps there: {steps}")
    return os.path.join(source, f"model_{steps[-1] if step is None else step:06d}.pt")


def read_checkpoint(model_path: str) -> tuple:
    """(GPTConfig, reference state dict as float32 numpy, meta) of a nanochat model_<step>.pt and its meta json."""
    torch = torch_module()
    meta_path = re.sub(r"model_(\d+)\.pt$", r"meta_\1.json", model_path)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        config = config_from_dict(meta["model_config"])
        state = torch.load(model_path, map_location="cpu", weights_only=True)
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot read nanochat checkpoint {model_path} with {meta_path}: {e}") from None
    return config, to_numpy(state), meta


def read_optimizer(model_path: str) -> list[dict]:
    """Every rank's optimizer state_dict saved beside a model file, in rank order (UserError if there is none)."""
    torch = torch_module()
    shards = []
    while os.path.exists(path := optim_path(model_path, len(shards))):
        shards.append(torch.load(path, map_location="cpu", weights_only=True))
    if not shards:
        raise UserError(f"--resume-optimizer: no {optim_path(model_path, 0)}; start without --resume-optimizer")
    return shards


# ---------------------------------------------------------------------------------------------------------------
# Writing


def save(obj, path: str, label: str) -> None:
    """torch.save through a temporary file and a rename, with a byte progress bar for large files on a terminal."""
    from tqdm import tqdm
    torch = torch_module()
    total = _nbytes(obj)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=label,
                                              disable=True if total < LARGE_WRITE else None) as bar:
        torch.save(obj, _Counting(f, bar))
    os.replace(path + ".tmp", path)


def write_json(obj: dict, path: str) -> None:
    """JSON with indent 2 (as nanochat writes meta files), through a temporary file and a rename."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


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
