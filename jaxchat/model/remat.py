"""Rematerialisation policies per transformer layer (--remat): what the backward pass keeps instead of recomputing."""

import contextlib
import contextvars

import jax

from jaxchat.model import attention as attentionlib

# True while a layer is traced where jaxchat.model.gpt.recomputed_when_narrow keeps jax.checkpoint's barrier: the
# backend's choice (Backend.recompute_barrier, set by GPT.hidden_states), and always inside a --remat policy
# (remat_layer) or a scanned run of layers (GPT._trunk); outside the model, kept
_KEEP_BARRIER = contextvars.ContextVar("narrow_recompute_keeps_barrier", default=True)

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
    return fn if remat == "none" else jax.checkpoint(keeping_barrier(fn), policy=REMAT_POLICIES[remat])


@contextlib.contextmanager
def barrier_kept(keep: bool = True):
    """Within: the narrow steps' recomputation keeps jax.checkpoint's barrier (keep) or drops it (not keep)."""
    token = _KEEP_BARRIER.set(keep)
    try:
        yield
    finally:
        _KEEP_BARRIER.reset(token)


def keeping_barrier(fn):
    """fn, traced with the narrow steps' recomputation behind jax.checkpoint's barrier (keeps_barrier)."""
    return barrier_kept()(fn)  # a contextmanager is also a decorator, entered afresh at each call


def keeps_barrier() -> bool:
    """Whether the code being traced is a layer under a --remat policy or in a scanned run (keeping_barrier)."""
    return _KEEP_BARRIER.get()
