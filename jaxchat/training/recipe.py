"""Training recipes, chosen once by name: nanochat 348fbb3 (the default, the January recipe) and 92d63d4 (the record
recipe of nanochat's HEAD: leaderboard run 6's code as maintained since).

    r = recipe.get(c.recipe)
    r.defaults                          # flag defaults that differ from 348fbb3's (explicit flags still win)
    optim.make_optimizer(..., **r.optimizer_options())
    r.weight_decay_rule(...), r.auto_batch    # batch / weight-decay transfer (jaxchat.training.plan applies them)

A recipe is data: everything that differs between the two is a field here, so no code asks which recipe it runs.
The model side (`ModelRecipe`: RoPE base, windows, gates, smear, backout, initialisation) is in
jaxchat.model.architecture under the same names; jaxchat.model.gpt reads it through `GPTConfig.recipe`.
"""

import dataclasses
import math
import types
from typing import Any, Callable

from jaxchat.model.architecture import DEFAULT, MODEL_RECIPES
from jaxchat.runtime.common import UserError
from jaxchat.training import optim

REFERENCE_BATCH_SIZE = 2**19  # the batch (tokens) nanochat tuned its learning rates at


# ---------------------------------------------------------------------------------------------------------------
# The training side

@dataclasses.dataclass(frozen=True)
class Recipe:
    """One nanochat commit's training recipe."""

    name: str
    title: str
    defaults: types.MappingProxyType  # config key -> default, where it differs from 348fbb3's
    adamw_groups: tuple[optim.AdamWGroup, ...]
    muon: optim.MuonVariant
    schedules: optim.Schedules
    auto_batch: bool  # --total-batch-size=-1 picks the batch from the horizon (B ∝ D^0.383)
    weight_decay_rule: Callable[..., float]  # (weight_decay, depth=, total_batch_size=, tokens=, ref_tokens=)
    raw_token_bytes: bool  # bits per byte from each token's raw bytes (else its decoded string's UTF-8 length)
    fixed_betas: bool  # every AdamW group has its own betas: --adam-beta1/--adam-beta2 do not exist

    def optimizer_options(self) -> dict[str, Any]:
        """optim.make_optimizer's recipe arguments."""
        return dict(adamw_groups=self.adamw_groups, muon_variant=self.muon, schedules=self.schedules)


# ---------------------------------------------------------------------------------------------------------------
# Batch and weight-decay transfer rules (scripts/base_train.py; jaxchat.training.plan applies them)

def depth_scaled_weight_decay(weight_decay: float, depth: int) -> float:
    """Depth-scaled Muon weight decay (tuned at d12, WD ∝ 1/width²)."""
    return weight_decay * (12 / depth) ** 2


def depth_scaled_weight_decay_rule(weight_decay: float, *, depth: int, **_) -> float:
    """348fbb3's transfer of the Muon weight decay: (12/depth)² (the batch and horizon play no part)."""
    return depth_scaled_weight_decay(weight_decay, depth)


def t_epoch_weight_decay_rule(weight_decay: float, *, total_batch_size: int, tokens: int, ref_tokens: float,
                              **_) -> float:
    """92d63d4's T_epoch rule (scripts/base_train.py): keep B/(η·λ·D) constant with η ∝ √(B/2^19), i.e.
    λ = λ_ref · √(B/2^19) · (D_ref/D), D the horizon in tokens, D_ref d12's at the same ratio."""
    return weight_decay * math.sqrt(total_batch_size / REFERENCE_BATCH_SIZE) * (ref_tokens / tokens)


def auto_total_batch_size(tokens: int, ref_tokens: float) -> int:
    """92d63d4's batch for a horizon of `tokens`: 2^19 · (D/D_ref)^0.383 (Power Lines), nearest power of 2."""
    return 2 ** round(math.log2(REFERENCE_BATCH_SIZE * (tokens / ref_tokens) ** 0.383))


def batch_lr_scale(total_batch_size: int) -> float:
    """sqrt(total_batch_size / 2^19), applied to every learning rate; exactly 1.0 at the reference batch."""
    if total_batch_size == REFERENCE_BATCH_SIZE:
        return 1.0
    return (total_batch_size / REFERENCE_BATCH_SIZE) ** 0.5



