"""Training flags: nanochat's base_train flags (reference defaults, spec §11.1), ml_collections config files, overrides.

    python -m jaxchat.train --depth=26 --target-param-data-ratio=8.25 --device-batch-size=16 --run=my-run
    python -m jaxchat.train --config=configs/d26.py --config.device_batch_size=16

Precedence: reference defaults < config file < `--config.key=value` < nanochat-style `--key=value` flags.
"""

import argparse
import importlib.util
import os

from ml_collections import ConfigDict

from jaxchat.common import UserError


def defaults() -> ConfigDict:
    """Every flag with nanochat 348fbb3's default, plus jaxchat's own (mesh, data source, dtype, logging)."""
    c = ConfigDict()
    # logging / identity
    c.run = "dummy"  # WandB run name; 'dummy' disables WandB
    c.model_tag = ""  # checkpoint directory name; '' means d{depth}
    c.device_type = ""  # '' autodetects (gpu > cpu)
    # model
    c.depth = 20
    c.allow_odd_depth = False  # odd depths get a width nudge (+64), which nanochat does not recommend
    c.aspect_ratio = 64
    c.head_dim = 128
    c.max_seq_len = 2048
    c.window_pattern = "SSSL"
    # horizon
    c.num_iterations = -1
    c.target_flops = -1.0
    c.target_param_data_ratio = 10.5
    # batch
    c.device_batch_size = 32  # rows per device per micro-batch; 'auto' (stored as 0) = largest power of 2 <= 32 that fits
    c.total_batch_size = 524288
    # optimizer
    c.embedding_lr = 0.3
    c.unembedding_lr = 0.004
    c.weight_decay = 0.2
    c.matrix_lr = 0.02
    c.scalar_lr = 0.5
    c.adam_beta1 = 0.8
    c.adam_beta2 = 0.95
    c.warmup_ratio = 0.0
    c.warmdown_ratio = 0.5
    c.final_lr_frac = 0.0
    # loop
    c.resume_from_step = "-1"  # a step number, or 'last'; checkpoints newer than it are moved aside (rolled_back/)
    c.allow_batch_size_change = False  # resume a checkpoint saved with another --total-batch-size, knowingly
    c.eval_every = 250
    c.eval_tokens = 20 * 524288
    c.core_metric_every = 2000
    c.core_metric_max_per_task = 500
    c.sample_every = 2000
    c.save_every = -1
    c.save_every_minutes = -1.0  # also save on a timer (these rotate; --save-every and final saves are kept)
    c.keep_last = 2  # timer and preemption checkpoints kept (older ones are deleted once superseded)
    # jaxchat
    c.data = "fineweb-edu"  # fineweb-edu | climbmix | demo
    c.fsdp = 1  # size of the FSDP mesh axis; 1 = pure data parallel
    c.compute_dtype = ""  # '' = bfloat16 on GPU, float32 on CPU
    c.muon_dtype = ""  # Polar Express dtype; '' = bfloat16 on GPU (the reference), float32 on CPU (no fast bf16 there)
    c.remat = "none"  # rematerialise each layer in the backward pass: none | block | dots (keep matmul outputs)
    c.loss_chunk = 0  # > 0: cross-entropy over this many positions at a time (the full fp32 logits never exist)
    c.embed_dtype = "float32"  # storage dtype of wte and value_embeds; bfloat16 like the reference on CUDA
    c.memory_budget_gb = 0.0  # > 0: plan memory against this many GiB per device instead of the device's capacity
    c.seed = 42
    c.log_every = 1  # print a step line every N steps
    c.tensorboard = True
    c.coordinator_address = ""  # multi-process: host:port of process 0 ('' = single process, or SLURM / JAX env vars)
    c.num_processes = 0
    c.process_id = -1
    c.data_shards = 0  # data loader shards (ranks of spec §6.3) over all processes; 0 = one per process
    c.init_timeout = 300  # seconds to wait for every process to join the coordinator
    c.peer_timeout = 20  # seconds without a sign of life from another process before this one exits
    return c


