"""The model side of each recipe: the constants of one nanochat commit's GPT (RoPE base, windows, gates, smear,
backout, initialisation), as data. jaxchat.model.gpt reads them through `GPTConfig.recipe`; jaxchat.training.recipe
holds the training side under the same names.
"""

import dataclasses
from typing import Callable

DEFAULT = "348fbb3"  # the recipe a run or a checkpoint without one has (nanochat's January commit)



def _half_context(seq_len: int) -> int:
    """nanochat 348fbb3 GPT._compute_window_sizes: S = T // 2."""
    return seq_len // 2


def _quarter_context_in_tiles(seq_len: int) -> int:
    """nanochat 92d63d4 GPT._compute_window_sizes: S = ceil(T / 4) rounded up to a multiple of 128 (FA3's tile)."""
    return -(-seq_len // 4 // 128) * 128


def _no_backout(n_layer: int) -> None:
    return None


def _half_depth(n_layer: int) -> int:
    """nanochat 92d63d4 GPT.forward: backout reads the residual after layer L // 2 (0-based)."""
    return n_layer // 2


@dataclasses.dataclass(frozen=True)
class ModelRecipe:
    """The model constants of one nanochat commit; the defaults are 348fbb3's."""

    rope_base: float = 10000.0
    rope_dtype: str | None = "bfloat16"  # rotary tables rounded to this dtype; None: to the compute dtype
    short_window: Callable[[int], int] = _half_context  # left window of S layers from the sequence length
    ve_gate_channels: int = 32  # the value-embedding gate reads this many channels of the normalised block input
    ve_gate_scale: float = 2.0  # gate = scale * sigmoid(...)
    qk_scale: float = 1.0  # q and k multiplied by this after RoPE and QK-norm
    smear_channels: int = 0  # the smear gate reads this many embedding channels; 0: no smear (and no smear leaves)
    backout_layer: Callable[[int], int | None] = _no_backout  # layer whose output residual backout subtracts
    # Initialisation (nanochat GPT.init_weights): normal std of wte, c_fc's uniform bound relative to c_q's,
    # resid/x0 lambdas as (start, drop) for layer i: start - drop * i / max(L - 1, 1), and uniform upper bounds
    # U(0, b) of the gates (0: zeros) and the smear/backout lambdas' constants.
    wte_std: float = 1.0
    c_fc_scale: float = 1.0
    resid_init: tuple[float, float] = (1.0, 0.0)
    x0_init: tuple[float, float] = (0.1, 0.0)
    ve_gate_init: float = 0.0
    smear_gate_init: float = 0.0
    smear_lambda_init: float = 0.0
    backout_lambda_init: float = 0.0


MODEL_RECIPES = {
    "348fbb3": ModelRecipe(),
    "92d63d4": ModelRecipe(rope_base=100000.0, rope_dtype=None, short_window=_quarter_context_in_tiles,
                           ve_gate_channels=12, ve_gate_scale=3.0, qk_scale=1.2, smear_channels=24,
                           backout_layer=_half_depth, wte_std=0.8, c_fc_scale=0.4, resid_init=(1.15, 0.10),
                           x0_init=(0.20, 0.15), ve_gate_init=0.02, smear_gate_init=0.02, smear_lambda_init=0.0,
                           backout_lambda_init=0.2),
}
