"""Export a jaxchat checkpoint as a nanochat base directory, for nanochat's midtraining, SFT, RL and chat UI.

    python -m jaxchat.export --model-tag=d24 [--step N] --to DIR [--world-size W] [--force]
    NANOCHAT_BASE_DIR=DIR torchrun --nproc_per_node=W -m scripts.chat_sft -- --model-tag=d24   # in nanochat

Writes DIR/base_checkpoints/<tag>/{model,meta}_<step>.pt|json, optim_<step>_rank<r>.pt for r < W, and
DIR/tokenizer/{tokenizer.pkl,token_bytes.pt}: nanochat's names, layouts and dtypes (jaxchat.interop.nanochat_ckpt).
Needs PyTorch (pip install -e '.[torch]').
"""

import argparse
import contextlib
import os
import shutil
import sys

import numpy as np

from jaxchat.data import tokenizer as toklib
from jaxchat.interop import nanochat_ckpt
from jaxchat.interop.convert import Layout, config_from_dict
from jaxchat.runtime import cli
from jaxchat.runtime.common import UserError, check_name, check_output, replacing, user_path
from jaxchat.training import optim
from jaxchat.training import recipe as recipes
from jaxchat.training.config import DEFAULTS, optimizer_flags
from jaxchat.training.recipe import batch_lr_scale


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxchat.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--model-tag", required=True,
                   help="the jaxchat checkpoint to export: $JAXCHAT_BASE_DIR/base_checkpoints/<tag> (e.g. d24)")
    p.add_argument("--step", type=int, default=None, help="the step to export (default: the newest complete one)")
    p.add_argument("--to", required=True, metavar="DIR", type=user_path,
                   help="the nanochat base directory to write into (nanochat's NANOCHAT_BASE_DIR)")
    p.add_argument("--tag", default="", help="model tag under DIR/base_checkpoints (default: --model-tag)")
    p.add_argument("--world-size", type=int, default=1,
                   help="how many processes the nanochat run that loads the optimizer state will have: one "
                        "optim_<step>_rank<r>.pt per rank, split as nanochat splits it (default 1)")
    p.add_argument("--no-optimizer", action="store_true",
                   help="write the model, meta and tokenizer only (enough for nanochat's eval, SFT without "
                        "--load-optimizer, and chat)")
    p.add_argument("--embed-dtype", default="", choices=("", "bfloat16", "float32"),
                   help="dtype of wte and value embeddings in model_<step>.pt (default: as trained; nanochat saves "
                        "bfloat16 on CUDA, float32 on CPU; every other tensor is float32 as in nanochat)")
    p.add_argument("--tokenizer-dir", default="", type=user_path,
                   help="the tokenizer to ship (default: the one of the run's --data source)")
    p.add_argument("--force", action="store_true", help="overwrite files that already exist in DIR")
    p.error = lambda message: (_ for _ in ()).throw(UserError(f"{message} (see python -m jaxchat.export --help)"))
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    check_name(args.model_tag, "--model-tag")
    if args.tag:
        check_name(args.tag, "--tag")
    if args.world_size < 1:
        raise UserError(f"--world-size={args.world_size} must be at least 1")
    return args


def open_jaxchat(model_tag: str, step: int | None) -> tuple:
    """(reader, step, meta) of a jaxchat checkpoint, nothing restored yet."""
    from jaxchat.runtime.checkpoint import Checkpointer, checkpoint_dir

    ckpt = Checkpointer(checkpoint_dir(model_tag), async_save=False, step_flag="--step")
    step = ckpt.resolve_step("last" if step is None else step)
    return ckpt, step, ckpt.read_meta(step)


