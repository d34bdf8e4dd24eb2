"""Training flags: nanochat's scripts/base_train.py flags with its defaults (at 348fbb3), jaxchat's own flags,
ml_collections config files and overrides.

    python -m jaxchat.train --depth=26 --target-param-data-ratio=8.25 --device-batch-size=16 --run=my-run
    python -m jaxchat.train --config=configs/d26.py --config.device_batch_size=16

Precedence: defaults < the --recipe's defaults < config file < `--config.key=value` < nanochat-style `--key=value`
flags. Booleans take
`--flag` / `--no-flag` or nanochat's `--flag=True` / `--flag=False`.
"""

import argparse
import importlib.util
import math
import os
import types

from ml_collections import ConfigDict

from jaxchat.model.gpt import GPTConfig
from jaxchat.model.remat import REMAT_POLICIES
from jaxchat.runtime.common import JAXCHAT_ONLY, HelpFormatter, UserError, check_name, finite_float, user_path
from jaxchat.training import recipe as recipes

AUTO = 0  # --device-batch-size=auto, as the flags store it (the one place that says 0 means auto; jaxchat.training.memory)
JAXCHAT_GROUP = "jaxchat"  # starts the name of each group of flags that nanochat's base_train does not have

# Every flag: {group: [(name, default, one-line description)]}. The first seven groups are nanochat's base_train
# flags in its order and with its defaults; the "jaxchat: ..." groups are jaxchat's own (their help says so too).
FLAGS = {
    "logging": [
        ("run", "dummy", "WandB run name; 'dummy' disables WandB"),
    ],
    "runtime": [
        ("device_type", "", "accepted for nanochat compatibility and ignored: JAX picks the backend (JAX_PLATFORMS)"),
    ],
    "model architecture": [
        ("depth", 20, "number of transformer layers: the one dial that sizes the model"),
        ("aspect_ratio", 64, "model width = depth x aspect ratio, rounded up to a multiple of --head-dim"),
        ("head_dim", 128, "attention head dimension"),
        ("max_seq_len", 2048, "context length in tokens"),
        ("window_pattern", "SSSL", "attention windows tiled over the layers: L = full context, S = half (the last "
                                   "layer is always L)"),
    ],
    "training horizon (the first one set wins)": [
        ("num_iterations", -1, "optimizer steps to train (-1 = off)"),
        ("target_flops", -1.0, "train until this many FLOPs (-1 = off)"),
        ("target_param_data_ratio", 10.5, "train on this many tokens per scaling parameter (-1 = off)"),
    ],
    "optimization": [
        ("device_batch_size", 32, "rows per device per micro-batch, or 'auto': the largest power of 2 <= 32 that is "
                                  "predicted to fit"),
        ("total_batch_size", 524288, "tokens per optimizer step (micro-batches are accumulated to reach it); -1 = "
                                     "auto from the horizon (recipe 92d63d4)"),
        ("embedding_lr", 0.3, "AdamW learning rate of the token embedding"),
        ("unembedding_lr", 0.004, "AdamW learning rate of the lm_head"),
        ("weight_decay", 0.2, "Muon weight decay at depth 12 (scaled by (12/depth)^2)"),
        ("matrix_lr", 0.02, "Muon learning rate of the transformer matrices"),
        ("scalar_lr", 0.5, "AdamW learning rate of the per-layer scalars (resid and x0 lambdas)"),
        ("adam_beta1", 0.8, "AdamW beta1"),
        ("adam_beta2", 0.95, "AdamW beta2"),
        ("warmup_ratio", 0.0, "fraction of the steps with a linear LR warmup"),
        ("warmup_steps", -1, "steps of linear LR warmup, nanochat 92d63d4's flag (-1 = from --warmup-ratio)"),
        ("warmdown_ratio", 0.5, "fraction of the steps with a linear LR warmdown at the end"),
        ("final_lr_frac", 0.0, "LR at the end of the warmdown, as a fraction of the peak"),
        ("resume_from_step", "-1", "resume from this checkpoint step, or 'last' (-1 = start fresh); checkpoints "
                                   "newer than it are moved aside (rolled_back/)"),
    ],
    "evaluation": [
        ("eval_every", 250, "validation bits per byte every N steps (-1 = only at the end)"),
        ("eval_tokens", 20 * 524288, "validation tokens per evaluation"),
        ("core_metric_every", 2000, "CORE metric every N steps and at the end (-1 = off)"),
        ("core_metric_max_per_task", 500, "CORE examples per task"),
        ("sample_every", 2000, "greedy samples from fixed prompts every N steps and at the end (-1 = off)"),
        ("save_every", -1, "checkpoint every N steps (-1 = only at the end)"),
    ],
    "output": [
        ("model_tag", "", "checkpoint directory name under base_checkpoints/ ('' = d<depth>)"),
    ],
    f"{JAXCHAT_GROUP}: recipe": [
        ("recipe", recipes.DEFAULT, "nanochat commit whose recipe to train: 348fbb3 (January) or 92d63d4 (the record: "
                                    "its model, optimizer, schedules, auto batch and defaults; explicit flags win)"),
        ("dry_run", False, "print the plan (batch, steps, LR scale, weight decay) and exit: nothing is read or "
                           "compiled"),
    ],
    f"{JAXCHAT_GROUP}: data, mesh and precision": [
        ("data", "fineweb-edu", "training data: fineweb-edu, climbmix or demo (built from the Python docs, offline)"),
        ("fsdp", 1, "size of the FSDP mesh axis (parameters sharded over it); 1 = pure data parallel"),
        ("compute_dtype", "", "activation and matmul dtype: bfloat16 or float32 ('' = bfloat16 on GPU, float32 "
                              "elsewhere)"),
        ("muon_dtype", "", "Muon's orthogonalisation dtype ('' = bfloat16 on GPU like nanochat, float32 elsewhere)"),
        ("embed_dtype", "", "storage dtype of wte and value_embeds ('' = bfloat16 on GPU like nanochat on CUDA, "
                            "float32 elsewhere)"),
        ("fp8", False, "train q, k, v, the projections, c_fc and lm_head in fp8 with dynamic tensorwise scales, like "
                       "nanochat's --fp8 (92d63d4); evaluation stays bf16; faster only on CUDA compute capability "
                       ">= 8.9"),
        ("allow_odd_depth", False, "allow an odd --depth (its width is nudged up, which nanochat does not recommend)"),
        ("seed", 42, "parameter initialisation seed"),
    ],
    f"{JAXCHAT_GROUP}: memory": [
        ("remat", "auto", "recompute in the backward pass: none, block (each layer), dots (keep matmul and attention "
                          "outputs), dots_no_mlp (dots but the MLP up-projection) or auto (the first of none, dots, "
                          "dots_no_mlp predicted to fit)"),
        ("loss_chunk", 0, "cross-entropy over this many positions at a time, so the full logits never exist (0 = "
                          "off)"),
        ("memory_budget_gb", 0.0, "plan memory against this many GiB per device instead of its capacity (0 = the "
                                  "device's)"),
    ],
    f"{JAXCHAT_GROUP}: checkpoints and logging": [
        ("save_every_minutes", -1.0, "also checkpoint every N minutes; these rotate (-1 = off)"),
        ("keep_last", 2, "timer and preemption checkpoints kept (older ones go once superseded)"),
        ("allow_batch_size_change", False, "resume a checkpoint saved with another --total-batch-size, knowingly"),
        ("allow_data_change", False, "resume a checkpoint whose train shards were removed or rewritten since, "
                                     "knowingly (the position is found by file name)"),
        ("init_from", "", "start at step 0 from a nanochat base checkpoint's weights: a model_<step>.pt, its "
                          "directory (newest step) or a nanochat base directory; the model flags must give its "
                          "model_config (needs PyTorch)"),
        ("resume_optimizer", False, "with --init-from: also load its MuonAdamW state (optim_<step>_rank<r>.pt)"),
        ("log_every", 1, "print the step line every N steps"),
        ("tensorboard", True, "write TensorBoard event files to $JAXCHAT_BASE_DIR/tensorboard/<model-tag>"),
    ],
    f"{JAXCHAT_GROUP}: compilation": [
        ("compile_cache", "auto", "directory of JAX's persistent compilation cache, so a restart loads its compiled "
                                  "programs: auto = $JAX_COMPILATION_CACHE_DIR, else $JAXCHAT_BASE_DIR/jax_cache; "
                                  "'' or off = no cache"),
    ],
    f"{JAXCHAT_GROUP}: several processes (launch/multihost.md)": [
        ("coordinator_address", "", "host:port of process 0 ('' = single process, or SLURM / JAX_* variables)"),
        ("num_processes", 0, "number of processes (0 = from the environment, else 1)"),
        ("process_id", -1, "this process's index (-1 = from the environment)"),
        ("data_shards", 0, "data loader ranks over all processes (0 = one per process); fixed, it keeps the batches "
                           "the same on any number of processes"),
        ("init_timeout", 300, "seconds to wait for every process to join the coordinator"),
        ("peer_timeout", 20, "seconds without a sign of life from another process before this one exits"),
    ],
}


