"""The training plan in one place: model size from depth, horizon and batch / accumulation (scripts/base_train.py at 348fbb3), and the
recipe's transfer rules (batch LR scale, Muon weight decay; 92d63d4's auto batch).

    python -m jaxchat.plan --depth=26 --target-param-data-ratio=8.25 --device-batch-size=16 --num-devices=8
    python -m jaxchat.plan --recipe=92d63d4 --depth=24 --target-param-data-ratio=8 --device-batch-size=16
    python -m jaxchat.plan --readme      # the README's configuration tables, computed
"""

import dataclasses
import math

from jaxchat.model.gpt import GPTConfig, estimate_flops, num_scaling_params
from jaxchat.runtime.common import UserError, cli_parser, finite_float
from jaxchat.training import recipe as recipes
from jaxchat.training.config import DEFAULTS
from jaxchat.training.config import config_for_depth


def num_iterations(*, num_iterations: int, target_flops: float, target_param_data_ratio: float, flops_per_token: int,
                   scaling_params: int, total_batch_size: int) -> tuple[int, str]:
    """Steps to train and where the number came from: --num-iterations > --target-flops > --target-param-data-ratio."""
    if num_iterations > 0:
        return num_iterations, "--num-iterations"
    # A horizon under one step would train nothing and say nothing: refused, with the value that gives one step.
    if target_flops > 0:
        steps = round(target_flops / (flops_per_token * total_batch_size))
        if steps == 0:
            raise UserError(f"--target-flops={target_flops:g} trains 0 steps (one step is "
                            f"{flops_per_token * total_batch_size:.4g} FLOPs at this size and batch): raise it to at "
                            f"least that, or set --num-iterations")
        return steps, "--target-flops"
    if target_param_data_ratio > 0:
        steps = int(target_param_data_ratio * scaling_params) // total_batch_size
        if steps == 0:
            raise UserError(f"--target-param-data-ratio={target_param_data_ratio:g} trains 0 steps (one step of "
                            f"{total_batch_size:,} tokens needs a ratio of at least "
                            f"{round_up(total_batch_size / scaling_params):.4g} for {scaling_params:,} scaling "
                            f"params): raise it, or set --num-iterations")
        return steps, "--target-param-data-ratio"
    raise UserError("no training horizon: set one of --num-iterations, --target-flops or --target-param-data-ratio "
                    "to a positive value (e.g. --target-param-data-ratio=10.5)")


def round_up(x: float, digits: int = 4) -> float:
    """x rounded up to `digits` significant digits: a threshold printed so that the printed value passes it."""
    scale = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
    return math.ceil(x / scale) * scale


def valid_device_batch_sizes(total_batch_size: int, seq_len: int, data_parallel_size: int) -> list[int]:
    """Device batch sizes (rows per device per micro-batch) that divide the total batch exactly."""
    rows_per_device, rem = divmod(total_batch_size, seq_len * data_parallel_size)
    if rem:
        return []
    return [b for b in range(1, rows_per_device + 1) if rows_per_device % b == 0]


def grad_accum_steps(total_batch_size: int, device_batch_size: int, seq_len: int, data_parallel_size: int) -> int:
    """Micro-batches per step so that every step sees exactly total_batch_size tokens."""
    if device_batch_size <= 0:
        raise UserError(f"--device-batch-size={device_batch_size} must be positive (e.g. 32, 16 or 8)")
    tokens_per_micro_batch = device_batch_size * seq_len * data_parallel_size
    if total_batch_size <= 0 or total_batch_size % tokens_per_micro_batch:
        valid = valid_device_batch_sizes(total_batch_size, seq_len, data_parallel_size)
        fix = (f"use --device-batch-size in {valid}" if valid else
               f"make --total-batch-size a multiple of seq_len x devices = {seq_len * data_parallel_size}")
        raise UserError(f"--total-batch-size={total_batch_size} is not divisible by device batch {device_batch_size} x "
                        f"seq_len {seq_len} x {data_parallel_size} data-parallel devices = {tokens_per_micro_batch}; {fix}")
    return total_batch_size // tokens_per_micro_batch


