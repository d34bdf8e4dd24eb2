"""Load an exported directory with nanochat's own code (run with a nanochat checkout first on PYTHONPATH).

    python tests/nanochat_probe.py BASE_DIR TAG [--batch batch.npz] [--optimizer]

Prints one JSON line: the step and vocabulary nanochat's build_model loaded, the model's state dict (names, shapes,
dtypes as loaded on CPU), the loss of each micro-batch of `batch.npz` (inputs/targets (A, rows, T)) and, with
--optimizer, the param_groups after nanochat's optimizer loaded optim_<step>_rank0.pt and took one step.
"""

import argparse
import json
import os
import sys
import types

import numpy as np


def stub_hf_tokenizers() -> None:
    """nanochat/tokenizer.py imports HuggingFace `tokenizers` at the top; only its tiktoken tokenizer is used here."""
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        stub = types.ModuleType("tokenizers")
        stub.Tokenizer = stub.pre_tokenizers = stub.decoders = stub.Regex = None
        sys.modules["tokenizers"] = stub
        sys.modules["tokenizers.models"] = types.SimpleNamespace(BPE=None)
        sys.modules["tokenizers.trainers"] = types.SimpleNamespace(BpeTrainer=None)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("base_dir")
    p.add_argument("tag")
    p.add_argument("--batch", default="")
    p.add_argument("--optimizer", action="store_true")
    args = p.parse_args()
    os.environ["NANOCHAT_BASE_DIR"] = args.base_dir
    stub_hf_tokenizers()
    import torch
    from nanochat.checkpoint_manager import build_model, find_last_step

    ckpt = os.path.join(args.base_dir, "base_checkpoints", args.tag)
    step = find_last_step(ckpt)
    model, tokenizer, meta = build_model(ckpt, step, torch.device("cpu"), "eval")
    out = {"step": meta["step"], "vocab_size": tokenizer.get_vocab_size(),
           "state": {k: [list(v.shape), str(v.dtype)] for k, v in model.state_dict().items()}}
    if args.batch:
        batch = np.load(args.batch)
        with torch.no_grad():
            out["losses"] = [float(model(torch.from_numpy(x).long(), torch.from_numpy(y).long()))
                             for x, y in zip(batch["inputs"], batch["targets"])]
    if args.optimizer:
        model.train()
        optimizer = model.setup_optimizer()
        optimizer.load_state_dict(torch.load(os.path.join(ckpt, f"optim_{step:06d}_rank0.pt"), weights_only=True))
        idx = torch.randint(0, tokenizer.get_vocab_size(), (1, 16))
        model(idx, idx).backward()
        optimizer.step()
        out["param_groups"] = [{k: v for k, v in g.items() if k != "params"} | {"n": len(g["params"])}
                               for g in optimizer.param_groups]
        out["finite"] = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