PATH_FLAGS = ("init_from",)  # flags naming a file or folder: `~` and relative paths expanded by common.user_path
# Every flag's default by name, read-only: the one home of nanochat's defaults, which the library functions that
# take a flag's value (config_for_depth, plan.make_plan) default to.
DEFAULTS = types.MappingProxyType({name: default for flags in FLAGS.values() for name, default, _ in flags})


def config_for_depth(depth: int, *, aspect_ratio: int = DEFAULTS["aspect_ratio"], head_dim: int = DEFAULTS["head_dim"],
                     max_seq_len: int = DEFAULTS["max_seq_len"], vocab_size: int = GPTConfig.vocab_size,
                     window_pattern: str = DEFAULTS["window_pattern"], recipe: str = DEFAULTS["recipe"]) -> GPTConfig:
    """The one dial: width = depth * aspect_ratio rounded up to a multiple of head_dim, heads = width / head_dim.
    The defaults are the flags' (DEFAULTS) and nanochat's GPTConfig vocabulary."""
    if min(depth, aspect_ratio, head_dim, max_seq_len) <= 0:  # library guard: the command line refuses it first (config.validate)
        raise ValueError(f"depth {depth}, aspect_ratio {aspect_ratio}, head_dim {head_dim} and max_seq_len "
                         f"{max_seq_len} must be positive")
    model_dim = math.ceil(depth * aspect_ratio / head_dim) * head_dim
    n_head = model_dim // head_dim
    return GPTConfig(sequence_len=max_seq_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_kv_head=n_head, n_embd=model_dim, window_pattern=window_pattern, recipe=recipe)


