"""Training recipes, chosen once by name: nanochat 348fbb3 (the default, the January recipe) and 92d63d4 (the record
recipe of nanochat's HEAD: leaderboard run 6's code as maintained since).

    r = recipe.get(c.recipe)
    r.defaults                          # flag defaults that differ from 348fbb3's (explicit flags still win)
    optim.make_optimizer(..., **r.optimizer_options())
    r.weight_decay_rule(...), r.auto_batch    # batch / weight-decay transfer (jaxchat.plan applies them)

A recipe is data: everything that differs between the two is a field here, so no code asks which recipe it runs.
The model side is `GPTConfig.recipe` (jaxchat.model), set from the same name.
"""

import dataclasses
import types
from typing import Any, Callable

from jaxchat import optim
from jaxchat.common import UserError

DEFAULT = "348fbb3"


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


# nanochat/gpt.py GPT.setup_optimizer at 92d63d4: per-group betas and decoupled weight decay, value embeddings at
# half the embedding LR, and the smear/backout scalars (and the 1×24 smear gate) at a fixed 0.2, unscaled.
ADAMW_GROUPS_92D63D4 = (
    optim.AdamWGroup("lm_head", ("lm_head",), "unembedding_lr", betas=(0.8, 0.96), weight_decay=0.01),
    optim.AdamWGroup("wte", ("wte",), "embedding_lr", betas=(0.8, 0.995), weight_decay=0.001),
    optim.AdamWGroup("value_embeds", ("value_embeds",), "embedding_lr", 0.5, betas=(0.8, 0.995), weight_decay=0.01),
    optim.AdamWGroup("resid_lambdas", ("resid_lambdas",), "scalar_lr", 0.01, dmodel_scaled=False, betas=(0.8, 0.95),
                     weight_decay=0.05),
    optim.AdamWGroup("x0_lambdas", ("x0_lambdas",), "scalar_lr", dmodel_scaled=False, betas=(0.96, 0.95)),
    optim.AdamWGroup("smear", ("smear_gate", "smear_lambda", "backout_lambda"), None, 0.2, dmodel_scaled=False,
                     batch_scaled=False, betas=(0.8, 0.95)),
)

RECIPES = {
    "348fbb3": Recipe(
        name="348fbb3", title="nanochat 348fbb3 (January 2026: 3.04 h to GPT-2 on 8xH100)",
        defaults=types.MappingProxyType({}), adamw_groups=optim.ADAMW_GROUPS_348FBB3, muon=optim.MuonVariant(),
        schedules=optim.Schedules(), auto_batch=False, weight_decay_rule=optim.depth_scaled_weight_decay_rule,
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
        auto_batch=True, weight_decay_rule=optim.t_epoch_weight_decay_rule, raw_token_bytes=True, fixed_betas=True),
}


def get(name: str) -> Recipe:
    """The recipe called `name`; UserError naming the choices otherwise."""
    if name not in RECIPES:
        raise UserError(f"--recipe={name!r}: choose one of {', '.join(RECIPES)} (nanochat commits)")
    return RECIPES[name]