# nanochat/gpt.py GPT.setup_optimizer at 348fbb3: no AdamW weight decay, the flags' betas except x0's.
ADAMW_GROUPS_348FBB3 = (
    optim.AdamWGroup("lm_head", "unembedding_lr"),
    optim.AdamWGroup("wte", "embedding_lr"),
    optim.AdamWGroup("value_embeds", "embedding_lr"),
    optim.AdamWGroup("resid_lambdas", "scalar_lr", 0.01, dmodel_scaled=False),
    optim.AdamWGroup("x0_lambdas", "scalar_lr", dmodel_scaled=False, betas=(0.96, 0.95)),
)


# nanochat/gpt.py GPT.setup_optimizer at 92d63d4: per-group betas and decoupled weight decay, value embeddings at
# half the embedding LR, and the smear/backout scalars (and the 1×24 smear gate) at a fixed 0.2, unscaled. The group
# is "smear" although it holds backout_lambda too: nanochat's name for it (`smear_params`), and the key of its state
# in every jaxchat checkpoint's optimizer state (renaming it would stop those resuming).
ADAMW_GROUPS_92D63D4 = (
    optim.AdamWGroup("lm_head", "unembedding_lr", betas=(0.8, 0.96), weight_decay=0.01),
    optim.AdamWGroup("wte", "embedding_lr", betas=(0.8, 0.995), weight_decay=0.001),
    optim.AdamWGroup("value_embeds", "embedding_lr", 0.5, betas=(0.8, 0.995), weight_decay=0.01),
    optim.AdamWGroup("resid_lambdas", "scalar_lr", 0.01, dmodel_scaled=False, betas=(0.8, 0.95), weight_decay=0.05),
    optim.AdamWGroup("x0_lambdas", "scalar_lr", dmodel_scaled=False, betas=(0.96, 0.95)),
    optim.AdamWGroup("smear", None, 0.2, dmodel_scaled=False, batch_scaled=False, betas=(0.8, 0.95)),
)

RECIPES = {
    "348fbb3": Recipe(
        name="348fbb3", title="nanochat 348fbb3 (January 2026: 3.04 h to GPT-2 on 8xH100)",
        defaults=types.MappingProxyType({}), adamw_groups=ADAMW_GROUPS_348FBB3, muon=optim.MuonVariant(),
        schedules=optim.Schedules(), auto_batch=False, weight_decay_rule=depth_scaled_weight_decay_rule,
        raw_token_bytes=False, fixed_betas=False),
    "92d63d4": Recipe(
        name="92d63d4", title="nanochat 92d63d4 (the record recipe: leaderboard run 6's code at HEAD)",
        # scripts/base_train.py argparse defaults at 92d63d4 (data: runs/speedrun.sh downloads ClimbMix)
        defaults=types.MappingProxyType(dict(
            unembedding_lr=0.008, weight_decay=0.28, target_param_data_ratio=12.0, total_batch_size=-1,
            eval_tokens=80 * 524288, warmup_steps=40, warmdown_ratio=0.65, final_lr_frac=0.05, data="climbmix")),
        adamw_groups=ADAMW_GROUPS_92D63D4,
        muon=optim.MuonVariant(beta2=0.9, pe_norm=1.01, muon_eq=True, float32_after_pe=True, muon_plus=True),
        schedules=optim.Schedules(momentum=optim.MomentumSchedule(0.85, 0.97, 400, 0.90),
                                  weight_decay=optim.muon_weight_decay_cosine),
        auto_batch=True, weight_decay_rule=t_epoch_weight_decay_rule, raw_token_bytes=True, fixed_betas=True),
}


assert RECIPES.keys() == MODEL_RECIPES.keys()  # each commit's training side beside its model side


def get(name: str) -> Recipe:
    """The recipe called `name`; UserError naming the choices otherwise."""
    if name not in RECIPES:
        raise UserError(f"--recipe={name!r}: choose one of {', '.join(RECIPES)} (nanochat commits)")
    return RECIPES[name]