def defaults() -> ConfigDict:
    """Every flag with its default: nanochat 348fbb3's for its flags, plus jaxchat's own."""
    return ConfigDict(dict(DEFAULTS))


def optimizer_flags(c=DEFAULTS) -> dict:
    """The flags optim.make_optimizer and optim.group_hyperparams take, from the flags `c` (by default nanochat's)."""
    return dict(embedding_lr=c["embedding_lr"], unembedding_lr=c["unembedding_lr"], matrix_lr=c["matrix_lr"],
                scalar_lr=c["scalar_lr"], adam_betas=(c["adam_beta1"], c["adam_beta2"]))


def _parse_flag(key: str, value, like, origin: str = ""):
    """A flag's value as the type of its default; --device-batch-size also takes 'auto' (stored as AUTO).

    origin: where a non-string value came from (a config file), named in the error."""
    if key == "device_batch_size" and str(value).strip().lower() == "auto":
        return AUTO
    flag = origin or '--' + key.replace('_', '-')
    if isinstance(value, str):
        try:
            return _parse_value(value, like)
        except UserError as e:
            raise UserError(f"{flag}: {e}{f'; use {range_text(key)}' if key in RANGES else ''}") from None
    # A config file's Python value: ints for int keys (5e5 and 4.0 are fine, 4.5 is not), numbers for floats.
    ok = (isinstance(value, bool) if isinstance(like, bool) else
          isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()
          if isinstance(like, int) else
          isinstance(value, (int, float)) and not isinstance(value, bool) if isinstance(like, float) else
          isinstance(value, type(like)))
    if not ok:
        raise UserError(f"{origin}: {key}={value!r} must be {type(like).__name__} (like the default {like!r})")
    if isinstance(like, float):
        try:
            finite_float(value)
        except argparse.ArgumentTypeError as e:
            raise UserError(f"{origin}: {key}: {e}; use {range_text(key)}" if key in RANGES else
                            f"{origin}: {key}: {e}") from None
    return int(value) if isinstance(like, int) and not isinstance(like, bool) else value


def _parse_value(text: str, like):
    """Parse a flag value as the type of the default it replaces."""
    try:
        if isinstance(like, bool):
            if text.lower() in ("1", "true", "yes"):
                return True
            if text.lower() in ("0", "false", "no"):
                return False
            raise ValueError(text)
        if isinstance(like, (int, float)):
            float(text)  # not a number at all: "expected int/float" below
            value = finite_float(text)  # NaN and infinities: one line (int(inf) would raise OverflowError)
            if isinstance(like, float):
                return value
            if value != int(value):  # accepts 524288 and 5e5 alike
                raise ValueError(text)
            return int(value)
    except argparse.ArgumentTypeError as e:
        raise UserError(str(e)) from None
    except ValueError:
        raise UserError(f"bad value {text!r}: expected {type(like).__name__}") from None
    return text