def device_batch_warning(device_batch_size: int) -> str | None:
    """A warning for a device batch that is not a power of two: nanochat's runs use 32, 16 or 8
    (nanochat/scripts/base_train.py at 348fbb3: device batch 32, total batch 2^19 tokens, which at a power-of-two
    sequence length and device count only a power of two divides)."""
    if device_batch_size & (device_batch_size - 1):
        return (f"warning: uneven gradient accumulation steps: --device-batch-size={device_batch_size} is not a "
                f"power of 2; use 32, 16 or 8 for stability")
    return None


@dataclasses.dataclass(frozen=True)
class Transfer:
    """A recipe's batch and hyperparameter transfer for one depth and horizon (scripts/base_train.py)."""

    total_batch_size: int
    auto_batch: bool  # the batch was chosen from the horizon, not given
    batch_lr_scale: float  # √(B/2^19), for every LR but the smear group's
    weight_decay: float  # the --weight-decay it started from
    weight_decay_scaled: float  # the Muon weight decay the schedule starts at


def transfer(r: recipes.Recipe, *, depth: int, total_batch_size: int, weight_decay: float, tokens: int,
             ref_tokens: float) -> Transfer:
    """Batch (-1: auto, where the recipe has it), batch LR scale and scaled weight decay; tokens = the horizon D =
    int(ratio · scaling params), ref_tokens = D_ref = ratio · d12's scaling params (same shape flags)."""
    auto = total_batch_size == -1
    if auto and not r.auto_batch:
        raise UserError(f"--total-batch-size=-1 (auto) is not part of recipe {r.name}: give a batch in tokens "
                        f"(e.g. 524288) or use --recipe=92d63d4")
    if r.auto_batch and tokens == 0:  # 92d63d4 sizes batch and weight decay by D/D_ref, which needs a ratio
        raise UserError(f"recipe {r.name} scales the batch and weight decay with the horizon "
                        f"--target-param-data-ratio: it must not be 0 (e.g. 8 or 12)")
    batch = recipes.auto_total_batch_size(tokens, ref_tokens) if auto else total_batch_size
    wd = r.weight_decay_rule(weight_decay, depth=depth, total_batch_size=batch, tokens=tokens, ref_tokens=ref_tokens)
    return Transfer(batch, auto, recipes.batch_lr_scale(batch), weight_decay, wd)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything the run's size implies, computed once at start-up."""

    model: GPTConfig
    params: dict[str, int]
    flops_per_token: int
    num_iterations: int
    horizon_source: str
    total_batch_size: int
    device_batch_size: int
    data_parallel_size: int
    grad_accum_steps: int
    transfer: Transfer | None = None

    @property
    def total_tokens(self) -> int:
        return self.total_batch_size * self.num_iterations

    @property
    def tokens_per_param(self) -> float:
        return self.total_tokens / self.params["scaling"]

    @property
    def total_flops(self) -> float:
        return float(self.flops_per_token) * self.total_tokens

    def summary(self) -> list[str]:
        """The reference's start-up facts (scripts/base_train.py's print0 lines): sizes, parameter table, FLOPs, horizon, batch."""
        m = self.model
        lines = [f"Vocab size: {m.vocab_size:,}",
                 f"num_layers: {m.n_layer}, model_dim: {m.n_embd}, num_heads: {m.n_head}, head_dim: {m.head_dim}, "
                 f"num_kv_heads: {m.n_kv_head}, window_pattern: {m.window_pattern}",
                 f"Tokens / micro-batch / device: {self.device_batch_size * m.sequence_len:,}",
                 f"Tokens / micro-batch: {self.device_batch_size * m.sequence_len * self.data_parallel_size:,}",
                 f"Total batch size {self.total_batch_size:,} => gradient accumulation steps: {self.grad_accum_steps}",
                 "Parameter counts:"]
        if self.transfer and self.transfer.auto_batch:
            lines.insert(4, f"Auto-computed optimal batch size: {self.total_batch_size:,} tokens")
        lines += [f"  {name:<22}: {count:,}" for name, count in self.params.items()]
        lines += [f"Estimated FLOPs per token: {self.flops_per_token:e}",
                  f"Number of iterations ({self.horizon_source}): {self.num_iterations:,}",
                  f"Total number of training tokens: {self.total_tokens:,}",
                  f"Tokens : Scaling params ratio: {self.tokens_per_param:.2f}",
                  f"Total training FLOPs estimate: {self.total_flops:e}"]
        if self.transfer:
            t = self.transfer
            lines += [f"Recipe {m.recipe}: batch LR scale {t.batch_lr_scale:.6f} (sqrt of batch / 2^19); Muon weight "
                      f"decay {t.weight_decay} scaled to {t.weight_decay_scaled:.6f}; AdamW LR scale (n/768)^-0.5 = "
                      f"{(m.n_embd / 768) ** -0.5:.6f}"]
        return lines