def read_jaxchat(model_tag: str, step: int | None, opened: tuple | None = None) -> tuple[int, dict, dict, dict]:
    """(step, params, optimizer state, meta) of a jaxchat checkpoint (`opened` by open_jaxchat, else opened here),
    as saved (numpy; no model or optimizer built)."""
    import orbax.checkpoint as ocp

    ckpt, step, _ = opened or open_jaxchat(model_tag, step)
    items = dict(params=ocp.args.StandardRestore(), opt_state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
    try:
        restored = ckpt.manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, OSError) as e:
        raise UserError(f"cannot read checkpoint {ckpt.directory}/{step}: {str(e).splitlines()[0][:200]}") from None
    finally:
        ckpt.close()
    return step, _as_numpy(restored["params"]), _as_numpy(restored["opt_state"]), restored["meta"]


def _as_numpy(tree: dict) -> dict:
    return {k: _as_numpy(v) if isinstance(v, dict) else None if v is None else np.asarray(v) for k, v in tree.items()}


def nanochat_meta(meta: dict, config) -> dict:
    """The meta json nanochat writes: its keys only, model_config with GPTConfig's fields only."""
    out = {k: meta.get(k) for k in nanochat_ckpt.META_KEYS}
    out["model_config"] = {k: getattr(config, k) for k in nanochat_ckpt.MODEL_CONFIG_KEYS}
    loader = meta.get("dataloader_state_dict") or {}
    out["dataloader_state_dict"] = {k: loader[k] for k in ("pq_idx", "rg_idx", "epoch") if k in loader}
    out["loop_state"] = {k: (meta.get("loop_state") or {}).get(k) for k in nanochat_ckpt.LOOP_STATE_KEYS}
    return out


def group_settings(user_config: dict, total_batch_size: int, model_dim: int, schedule: dict, recipe) -> dict:
    """Each optimizer group's fields as nanochat's param_groups hold them after the last step (the LR multiplier,
    Muon momentum and weight decay of that step applied), by jaxchat optimizer label; `total_batch_size` is the
    batch the run trained with (the recipe's auto batch resolved)."""
    flags = optimizer_flags(dict(DEFAULTS, **user_config))  # a run saved without --adam-beta*: the flags' defaults
    base = optim.group_hyperparams(model_dim=model_dim, **flags, batch_lr_scale=batch_lr_scale(total_batch_size),
                                   adamw_groups=recipe.adamw_groups, muon_variant=recipe.muon)
    return optim.param_group_fields(base, recipe.adamw_groups, float(schedule["lrm"]), float(schedule["momentum"]),
                                    float(schedule["wd"]))


def optimizer_files(opt: dict, meta: dict, layout, world_size: int) -> list[dict]:
    """nanochat's optimizer state_dict of every rank for a jaxchat optimizer state (of the model `layout` describes:
    convert.Layout)."""
    total_batch_size = meta.get("total_batch_size") or meta["user_config"]["total_batch_size"]
    settings = group_settings(meta["user_config"], total_batch_size, layout.config.n_embd, opt["schedule"],
                              recipes.get(layout.config.recipe))
    return nanochat_ckpt.optimizer_shards(opt, layout, settings, world_size)


def tokenizer_files(tok, vocab_size: int) -> tuple[str, object]:
    """(tokenizer.pkl path, token_bytes tensor) of the run's tokenizer, checked against the model's vocabulary."""
    if tok.vocab_size != vocab_size:
        raise UserError(f"the tokenizer in {tok.directory} has {tok.vocab_size} tokens, the model {vocab_size} "
                        f"(nanochat checks they match): pass the run's tokenizer with --tokenizer-dir")
    torch = nanochat_ckpt.torch_module()
    return os.path.join(tok.directory, "tokenizer.pkl"), torch.from_numpy(tok.get_token_bytes().astype(np.int32))