def load_config_file(path: str) -> ConfigDict:
    """Run a configs/NAME.py file's get_config() (an optional ':arg' suffix is passed to it)."""
    path, _, arg = path.partition(":")
    if os.path.isfile(user_path(path)):
        path = user_path(path)
    else:  # configs/NAME.py from anywhere: the repository's own
        here = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), path)
        if not os.path.isfile(here):
            raise UserError(f"--config={path}: no such file (configs are in configs/, e.g. --config=configs/d26.py)")
        path = here
    spec = importlib.util.spec_from_file_location("jaxchat_config_file", path)
    module = importlib.util.module_from_spec(spec)
    try:  # the user's Python: any error in it is theirs to fix, named with its line
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise UserError(f"--config={path} defines no get_config()")
        config = module.get_config(arg) if arg else module.get_config()
    except UserError:
        raise
    except (Exception, SystemExit) as e:  # sys.exit() in the file ended the run with its code, nothing trained
        line = getattr(e, "lineno", None) or _user_line(e, path)
        first = (str(e).strip().splitlines() or [""])[0]
        if isinstance(e, SystemExit):
            first = (f"sys.exit({e.code!r}) while it was read (a config file defines get_config(), which returns "
                     f"the values)")

        raise UserError(f"--config={path}{f' line {line}' if line else ''}: {type(e).__name__}: {first}") from None
    if not isinstance(config, (ConfigDict, dict)):
        raise UserError(f"--config={path}: get_config() returned {type(config).__name__}, not a ConfigDict "
                        f"(return ConfigDict(dict(depth=..., ...)))")
    return config


def _user_line(e: Exception, path: str) -> int | None:
    """The line of the config file where an exception was raised, if it was raised there."""
    tb, line = e.__traceback__, None
    while tb is not None:
        if os.path.abspath(tb.tb_frame.f_code.co_filename) == os.path.abspath(path):
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def chosen_recipe(file_values, dotted: list[str], flags: list[str]) -> str:
    """The --recipe a command line asks for (flag > --config.recipe > config file > default), read first: the
    recipe's defaults sit below everything given explicitly."""
    name = str(file_values.get("recipe", recipes.DEFAULT))
    for item in dotted:
        name = item.partition("=")[2] if item.startswith("recipe=") else name
    for i, arg in enumerate(flags):
        if arg.startswith("--recipe="):
            name = arg.split("=", 1)[1]
        elif arg == "--recipe" and i + 1 < len(flags):
            name = flags[i + 1]
    return name


def parse_flags(argv: list[str]) -> ConfigDict:
    """The run's configuration from the command line (argv without the program name)."""
    config = defaults()
    config_file = None
    dotted, flags = [], []
    for arg in argv:
        if arg.startswith("--config="):
            if config_file is not None:  # one file is the base; a second would silently replace it entirely
                raise UserError(f"--config given twice ({config_file} and {arg.split('=', 1)[1]}): give one config "
                                f"file and override its keys with --config.KEY=VALUE or --KEY=VALUE")
            config_file = arg.split("=", 1)[1]
        elif arg.startswith("--config."):
            dotted.append(arg[len("--config."):])
        else:
            flags.append(arg)
    file_values = load_config_file(config_file) if config_file else {}
    config.update(dict(recipes.get(chosen_recipe(file_values, dotted, flags)).defaults))
    if config_file:
        for key, value in file_values.items():
            if key not in config:
                raise UserError(f"--config={config_file} sets unknown key {key!r}; known keys: {sorted(config)}")
            config[key] = _parse_flag(key, value, config[key], origin=f"--config={config_file}")
    for item in dotted:
        key, eq, text = item.partition("=")
        if key not in config or not eq:
            raise UserError(f"--config.{item}: unknown key or missing '=value'; known keys: {sorted(config)}")
        config[key] = _parse_flag(key, text, config[key], origin=f"--config.{key}")
    args = make_parser(config).parse_args(flags)
    if args.config is not None:
        raise UserError("write --config=FILE with '=' (e.g. --config=configs/d26.py)")
    for key, text in vars(args).items():
        if text is not None and key != "config":
            config[key] = _parse_flag(key, text, config[key])
    for key in PATH_FLAGS:  # expanded once, here (compile_cache.resolve expands --compile-cache past auto/off)
        config[key] = user_path(config[key])
    validate(config)
    return config