def make_plan(*, depth: int, aspect_ratio: int = DEFAULTS["aspect_ratio"], head_dim: int = DEFAULTS["head_dim"],
              max_seq_len: int = DEFAULTS["max_seq_len"], vocab_size: int = GPTConfig.vocab_size,
              window_pattern: str = DEFAULTS["window_pattern"], num_iterations_flag: int = DEFAULTS["num_iterations"],
              target_flops: float = DEFAULTS["target_flops"],
              target_param_data_ratio: float = DEFAULTS["target_param_data_ratio"],
              total_batch_size: int = DEFAULTS["total_batch_size"],
              device_batch_size: int = DEFAULTS["device_batch_size"],
              data_parallel_size: int = 1, recipe: str = DEFAULTS["recipe"],
              weight_decay: float = DEFAULTS["weight_decay"]) -> Plan:
    """The plan for a depth and horizon; raises UserError for a horizon or batch that cannot work.

    The defaults are the flags' (jaxchat.training.config: nanochat 348fbb3's); total_batch_size -1: auto (92d63d4);
    weight_decay: --weight-decay, before the recipe's transfer rule."""
    r = recipes.get(recipe)
    shape = dict(aspect_ratio=aspect_ratio, head_dim=head_dim, max_seq_len=max_seq_len, vocab_size=vocab_size,
                 window_pattern=window_pattern, recipe=r.name)
    model = config_for_depth(depth, **shape)
    params = num_scaling_params(model)
    flops = estimate_flops(model)
    # d12 is where the hyperparameters were tuned: its horizon at the same ratio is the reference D_ref.
    ref_scaling = num_scaling_params(config_for_depth(12, **shape))["scaling"]
    t = transfer(r, depth=depth, total_batch_size=total_batch_size, weight_decay=weight_decay,
                 tokens=int(target_param_data_ratio * params["scaling"]),
                 ref_tokens=target_param_data_ratio * ref_scaling)
    steps, source = num_iterations(num_iterations=num_iterations_flag, target_flops=target_flops,
                                   target_param_data_ratio=target_param_data_ratio, flops_per_token=flops,
                                   scaling_params=params["scaling"], total_batch_size=t.total_batch_size)
    accum = grad_accum_steps(t.total_batch_size, device_batch_size, max_seq_len, data_parallel_size)
    return Plan(model, params, flops, steps, source, t.total_batch_size, device_batch_size, data_parallel_size, accum,
                t)


# ----------------------------------------------------------------------------------------------------------------
# README tables (a test checks the README holds exactly these)

README_DEPTHS = (12, 18, 20, 24, 26)
README_RATIOS = (8.25, 10.5, 12)