def check_targets(files: dict[str, str], tokenizer_pkl: str, force: bool) -> None:
    """Refuse to overwrite without --force; a tokenizer.pkl identical to ours is kept (another step, same run). Files
    an export left unfinished (killed: its meta json, written after the model and optimizer, missing, or `.tmp`
    files beside them) are named as such, so the refusal says why and what --force replaces."""
    unfinished = sorted(p + ".tmp" for p in files.values() if os.path.exists(p + ".tmp"))
    if force:
        for tmp in unfinished:  # ours, half-written: the export writes each file whole again
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        return
    for kind, path in files.items():
        if not os.path.exists(path):
            continue
        if kind in ("tokenizer", "token_bytes") and _same_file(files["tokenizer"], tokenizer_pkl):
            continue
        signs = ([] if os.path.exists(files["meta"]) else [f"no {os.path.basename(files['meta'])}"]) + \
            [f"unfinished {os.path.basename(tmp)}" for tmp in unfinished]
        if signs:
            raise UserError(f"{path} already exists, left by an export that did not finish ({', '.join(signs)}): "
                            f"pass --force to write this step's files again, or export --to another directory")
        raise UserError(f"{path} already exists: pass --force to overwrite it, or export --to another directory")


def _same_file(a: str, b: str) -> bool:
    if not os.path.exists(a):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def export(argv: list[str]) -> dict[str, str]:
    """Run the export; returns the paths written."""
    args = parse_args(argv)
    check_output(args.to, "--to", directory=True)  # before reading anything
    nanochat_ckpt.torch_module()  # before reading anything: one line if PyTorch is missing
    from jaxchat.runtime.checkpoint import recorded_tokenizer  # orbax: slow to import, so not for --help

    opened = open_jaxchat(args.model_tag, args.step)
    _, step, meta = opened
    config = config_from_dict(meta["model_config"])
    layout = Layout.of(config)
    source = meta["user_config"].get("data", "fineweb-edu")
    tok = toklib.Tokenizer.load(args.tokenizer_dir or toklib.default_dir(source))
    tok = toklib.check_recorded(tok, recorded_tokenizer(meta), f"step {step} of {args.model_tag}",
                                flag="--tokenizer-dir", chosen=bool(args.tokenizer_dir))
    tokenizer_pkl, token_bytes = tokenizer_files(tok, config.vocab_size)
    files = nanochat_ckpt.paths(args.to, args.tag or args.model_tag, step)
    if not args.no_optimizer:
        files.update({f"optim{r}": nanochat_ckpt.optim_path(files["model"], r) for r in range(args.world_size)})
    check_targets(files, tokenizer_pkl, args.force)
    step, params, opt, meta = read_jaxchat(args.model_tag, step, opened)

    state = nanochat_ckpt.model_state(params, layout, args.embed_dtype)
    shards = [] if args.no_optimizer else optimizer_files(opt, meta, layout, args.world_size)  # may refuse
    nanochat_ckpt.save(state, files["model"], os.path.basename(files["model"]))
    for rank, shard in enumerate(shards):
        nanochat_ckpt.save(shard, files[f"optim{rank}"], os.path.basename(files[f"optim{rank}"]))
    nanochat_ckpt.write_json(nanochat_meta(meta, config), files["meta"])
    if not _same_file(files["tokenizer"], tokenizer_pkl):
        # --force over another tokenizer: the nanochat checkpoints already in --to need it, so it is kept aside
        if kept := toklib.keep_aside(os.path.dirname(files["tokenizer"]), unless=tok.fingerprint()):
            print(f"The tokenizer in {os.path.dirname(files['tokenizer'])} is another one: kept in {kept}")
        os.makedirs(os.path.dirname(files["tokenizer"]), exist_ok=True)
        with replacing(files["tokenizer"]) as tmp:
            shutil.copyfile(tokenizer_pkl, tmp)
    nanochat_ckpt.save(token_bytes, files["token_bytes"], "token_bytes.pt")
    print(f"Exported step {step} of {args.model_tag} to {os.path.dirname(files['model'])} "
          f"({len(state)} tensors{'' if args.no_optimizer else f', optimizer for {args.world_size} rank(s)'}) and "
          f"its tokenizer to {os.path.dirname(files['tokenizer'])}; in nanochat: NANOCHAT_BASE_DIR={args.to}")
    return files


if __name__ == "__main__":
    cli.run(export, sys.argv[1:])