class _Bool(argparse.Action):
    """A boolean flag: `--flag` / `--no-flag`, or nanochat's `--flag=True` / `--flag=False`."""

    def __init__(self, option_strings, dest, **kwargs):
        negative = ["--no-" + s.removeprefix("--") for s in option_strings]
        super().__init__(option_strings + negative, dest, nargs="?", metavar="BOOL", **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):
        if option_string.startswith("--no-"):
            if value is not None:
                parser.error(f"{option_string} takes no value (write --{option_string[5:]}={value})")
            value = "false"
        setattr(namespace, self.dest, "true" if value is None else value)


class _HelpFormatter(HelpFormatter):
    """Booleans listed as `--flag, --no-flag`; other flags with their value's kind (`--depth INT`)."""

    def _format_action_invocation(self, action):
        if isinstance(action, _Bool):
            return ", ".join(action.option_strings)
        return super()._format_action_invocation(action)


METAVARS = {int: "INT", float: "FLOAT", str: "TEXT"}


def make_parser(config: ConfigDict) -> argparse.ArgumentParser:
    """The command line's parser, grouped like nanochat's base_train; defaults shown are `config`'s (the built-in
    ones, or a config file's)."""
    parser = argparse.ArgumentParser(prog="python -m jaxchat.train", allow_abbrev=False, description=__doc__,
                                     formatter_class=lambda prog: _HelpFormatter(prog, max_help_position=36))
    parser.error = lambda message: (_ for _ in ()).throw(UserError(message + " (see python -m jaxchat.train --help)"))
    files = parser.add_argument_group("config files")
    files.add_argument("--config", metavar="FILE", default=None,
                       help="a configs/NAME.py file with get_config(); --config.KEY=VALUE overrides one of its keys")
    for group, flags in FLAGS.items():
        arguments = parser.add_argument_group(group)
        for name, _, description in flags:
            value = config[name]
            shown = "auto" if name == "device_batch_size" and value == AUTO else repr(value)
            kind = dict(action=_Bool) if isinstance(value, bool) else dict(metavar=METAVARS[type(value)])
            if name == "device_batch_size":
                kind = dict(metavar="INT|auto")
            marker = JAXCHAT_ONLY if group.startswith(JAXCHAT_GROUP) else ""
            valid = f" [{range_text(name)}]" if name in RANGES else ""
            arguments.add_argument("--" + name.replace("_", "-"), dest=name, default=None,
                                   help=f"{marker}{description}{valid} (default: {shown})", **kind)
    return parser


# Valid range of every numeric flag: (lowest, highest, what -1 or 0 means when allowed). "off" flags take -1 (or
# any value <= 0 where nanochat's scripts compare `> 0`); a value outside the range is one line at start-up.
OFF = "-1 = off"
RANGES = {
    "depth": (1, None, ""), "aspect_ratio": (1, None, ""), "head_dim": (2, None, "even"),
    "max_seq_len": (2, None, "even"), "num_iterations": (-1, None, "-1 = from --target-*"),
    "target_flops": (-1, None, "-1 = off"), "target_param_data_ratio": (-1, None, "-1 = off"),
    "device_batch_size": (0, None, "0 or 'auto' = largest that fits"),
    "total_batch_size": (-1, None, "-1 = auto, recipe 92d63d4"), "warmup_steps": (-1, None, "-1 = --warmup-ratio"),
    "embedding_lr": (0, None, ""), "unembedding_lr": (0, None, ""), "matrix_lr": (0, None, ""),
    "scalar_lr": (0, None, ""), "weight_decay": (0, None, ""), "adam_beta1": (0, 1, ""), "adam_beta2": (0, 1, ""),
    "warmup_ratio": (0, 1, ""), "warmdown_ratio": (0, 1, ""), "final_lr_frac": (0, 1, ""),
    "eval_every": (-1, None, OFF), "eval_tokens": (1, None, ""), "core_metric_every": (-1, None, OFF),
    "core_metric_max_per_task": (-1, None, "-1 = all; more than any CORE task's few-shot count"),
    "sample_every": (-1, None, OFF),
    "save_every": (-1, None, OFF), "save_every_minutes": (-1, None, OFF), "keep_last": (1, None, ""),
    "fsdp": (1, None, ""), "loss_chunk": (0, None, "0 = off"), "memory_budget_gb": (0, None, "0 = device capacity"),
    "seed": (0, None, ""), "log_every": (1, None, ""), "num_processes": (0, None, "0 = auto"),
    "process_id": (-1, None, "-1 = auto"), "data_shards": (0, None, "0 = one per process"),
    "init_timeout": (1, None, ""), "peer_timeout": (1, None, ""),
}
# Where -1 means off (or auto), values between -1 and the first real value make no sense (0, -0.5, -3).
REAL_FROM = {"num_iterations": 1, "total_batch_size": 1, "target_flops": 1e-300, "target_param_data_ratio": 1e-300,
             "eval_every": 1, "core_metric_every": 1, "core_metric_max_per_task": 1, "sample_every": 1, "save_every": 1,
             "save_every_minutes": 1e-300}