def readme_tables() -> dict[str, str]:
    """The depth, horizon and device-batch tables of the README, computed from the code."""
    depth_rows = ["| depth | width | heads | scaling params | total params | FLOPs / token |",
                  "|---|---|---|---|---|---|"]
    horizon_rows = ["| depth | " + " | ".join(f"steps @ ratio {r}" for r in README_RATIOS) + " |",
                    "|---|" + "---|" * len(README_RATIOS)]
    for depth in README_DEPTHS:
        plan = make_plan(depth=depth)
        c, p = plan.model, plan.params
        depth_rows.append(f"| {depth} | {c.n_embd} | {c.n_head} | {p['scaling'] / 1e6:,.1f}M | {p['total'] / 1e6:,.1f}M "
                          f"| {plan.flops_per_token / 1e9:.2f}G |")
        steps = [make_plan(depth=depth, target_param_data_ratio=r).num_iterations for r in README_RATIOS]
        horizon_rows.append(f"| {depth} | " + " | ".join(f"{s:,}" for s in steps) + " |")
    batch_rows = ["| --device-batch-size | accumulation steps, 8 GPUs | accumulation steps, 1 GPU | total batch |",
                  "|---|---|---|---|"]
    for b in (32, 16, 8, 4):
        batch_rows.append(f"| {b} | {grad_accum_steps(524288, b, 2048, 8)} | {grad_accum_steps(524288, b, 2048, 1)} "
                          f"| 524,288 |")
    return {"depth": "\n".join(depth_rows), "horizon": "\n".join(horizon_rows), "batch": "\n".join(batch_rows),
            "recipe": recipe_table("92d63d4")}


RECIPE_RATIOS = (8, 10.5, 12)


def recipe_table(name: str) -> str:
    """A recipe's depth table at its defaults: auto batch, steps at three ratios, FLOPs per token."""
    r = recipes.get(name)
    defaults = {k: r.defaults[k] for k in ("total_batch_size", "weight_decay") if k in r.defaults}
    rows = ["| depth | total batch | " + " | ".join(f"steps @ ratio {x}" for x in RECIPE_RATIOS) + " | FLOPs / token |",
            "|---|---|" + "---|" * len(RECIPE_RATIOS) + "---|"]
    for depth in README_DEPTHS + (32,):
        plans = [make_plan(depth=depth, target_param_data_ratio=x, recipe=name, device_batch_size=1, **defaults)
                 for x in RECIPE_RATIOS]
        rows.append(f"| {depth} | {plans[0].total_batch_size:,} | " + " | ".join(f"{p.num_iterations:,}" for p in plans)
                    + f" | {plans[0].flops_per_token / 1e9:.3f}G |")
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = cli_parser(__doc__)
    parser.add_argument("--readme", action="store_true", help="print the README's configuration tables")
    parser.add_argument("--recipe", default=DEFAULTS["recipe"], help=f"one of {', '.join(recipes.RECIPES)}")
    parser.add_argument("--depth", type=int, default=DEFAULTS["depth"])
    parser.add_argument("--target-param-data-ratio", type=finite_float, help="(default: the recipe's)")
    parser.add_argument("--num-iterations", type=int, default=DEFAULTS["num_iterations"])
    parser.add_argument("--target-flops", type=finite_float, default=DEFAULTS["target_flops"])
    parser.add_argument("--total-batch-size", type=int, help="(default: the recipe's; -1 = auto in 92d63d4)")
    parser.add_argument("--weight-decay", type=finite_float, help="(default: the recipe's)")
    parser.add_argument("--device-batch-size", type=int, default=DEFAULTS["device_batch_size"])
    parser.add_argument("--num-devices", type=int, default=8, help="data-parallel devices")
    args = parser.parse_args(argv)
    if args.depth <= 0:  # this command's own check (jaxchat.train's is config.validate)
        raise UserError(f"--depth={args.depth} must be a positive integer (e.g. --depth=12)")
    if args.readme:
        for name, table in readme_tables().items():
            print(f"<!-- table:{name} -->\n{table}\n")
        return
    r = recipes.get(args.recipe)
    # the recipe's defaults, else the flags' (348fbb3's), as jaxchat.train's precedence has it
    recipe_default = {k: getattr(args, k) if getattr(args, k) is not None else r.defaults.get(k, DEFAULTS[k])
                      for k in ("target_param_data_ratio", "total_batch_size", "weight_decay")}
    plan = make_plan(depth=args.depth, num_iterations_flag=args.num_iterations, target_flops=args.target_flops,
                     device_batch_size=args.device_batch_size, data_parallel_size=args.num_devices, recipe=r.name,
                     **recipe_default)
    print("\n".join(plan.summary()))
