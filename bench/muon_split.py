"""Per-device FLOPs of the MuonAdamW update (XLA's cost analysis of the compiled update, ZeRO-2 layout) with Muon's
stacks left whole (the baseline: every device orthogonalises every matrix of a stack that does not divide the
devices) and zero-padded and split (mesh.muon_stack_sharding), in the same run. One JSON line per depth.

    python bench/muon_split.py --devices=8 --depths=6,12,26      # host devices on CPU; real GPUs where there are
"""

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from jaxchat.training import recipe

from jaxchat.model import mesh as meshlib
from jaxchat.model.gpt import abstract_model
from jaxchat.model.mesh import abstract_like
from jaxchat.training import optim
from jaxchat.training.config import config_for_depth
from jaxchat.training.config import optimizer_flags


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=8, help="CPU host devices to fake (ignored on GPU)")
    parser.add_argument("--depths", default="6,12,26")
    parser.add_argument("--aspect-ratio", type=int, default=64)
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")  # before the backend starts
    mesh = meshlib.make_mesh(1)
    for depth in (int(d) for d in args.depths.split(",")):
        config = config_for_depth(depth, aspect_ratio=args.aspect_ratio, head_dim=args.head_dim)
        params = nnx.to_pure_dict(nnx.state(abstract_model(config), nnx.Param))
        flops = {}
        for name, stack_sharding in (("whole", None), ("split", meshlib.muon_stack_sharding(mesh))):
            tx = optim.make_optimizer(**optimizer_flags(), **recipe.get("348fbb3").optimizer_options(), model_dim=config.n_embd, weight_decay=0.2, muon_dtype=jnp.bfloat16,
                                      muon_stack_sharding=stack_sharding)
            state = jax.eval_shape(tx.init, params)
            inputs = (abstract_like(params, meshlib.optimizer_shardings(params, mesh)),
                      abstract_like(state, meshlib.optimizer_shardings(state, mesh)),
                      abstract_like(params, meshlib.param_shardings(params, mesh)))
            cost = jax.jit(lambda g, s, p: tx.update(g, s, p)[0]).lower(*inputs).compile().cost_analysis()
            flops[name] = (cost[0] if isinstance(cost, list) else cost)["flops"]
        print(json.dumps(dict(depth=depth, n_embd=config.n_embd, devices=mesh.size, device=jax.devices()[0].device_kind,
                              jax=jax.__version__, flops_whole=flops["whole"], flops_split=flops["split"],
                              ratio=flops["whole"] / flops["split"])), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