def _parse_flag(key: str, value, like, origin: str = ""):
    """A flag's value as the type of its default; --device-batch-size also takes 'auto' (stored as 0).

    origin: where a non-string value came from (a config file), named in the error."""
    if key == "device_batch_size" and str(value).strip().lower() == "auto":
        return 0
    if isinstance(value, str):
        try:
            return _parse_value(value, like)
        except UserError as e:
            raise UserError(f"{origin or '--' + key.replace('_', '-')}: {e}") from None
    # A config file's Python value: ints for int keys (5e5 and 4.0 are fine, 4.5 is not), numbers for floats.
    ok = (isinstance(value, bool) if isinstance(like, bool) else
          isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()
          if isinstance(like, int) else
          isinstance(value, (int, float)) and not isinstance(value, bool) if isinstance(like, float) else
          isinstance(value, type(like)))
    if not ok:
        raise UserError(f"{origin}: {key}={value!r} must be {type(like).__name__} (like the default {like!r})")
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
        if isinstance(like, int):
            value = float(text)  # accepts 524288 and 5e5 alike
            if value != int(value):
                raise ValueError(text)
            return int(value)
        if isinstance(like, float):
            return float(text)
    except ValueError:
        raise UserError(f"bad value {text!r}: expected {type(like).__name__}") from None
    return text


def load_config_file(path: str) -> ConfigDict:
    """Run a configs/NAME.py file's get_config() (an optional ':arg' suffix is passed to it)."""
    path, _, arg = path.partition(":")
    if not os.path.isfile(path):
        here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path)
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
    except Exception as e:
        line = getattr(e, "lineno", None) or _user_line(e, path)
        first = (str(e).strip().splitlines() or [""])[0]
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


