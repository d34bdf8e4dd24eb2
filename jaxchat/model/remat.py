"""Rematerialisation policies per transformer layer (--remat): what the backward pass keeps instead of recomputing."""

import contextvars
import functools

import jax

from jaxchat.model import attention as attentionlib

# True while a layer is traced under a --remat policy (remat_layer); jaxchat.model.gpt.recomputed_when_narrow reads it
_UNDER_POLICY = contextvars.ContextVar("under_layer_remat_policy", default=False)

REMAT_POLICIES = {
    "none": None,  # no jax.checkpoint: every activation is kept
    "block": jax.checkpoint_policies.nothing_saveable,  # keep only each layer's input; recompute the layer
    # keep the dense layers' outputs (jaxchat.model.dense) and cuDNN attention's; recompute norms, rotary, relu^2 and
    # the attention's inputs from them (elementwise work)
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.save_only_these_names("dense", "mlp_up"), attentionlib.kernel_outputs),
    # as dots, but the MLP's up-projection (4 x width per token, the largest output) is computed again: one GEMM
    # of the layer's six more in the backward pass
    "dots_no_mlp": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.save_only_these_names("dense"), attentionlib.kernel_outputs),
}


REMAT_AUTO = ("none", "dots", "dots_no_mlp")  # --remat=auto tries these in order at each device batch: the first that fits


def remat_layer(fn, remat: str):
    """`fn` wrapped in jax.checkpoint with the named policy ('none' returns it unchanged)."""
    if remat not in REMAT_POLICIES:  # library guard: the command line refuses it first (config.validate)
        raise ValueError(f"remat {remat!r}: choose one of {', '.join(REMAT_POLICIES)}")
    if remat == "none":
        return fn

    @functools.wraps(fn)
    def traced_under_policy(*args, **kwargs):
        token = _UNDER_POLICY.set(True)
        try:
            return fn(*args, **kwargs)
        finally:
            _UNDER_POLICY.reset(token)
    return jax.checkpoint(traced_under_policy, policy=REMAT_POLICIES[remat])


def under_layer_policy() -> bool:
    """Whether the code being traced is a layer under a --remat policy (remat_layer)."""
    return _UNDER_POLICY.get()