def range_text(key: str) -> str:
    """A flag's valid range in words (for --help and errors)."""
    lo, hi, note = RANGES[key]
    if key in REAL_FROM:
        text = "-1 or > 0" if REAL_FROM[key] < 1 else "-1 or >= 1"
    else:
        text = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
    return f"{text} ({note})" if note else text


def check_ranges(c: ConfigDict) -> None:
    """Every numeric flag inside its documented range."""
    for key, (lo, hi, note) in RANGES.items():
        value = c[key]
        bad = (value < lo or (hi is not None and value > hi) or (note == "even" and value % 2)
               or (key in REAL_FROM and value != -1 and value < REAL_FROM[key]))
        if bad:
            raise UserError(f"--{key.replace('_', '-')}={value} is out of range: use {range_text(key)}")


def validate(c: ConfigDict) -> None:
    """Contradictions and impossible values, each as one line that says what to do (the model and the plan check
    their arguments too, but only here are the errors worded for the command line)."""
    if c.resume_optimizer and not c.init_from:
        raise UserError("--resume-optimizer loads a nanochat checkpoint's optimizer state: give it with --init-from")
    check_ranges(c)  # every bound is RANGES'; what follows are the contradictions between flags
    if c.model_tag:  # '' = d<depth>; checkpoint.checkpoint_dir checks it again for every reader
        check_name(c.model_tag, "--model-tag")
    if c.depth % 2 and not c.allow_odd_depth:
        raise UserError(f"--depth={c.depth} is odd: its width gets nudged up to the next multiple of --head-dim, which "
                        f"nanochat does not recommend; use an even depth, or add --allow-odd-depth=true")
    r = recipes.get(c.recipe)
    if c.total_batch_size == -1 and not r.auto_batch:
        raise UserError(f"--total-batch-size=-1 (auto) is part of recipe 92d63d4, not {r.name}: give a batch in "
                        f"tokens (e.g. 524288) or add --recipe=92d63d4")
    if r.fixed_betas and (c.adam_beta1, c.adam_beta2) != (defaults().adam_beta1, defaults().adam_beta2):
        raise UserError(f"--adam-beta1/--adam-beta2 do not exist in recipe {r.name}: each AdamW group has its own "
                        f"betas (nanochat 92d63d4 GPT.setup_optimizer); drop them or use --recipe=348fbb3")
    if not c.window_pattern or set(c.window_pattern.upper()) - {"S", "L"}:
        raise UserError(f"--window-pattern={c.window_pattern!r} must use only the letters S and L, e.g. SSSL or L")
    if c.data not in ("fineweb-edu", "climbmix", "demo"):
        raise UserError(f"--data={c.data!r}: choose fineweb-edu, climbmix or demo")
    if c.remat not in (*REMAT_POLICIES, "auto"):
        raise UserError(f"--remat={c.remat!r}: choose auto, none, block (recompute each layer), dots (keep matmul "
                        f"and attention outputs) or dots_no_mlp")
    for key in ("compute_dtype", "muon_dtype", "embed_dtype"):
        if c[key] not in ("", "bfloat16", "float32"):
            raise UserError(f"--{key.replace('_', '-')}={c[key]!r}: choose bfloat16 or float32")
    if str(c.resume_from_step) != "last" and not (str(c.resume_from_step).isdigit() or str(c.resume_from_step) == "-1"):
        raise UserError(f"--resume-from-step={c.resume_from_step!r}: give a step number or 'last'")
    if c.warmup_ratio + c.warmdown_ratio > 1.0:
        raise UserError(f"--warmup-ratio + --warmdown-ratio = {c.warmup_ratio + c.warmdown_ratio} exceeds 1")