def parse_flags(argv: list[str]) -> ConfigDict:
    """The run's configuration from the command line (argv without the program name)."""
    config = defaults()
    config_file = None
    dotted, flags = [], []
    for arg in argv:
        if arg.startswith("--config="):
            config_file = arg.split("=", 1)[1]
        elif arg.startswith("--config."):
            dotted.append(arg[len("--config."):])
        else:
            flags.append(arg)
    if config_file:
        for key, value in load_config_file(config_file).items():
            if key not in config:
                raise UserError(f"--config={config_file} sets unknown key {key!r}; known keys: {sorted(config)}")
            config[key] = _parse_flag(key, value, config[key], origin=f"--config={config_file}")
    for item in dotted:
        key, eq, text = item.partition("=")
        if key not in config or not eq:
            raise UserError(f"--config.{item}: unknown key or missing '=value'; known keys: {sorted(config)}")
        config[key] = _parse_flag(key, text, config[key], origin=f"--config.{key}")
    parser = argparse.ArgumentParser(prog="python -m jaxchat.train", allow_abbrev=False, add_help=True,
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, value in config.items():
        parser.add_argument("--" + key.replace("_", "-"), dest=key, type=str, default=None,
                            help=f"default: {value!r}" + (f"; {range_text(key)}" if key in RANGES else ""))
    parser.error = lambda message: (_ for _ in ()).throw(UserError(message + " (see python -m jaxchat.train --help)"))
    args = parser.parse_args(flags)
    for key, text in vars(args).items():
        if text is not None:
            config[key] = _parse_flag(key, text, config[key])
    validate(config)
    return config


# Valid range of every numeric flag: (lowest, highest, what -1 or 0 means when allowed). "off" flags take -1 (or
# any value <= 0 where nanochat's scripts compare `> 0`); a value outside the range is one line at start-up.
OFF = "-1 = off"
RANGES = {
    "depth": (1, None, ""), "aspect_ratio": (1, None, ""), "head_dim": (2, None, "even"),
    "max_seq_len": (2, None, "even"), "num_iterations": (-1, None, "-1 = from --target-*"),
    "target_flops": (-1, None, "-1 = off"), "target_param_data_ratio": (-1, None, "-1 = off"),
    "device_batch_size": (0, None, "0 or 'auto' = largest that fits"), "total_batch_size": (1, None, ""),
    "embedding_lr": (0, None, ""), "unembedding_lr": (0, None, ""), "matrix_lr": (0, None, ""),
    "scalar_lr": (0, None, ""), "weight_decay": (0, None, ""), "adam_beta1": (0, 1, ""), "adam_beta2": (0, 1, ""),
    "warmup_ratio": (0, 1, ""), "warmdown_ratio": (0, 1, ""), "final_lr_frac": (0, 1, ""),
    "eval_every": (-1, None, OFF), "eval_tokens": (1, None, ""), "core_metric_every": (-1, None, OFF),
    "core_metric_max_per_task": (-1, None, "-1 = all"), "sample_every": (-1, None, OFF),
    "save_every": (-1, None, OFF), "save_every_minutes": (-1, None, OFF), "keep_last": (1, None, ""),
    "fsdp": (1, None, ""), "loss_chunk": (0, None, "0 = off"), "memory_budget_gb": (0, None, "0 = device capacity"),
    "seed": (0, None, ""), "log_every": (1, None, ""), "num_processes": (0, None, "0 = auto"),
    "process_id": (-1, None, "-1 = auto"), "data_shards": (0, None, "0 = one per process"),
    "init_timeout": (1, None, ""), "peer_timeout": (1, None, ""),
}
# Where -1 means off (or auto), values between -1 and the first real value make no sense (0, -0.5, -3).
REAL_FROM = {"num_iterations": 1, "target_flops": 1e-300, "target_param_data_ratio": 1e-300, "eval_every": 1,
             "core_metric_every": 1, "core_metric_max_per_task": 1, "sample_every": 1, "save_every": 1,
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
    for key, (lo, hi, _) in RANGES.items():
        value = c[key]
        bad = value < lo or (hi is not None and value > hi) or (key in REAL_FROM and value != -1 and
                                                                 value < REAL_FROM[key])
        if bad:
            raise UserError(f"--{key.replace('_', '-')}={value} is out of range: use {range_text(key)}")


def validate(c: ConfigDict) -> None:
    """Contradictions and impossible values, each as one line that says what to do."""
    if c.depth <= 0:
        raise UserError(f"--depth={c.depth} must be a positive integer (e.g. --depth=12)")
    if c.depth % 2 and not c.allow_odd_depth:
        raise UserError(f"--depth={c.depth} is odd: its width gets nudged up to the next multiple of --head-dim, which "
                        f"nanochat does not recommend; use an even depth, or add --allow-odd-depth=true")
    for key in ("device_batch_size", "total_batch_size", "max_seq_len", "aspect_ratio", "head_dim", "eval_tokens"):
        if c[key] < 0 or (c[key] == 0 and key != "device_batch_size"):  # device batch 0 = auto
            raise UserError(f"--{key.replace('_', '-')}={c[key]} must be positive")
    if c.data not in ("fineweb-edu", "climbmix", "demo"):
        raise UserError(f"--data={c.data!r}: choose fineweb-edu, climbmix or demo")
    if c.remat not in ("none", "block", "dots"):
        raise UserError(f"--remat={c.remat!r}: choose none, block (recompute each layer) or dots (keep matmul outputs)")
    if c.embed_dtype not in ("bfloat16", "float32"):
        raise UserError(f"--embed-dtype={c.embed_dtype!r}: choose bfloat16 or float32")
    for key in ("compute_dtype", "muon_dtype"):
        if c[key] not in ("", "bfloat16", "float32"):
            raise UserError(f"--{key.replace('_', '-')}={c[key]!r}: choose bfloat16 or float32")
    if str(c.resume_from_step) != "last" and not (str(c.resume_from_step).isdigit() or str(c.resume_from_step) == "-1"):
        raise UserError(f"--resume-from-step={c.resume_from_step!r}: give a step number or 'last'")
    for key in ("warmup_ratio", "warmdown_ratio", "final_lr_frac"):
        if not 0.0 <= c[key] <= 1.0:
            raise UserError(f"--{key.replace('_', '-')}={c[key]} must be between 0 and 1")
    if c.warmup_ratio + c.warmdown_ratio > 1.0:
        raise UserError(f"--warmup-ratio + --warmdown-ratio = {c.warmup_ratio + c.warmdown_ratio} exceeds 1")
    if c.max_seq_len % 2 or c.head_dim % 2:
        raise UserError("--max-seq-len and --head-dim must be even")
    check_ranges(c)
