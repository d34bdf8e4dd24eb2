"""`python -m jaxchat.export` and `--init-from`: jaxchat checkpoints to nanochat's format and back.

Round trip from a real tiny training run (bit-identical parameters and optimizer moments), the parity fixtures'
weights exported tensor for tensor as nanochat saved them, nanochat's own loader on the exported directory (when a
nanochat checkout is at /tmp/nanochat-348fbb3), refusals as one line with exit code 2.
"""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_RUN, shared_fixture

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch", reason="the export tests need PyTorch: pip install -e '.[torch]'")

# A nanochat checkout per commit (git archive of the commit; never part of this repository): tests that run nanochat's
# own loader skip without it.
CHECKOUTS = {rev: Path(f"/tmp/nanochat-{rev}") for rev in ("348fbb3", "92d63d4")}
PROBE = Path(__file__).resolve().parent / "nanochat_probe.py"
FIXTURES = {"nanochat_parity_d2.npz": "348fbb3", "nanochat_head_d4.npz": "92d63d4"}


@pytest.fixture(scope="module")
def trained(base_dir):
    """A real 3-step training run on the demo corpus, its final checkpoint at step 3."""
    from jaxchat.train import train
    train(TINY_RUN + ["--num-iterations=3", "--eval-every=-1", "--model-tag=t", "--run=dummy"])
    return "t"


def run_export(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxchat.export", *argv], capture_output=True, text=True,
                          env=dict(os.environ), timeout=600)


def read_export(out: Path, tag: str, step: int) -> tuple[dict, dict, list[dict]]:
    """(state dict as loaded by torch, meta, optimizer shards) of an exported step."""
    ckpt = out / "base_checkpoints" / tag
    state = torch.load(ckpt / f"model_{step:06d}.pt", weights_only=True)
    meta = json.loads((ckpt / f"meta_{step:06d}.json").read_text())
    shards = [torch.load(p, weights_only=True) for p in sorted(ckpt.glob(f"optim_{step:06d}_rank*.pt"))]
    return state, meta, shards


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}/"))
        elif v is not None:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out


@pytest.mark.parametrize("world_size", [1, 2])
def test_round_trip_is_bit_identical(base_dir, trained, tmp_path, world_size):
    from jaxchat.export import export, read_jaxchat
    from jaxchat.interop import nanochat_ckpt
    from jaxchat.interop.convert import Layout, config_from_dict, from_reference
    from jaxchat.training import optim

    export([f"--model-tag={trained}", f"--to={tmp_path}", f"--world-size={world_size}"])
    step, params, opt, meta = read_jaxchat(trained, None)
    config = config_from_dict(meta["model_config"])
    state, exported_meta, shards = read_export(tmp_path, trained, step)
    assert step == 3 and len(shards) == world_size
    assert all(v.is_contiguous() and v.untyped_storage().nbytes() == v.nbytes for v in state.values())
    back = flat(from_reference(nanochat_ckpt.to_numpy(state), config))
    ours = flat(params)
    assert back.keys() == ours.keys()
    for k in ours:
        assert back[k].dtype == ours[k].dtype and np.array_equal(back[k], ours[k]), k
    # Optimizer moments: the same bits after nanochat's layout (per-shape stacks, rank shards) and back.
    moments = nanochat_ckpt.optimizer_from_shards(shards, Layout.of(config))
    first, second, counts = optim.read_moments(opt)
    for mine, theirs in ((first, moments["first"]), (second, moments["second"])):
        mine, theirs = flat(mine), flat(theirs)
        assert mine.keys() == theirs.keys() and all(np.array_equal(mine[k], theirs[k]) for k in mine)
    assert set(counts.values()) == {moments["count"]} == {3}
    assert exported_meta["step"] == 3 and exported_meta["loop_state"] == meta["loop_state"]


@pytest.mark.entry
def test_optimizer_groups_are_nanochats(base_dir, trained, tmp_path):
    """param_groups as nanochat's setup_optimizer builds them: AdamW groups, then one Muon group per shape."""
    run = run_export(f"--model-tag={trained}", f"--to={tmp_path}")
    assert run.returncode == 0, run.stderr
    state, meta, (shard,) = read_export(tmp_path, trained, 3)
    groups = shard["param_groups"]
    assert [g["kind"] for g in groups] == ["adamw"] * 5 + ["muon"] * 4  # shapes (2,32) (64,64) (64,256) (256,64)
    names = list(state)  # indices run over the groups in order, one per parameter
    assert sorted(i for g in groups for i in g["params"]) == list(range(len(names)))
    muon_sizes = [len(g["params"]) for g in groups[5:]]
    assert sum(muon_sizes) == 2 * 6 + 1
    lr_mult = groups[0]["lr"] / groups[0]["initial_lr"]
    assert lr_mult == pytest.approx(0.5)  # the last step (2 of 3) ran in the warmdown: lrm 0.5
    assert all(g["lr"] == pytest.approx(g["initial_lr"] * lr_mult) for g in groups)
    assert groups[4]["betas"] == [0.96, 0.95] and groups[5]["ns_steps"] == 5
    first_muon = shard["state"][groups[5]["params"][0]]
    assert first_muon["momentum_buffer"].shape[0] == muon_sizes[0] and first_muon["momentum_buffer"].abs().sum() > 0
    assert {shard["state"][i]["step"] for g in groups[:5] for i in g["params"]} == {3}


def test_embeddings_in_bfloat16_like_nanochat_on_cuda(base_dir, trained, tmp_path):
    from jaxchat.export import export
    export([f"--model-tag={trained}", f"--to={tmp_path}", "--embed-dtype=bfloat16", "--no-optimizer"])
    state, _, shards = read_export(tmp_path, trained, 3)
    assert not shards
    dtypes = {k: v.dtype for k, v in state.items()}
    assert dtypes.pop("transformer.wte.weight") == dtypes.pop("value_embeds.1.weight") == torch.bfloat16
    assert set(dtypes.values()) == {torch.float32}


def fixture_checkpoint(name: str, tag: str, tokenizer_dir: Path) -> tuple:
    """A jaxchat checkpoint holding a parity fixture's weights (imported through convert.from_reference)."""
    from jaxchat.data.tokenizer import Tokenizer
    from jaxchat.interop.convert import from_reference, read_reference_npz, to_reference_names
    from jaxchat.runtime.checkpoint import Checkpointer, checkpoint_dir

    config, state, data = read_reference_npz(str(shared_fixture(name)))
    if set(to_reference_names(config)) != set(state):
        pytest.skip(f"{name} has parameters jaxchat's convert.py does not know yet")
    assert Tokenizer.load(str(tokenizer_dir)).vocab_size == config.vocab_size
    ckpt = Checkpointer(checkpoint_dir(tag), async_save=False, lock=True)
    meta = dict(step=0, val_bpb=None, model_config=dataclasses.asdict(config), user_config={"data": "demo"},
                device_batch_size=1, max_seq_len=config.sequence_len, total_batch_size=1024,
                dataloader_state_dict={"pq_idx": 0, "rg_idx": 0, "epoch": 1},
                loop_state=dict(min_val_bpb=None, smooth_train_loss=0.0, total_training_time=0.0))
    ckpt.save(0, from_reference(state, config), {"unused": np.zeros(1, np.float32)}, meta)
    ckpt.close()
    return config, data


@pytest.fixture(scope="module")
def tokenizer_500(base_dir, trained, tmp_path_factory):
    """A real 500-token tokenizer (the parity fixtures' vocabulary), trained on the demo corpus."""
    from jaxchat.data.tok_train import train_tokenizer
    out = tmp_path_factory.mktemp("tok500")
    train_tokenizer(source="demo", vocab_size=500, max_chars=2_000_000, doc_cap=10_000, out_dir=str(out))
    return out


@pytest.mark.entry
@pytest.mark.parametrize("name", list(FIXTURES))
def test_fixture_weights_export_as_nanochat_saved_them(base_dir, tokenizer_500, tmp_path, name):
    from jaxchat.interop.nanochat_ckpt import META_KEYS
    tag = "fx_" + FIXTURES[name]
    config, data = fixture_checkpoint(name, tag, tokenizer_500)
    run = run_export(f"--model-tag={tag}", f"--to={tmp_path}", f"--tokenizer-dir={tokenizer_500}", "--no-optimizer")
    assert run.returncode == 0, run.stderr
    state, meta, _ = read_export(tmp_path, tag, 0)
    reference = {k.removeprefix("param/"): data[k] for k in data.files if k.startswith("param/")}
    assert list(state) and set(state) == set(reference)
    for k, v in state.items():  # nanochat on CPU saves every tensor in float32
        assert v.dtype == torch.float32 and tuple(v.shape) == reference[k].shape, k
        assert np.array_equal(v.numpy(), reference[k]), k
    assert set(META_KEYS) <= set(meta)
    assert meta["model_config"] == {k.removeprefix("config/"): data[k].item() for k in data.files
                                    if k.startswith("config/") and k not in ("config/window_sizes", "config/rev",
                                                                             "config/json")}
    tok = tmp_path / "tokenizer"
    assert (tok / "tokenizer.pkl").read_bytes() == (tokenizer_500 / "tokenizer.pkl").read_bytes()
    token_bytes = torch.load(tok / "token_bytes.pt", weights_only=True)
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (config.vocab_size,)


def probe(base: Path, tag: str, *args: str, rev: str = "348fbb3") -> dict:
    """nanochat's own loader (tests/nanochat_probe.py in a checkout of `rev`) on an exported directory."""
    checkout = CHECKOUTS[rev]
    if not (checkout / "nanochat" / "checkpoint_manager.py").exists():
        pytest.skip(f"no nanochat checkout at {checkout}: git -C <nanochat mirror> archive {rev} | tar -x -C {checkout}")
    env = dict(os.environ, PYTHONPATH=str(checkout))
    run = subprocess.run([sys.executable, str(PROBE), str(base), tag, *args], capture_output=True, text=True, env=env,
                         timeout=600, cwd=checkout)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.entry
@pytest.mark.parametrize("name", list(FIXTURES))
def test_nanochat_builds_the_exported_fixture(base_dir, tokenizer_500, tmp_path, name):
    """nanochat's build_model (at the fixture's commit) loads the directory, and its forward gives the fixture's loss."""
    tag = "fx_probe_" + FIXTURES[name]
    config, data = fixture_checkpoint(name, tag, tokenizer_500)
    run = run_export(f"--model-tag={tag}", f"--to={tmp_path}", f"--tokenizer-dir={tokenizer_500}", "--no-optimizer")
    assert run.returncode == 0, run.stderr
    np.savez(tmp_path / "batch.npz", inputs=data["idx"][None], targets=data["targets"][None])
    out = probe(tmp_path, tag, "--batch", str(tmp_path / "batch.npz"), rev=FIXTURES[name])
    assert out["step"] == 0 and out["vocab_size"] == 500
    assert set(out["state"]) == {k.removeprefix("param/") for k in data.files if k.startswith("param/")}
    assert out["losses"][0] == pytest.approx(float(data["loss"]), abs=1e-5)


@pytest.mark.entry
def test_nanochat_resumes_the_exported_optimizer(base_dir, trained, tmp_path):
    """nanochat's MuonAdamW loads optim_<step>_rank0.pt (group sizes, state shapes) and steps from it."""
    run = run_export(f"--model-tag={trained}", f"--to={tmp_path}")
    assert run.returncode == 0, run.stderr
    out = probe(tmp_path, trained, "--optimizer")
    assert out["step"] == 3 and out["finite"]
    assert [g["kind"] for g in out["param_groups"]] == ["adamw"] * 5 + ["muon"] * 4


@pytest.mark.entry
def test_refuses_to_overwrite_without_force(base_dir, trained, tmp_path):
    assert run_export(f"--model-tag={trained}", f"--to={tmp_path}", "--no-optimizer").returncode == 0
    again = run_export(f"--model-tag={trained}", f"--to={tmp_path}", "--no-optimizer")
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "--force" in again.stderr
    assert "model_000003.pt already exists" in again.stderr
    forced = run_export(f"--model-tag={trained}", f"--to={tmp_path}", "--no-optimizer", "--force")
    assert forced.returncode == 0, forced.stderr


@pytest.mark.entry
def test_without_torch_says_so(base_dir, trained, tmp_path):
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('no torch here')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-m", "jaxchat.export", f"--model-tag={trained}", f"--to={tmp_path}/out"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "pip install -e '.[torch]'" in run.stderr


@pytest.mark.entry
def test_help_describes_every_flag():
    from jaxchat.export import build_parser
    actions = [a for a in build_parser()._actions if a.dest != "help"]
    assert len(actions) == 9 and all(len(a.help or "") > 20 for a in actions)
    run = run_export("--help")
    assert run.returncode == 0 and all(a.option_strings[0] in run.stdout for a in actions)


@pytest.mark.entry
@pytest.mark.parametrize("name", ["nanochat_parity_d2_fp32muon.npz", "nanochat_head_d4.npz"])
def test_init_from_then_train_gives_the_reference_losses(base_dir, tokenizer_500, tmp_path, name):
    """--init-from's loading, then the training step on the fixture's batches with its recipe's optimizer: each
    step's loss is the reference's (the weights are nanochat's, exported as nanochat saves them and read back
    through the .pt files)."""
    import jax
    from jaxchat import parity
    from jaxchat.interop import nanochat_ckpt
    from jaxchat.model import mesh as meshlib
    from jaxchat.training import optim
    from jaxchat.training.step import abstract_training

    jax.config.update("jax_default_matmul_precision", "highest")  # float32 parity
    config, data = fixture_checkpoint(name, "fx_init_" + config_tag(name), tokenizer_500)
    run = run_export(f"--model-tag=fx_init_{config_tag(name)}", f"--to={tmp_path}", f"--tokenizer-dir={tokenizer_500}",
                     "--no-optimizer")
    assert run.returncode == 0, run.stderr
    tx, values = parity.optimizer_from_settings(json.loads(str(data["opt/json"])), config.n_embd, config.recipe)
    mesh = meshlib.make_mesh(1, devices=jax.devices()[:1])
    _, train_step, targets = abstract_training(config, tx, mesh, compute_dtype="float32")
    params, _, meta = nanochat_ckpt.start_from(str(tmp_path), config, targets, None, with_optimizer=False)
    assert meta["path"].endswith("model_000000.pt")
    opt_state = jax.jit(tx.init, out_shardings=jax.tree.map(lambda t: t.sharding, targets[1]))(params)
    schedule = {k: np.float32(values[k]) for k in optim.SCHEDULE_KEYS}
    for k in (1, 2, 3):
        inputs, targets_ = (np.asarray(data[f"step{k}_{x}"], np.int32)[None] for x in ("idx", "targets"))
        params, opt_state, metrics = train_step(params, opt_state, inputs, targets_, schedule)
        assert float(metrics["loss"]) == pytest.approx(float(data[f"step{k}_loss"]), abs=1e-5), k


def config_tag(name: str) -> str:
    return name.removesuffix(".npz").replace("nanochat_", "")


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_optimizer_restores_every_moment(base_dir, trained, tmp_path, world_size):
    """--init-from with --resume-optimizer: jaxchat's optimizer state, through nanochat's rank shards, comes back
    bit for bit (Muon momentum and factored second moments, AdamW moments and step count)."""
    import jax
    from jaxchat.export import export, read_jaxchat
    from jaxchat.interop import nanochat_ckpt
    from jaxchat.interop.convert import Layout, config_from_dict
    from jaxchat.model import mesh as meshlib
    from jaxchat.training import optim
    from jaxchat.training.config import optimizer_flags
    from jaxchat.training.recipe import get as get_recipe
    from jaxchat.training.step import abstract_training

    export([f"--model-tag={trained}", f"--to={tmp_path}", f"--world-size={world_size}"])
    _, params, opt, meta = read_jaxchat(trained, None)
    config = config_from_dict(meta["model_config"])
    tx = optim.make_optimizer(**optimizer_flags(), **get_recipe("348fbb3").optimizer_options(), model_dim=config.n_embd)
    _, _, targets = abstract_training(config, tx, meshlib.make_mesh(2), compute_dtype="float32")
    loaded, _, _ = nanochat_ckpt.start_from(str(tmp_path), config, targets, None, with_optimizer=False)
    fresh = jax.jit(tx.init, out_shardings=jax.tree.map(lambda t: t.sharding, targets[1]))(loaded)
    # read and checked once (its layout carried with it): loading needs nothing more of this run's model config
    source = nanochat_ckpt.check_source(str(tmp_path), config, with_optimizer=True)
    assert source.layout == Layout.of(config) and len(source.shards) == world_size
    _, opt_state, _ = nanochat_ckpt.start_from(source, None, targets, fresh, with_optimizer=True)
    compared = 0
    for (path, leaf), target in zip(jax.tree_util.tree_flatten_with_path(opt_state)[0], jax.tree.leaves(targets[1])):
        names = optim.key_names(path)
        saved = opt
        for k in names:
            saved = saved[k]
        assert leaf.sharding == target.sharding and leaf.dtype == saved.dtype
        if names[0] == "schedule":
            continue
        assert np.array_equal(np.asarray(leaf), saved), names
        compared += 1
    assert compared == 5 * 3 + 2 * 7  # five AdamW groups (count, mu, nu), Muon's two moments of seven matrices
    assert all(np.array_equal(np.asarray(a), b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)))


@pytest.mark.entry
def test_record_recipe_optimizer_is_nanochats(base_dir, tokenizer_500, tmp_path):
    """A 92d63d4 model's optimizer state after two real steps: exported in nanochat 92d63d4's groups (six AdamW
    groups with the smear one, Muon by shape, each holding the parameters the fixture's reference groups list), loaded
    by nanochat's own MuonAdamW (with a checkout), and read back bit for bit."""
    import jax
    from jaxchat import parity
    from jaxchat.export import read_jaxchat
    from jaxchat.interop import nanochat_ckpt
    from jaxchat.interop.convert import Layout
    from jaxchat.model import mesh as meshlib
    from jaxchat.runtime.checkpoint import Checkpointer, checkpoint_dir
    from jaxchat.training import optim
    from jaxchat.training.step import abstract_training

    name, tag = "nanochat_head_d4.npz", "fx_opt"
    config, data = fixture_checkpoint(name, tag + "_weights", tokenizer_500)
    settings = json.loads(str(data["opt/json"]))
    tx, values = parity.optimizer_from_settings(settings, config.n_embd, config.recipe)
    _, train_step, targets = abstract_training(config, tx, meshlib.make_mesh(1, devices=jax.devices()[:1]),
                                               compute_dtype="float32")
    run = run_export(f"--model-tag={tag}_weights", f"--to={tmp_path / 'w'}", f"--tokenizer-dir={tokenizer_500}",
                     "--no-optimizer")
    assert run.returncode == 0, run.stderr
    params, _, _ = nanochat_ckpt.start_from(str(tmp_path / "w"), config, targets, None, with_optimizer=False)
    opt_state = jax.jit(tx.init, out_shardings=jax.tree.map(lambda t: t.sharding, targets[1]))(params)
    for k in (1, 2):
        batch = (np.asarray(data[f"step{k}_{x}"], np.int32)[None] for x in ("idx", "targets"))
        params, opt_state, _ = train_step(params, opt_state, *batch, {k: np.float32(values[k]) for k in values})
    ckpt = Checkpointer(checkpoint_dir(tag), async_save=False, lock=True)
    user_config = {k: settings[k] for k in ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr")}
    ckpt.save(2, params, opt_state, dict(step=2, val_bpb=None, model_config=dataclasses.asdict(config),
                                         user_config=dict(user_config, data="demo", total_batch_size=2**19),
                                         loop_state={}))
    ckpt.close()
    run = run_export(f"--model-tag={tag}", f"--to={tmp_path / 'o'}", f"--tokenizer-dir={tokenizer_500}")
    assert run.returncode == 0, run.stderr
    _, _, (shard,) = read_export(tmp_path / "o", tag, 2)
    _, saved_params, saved_opt, _ = read_jaxchat(tag, 2)
    layout = Layout.of(config)
    groups = layout.groups
    assert [list(g.names) for g in groups] == [g["param_names"] for g in settings["groups"]]
    for ours, ref in zip(shard["param_groups"], settings["groups"]):
        fields = ("kind", "betas", "eps", "weight_decay") if ref["kind"] == "adamw" else ("kind", "beta2", "ns_steps")
        assert {f: ours[f] for f in fields} == {f: ref[f] for f in fields}
    moments = nanochat_ckpt.optimizer_from_shards([shard], layout)
    first, second, counts = optim.read_moments(saved_opt)
    for mine, theirs in ((first, moments["first"]), (second, moments["second"])):
        mine, theirs = flat(mine), flat(theirs)
        assert mine.keys() == theirs.keys() and all(np.array_equal(mine[k], theirs[k]) for k in mine)
    assert set(counts.values()) == {moments["count"]} == {2}
    out = probe(tmp_path / "o", tag, "--optimizer", rev="92d63d4")
    assert out["finite"] and [g["n"] for g in out["param_groups"]] == [len(g.names) for g in groups]


def first_batch(argv: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The micro-batches of a run's first step (A, rows, T), read as the training loop reads them."""
    from jaxchat.data.dataloader import make_loaders, prepare_data
    from jaxchat.training.config import parse_flags

    c = parse_flags(argv)
    tok, files = prepare_data(c.data)
    loader = make_loaders(tok, files["train"], device_batch_size=c.device_batch_size, seq_len=c.max_seq_len,
                          data_shards=c.data_shards)
    micro = [next(loader) for _ in range(c.total_batch_size // (c.max_seq_len * c.device_batch_size * 8))]
    return np.stack([m[0] for m in micro]), np.stack([m[1] for m in micro])


@pytest.mark.entry
def test_train_init_from_starts_from_nanochat_weights(base_dir, trained, tmp_path):
    """`--init-from` a nanochat directory: the first step's loss is the loss of those weights on that batch, as
    jaxchat's forward and (with a nanochat checkout) nanochat's own model compute it; --resume-optimizer trains on."""
    from jaxchat.interop import nanochat_ckpt
    from jaxchat.interop.convert import model_from_reference
    from jaxchat.train import train

    export_dir = tmp_path / "nanochat"
    assert run_export(f"--model-tag={trained}", f"--to={export_dir}").returncode == 0
    argv = TINY_RUN + ["--num-iterations=2", "--eval-every=-1", f"--init-from={export_dir}", "--model-tag=i",
                       "--resume-optimizer=true"]
    losses = train(argv)["losses"]
    inputs, targets = first_batch(argv)
    config, state, _ = nanochat_ckpt.read_checkpoint(nanochat_ckpt.find_model_file(str(export_dir)))
    model = model_from_reference(config, state)
    ours = np.mean([float(model(x, y)) for x, y in zip(inputs, targets)])
    assert losses[0] == pytest.approx(ours, abs=1e-5) and np.isfinite(losses[1])
    np.savez(tmp_path / "batch.npz", inputs=inputs, targets=targets)
    reference = probe(export_dir, trained, "--batch", str(tmp_path / "batch.npz"))["losses"]
    assert losses[0] == pytest.approx(np.mean(reference), abs=1e-5)


@pytest.mark.entry
@pytest.mark.parametrize("flags, message", [
    (["--depth=4"], "n_layer 2 there, 4 here (set by --depth)"),
    (["--max-seq-len=128"], "sequence_len 64 there, 128 here (set by --max-seq-len)"),
    (["--init-from=/nonexistent"], "--init-from=/nonexistent: no such file or directory"),
    (["--init-from=", "--resume-optimizer=true"], "--resume-optimizer"),
])
def test_train_init_from_mismatch_is_one_line(base_dir, trained, tmp_path, flags, message):
    export_dir = tmp_path / "nanochat"
    assert run_export(f"--model-tag={trained}", f"--to={export_dir}", "--no-optimizer").returncode == 0
    argv = TINY_RUN + ["--num-iterations=2", f"--init-from={export_dir}", "--model-tag=m"] + flags
    run = subprocess.run([sys.executable, "-m", "jaxchat.train", *argv], capture_output=True, text=True,
                         env=dict(os.environ), timeout=600)
    assert run.returncode == 2 and message in run.stderr and run.stderr.strip().count("\n") == 0, run.stderr[-2000:]


def test_export_and_init_from_check_the_recorded_tokenizer(base_dir, trained, tmp_path, capsys):
    """The demo tokenizer replaced by another of the same size (Tokenizer.save keeps the old one aside): export ships
    the one the checkpoint records, found by its fingerprint; an explicit wrong --tokenizer-dir, and --init-from a
    nanochat directory of the original tokenizer into a run of the other, are refused in one line naming where the
    right one is; --force over another tokenizer in --to keeps that one aside too."""
    from jaxchat.data import tokenizer as toklib
    from jaxchat.export import export
    from jaxchat.runtime.common import UserError
    from jaxchat.train import train
    tok_dir = base_dir / "tokenizer_demo"
    export([f"--model-tag={trained}", f"--to={tmp_path / 'before'}", "--no-optimizer"])
    enc = toklib.Tokenizer.load(str(tok_dir)).enc
    original = toklib.Tokenizer(enc).fingerprint()
    ranks = dict(enc._mergeable_ranks)
    a, b = [t for t, r in ranks.items() if r in (300, 301)]
    ranks[a], ranks[b] = ranks[b], ranks[a]
    other = toklib.Tokenizer(toklib.encoding_from_ranks(ranks, enc._pat_str))
    kept = other.save(str(tok_dir))
    try:
        assert kept == toklib.kept_dir(str(tok_dir), original)
        export([f"--model-tag={trained}", f"--to={tmp_path / 'after'}", "--no-optimizer"])
        assert f"Tokenizer: {kept}, the one step 3 of {trained} was trained with" in capsys.readouterr().out
        shipped = (tmp_path / "after" / "tokenizer" / "tokenizer.pkl").read_bytes()
        assert shipped == (tmp_path / "before" / "tokenizer" / "tokenizer.pkl").read_bytes()
        with pytest.raises(UserError, match=f"trained with tokenizer {original}, but {tok_dir} holds "
                                            f"{other.fingerprint()}; the one it needs is in {kept}: pass "
                                            f"--tokenizer-dir={kept}"):
            export([f"--model-tag={trained}", f"--to={tmp_path / 'x'}", f"--tokenizer-dir={tok_dir}"])
        with pytest.raises(UserError, match=f"--init-from={tmp_path / 'before'} was trained with tokenizer {original}"
                                            f".*`python -m jaxchat.tok_train --demo --restore={tmp_path / 'before'}/"
                                            f"tokenizer`"):
            train(TINY_RUN + ["--num-iterations=1", f"--init-from={tmp_path / 'before'}", "--model-tag=tk"])
        # --force into a nanochat directory holding another tokenizer: that one is kept aside, not overwritten
        (tmp_path / "after" / "tokenizer").rename(tmp_path / "mine")
        other.save(str(tmp_path / "after" / "tokenizer"))
        export([f"--model-tag={trained}", f"--to={tmp_path / 'after'}", "--no-optimizer", "--force"])
        aside = tmp_path / "after" / f"tokenizer.{other.fingerprint()}"
        assert toklib.Tokenizer.load(str(aside)).fingerprint() == other.fingerprint()
        assert (tmp_path / "after" / "tokenizer" / "tokenizer.pkl").read_bytes() == shipped
    finally:
        toklib.restore(str(tok_dir), original)
    assert toklib.Tokenizer.load(str(tok_dir)).fingerprint() == original


def test_corrupt_nanochat_files_are_one_line_before_compiling(base_dir, trained, tmp_path, capsys):
    """Garbage, truncated or mismatched nanochat files for --init-from (model, meta, optimizer with
    --resume-optimizer) and base_eval --nanochat-checkpoint: one line naming the file, before anything compiles."""
    import shutil

    from jaxchat.base_eval import load_nanochat_checkpoint
    from jaxchat.export import export
    from jaxchat.runtime.common import UserError
    from jaxchat.train import train
    good = tmp_path / "good"
    export([f"--model-tag={trained}", f"--to={good}"])
    model = good / "base_checkpoints" / trained / "model_000003.pt"
    state = torch.load(model, weights_only=True)
    flipped = {k: v.clone() for k, v in state.items()}
    flipped["lm_head.weight"].view(-1)[7] = 1.7e38  # an exponent bit flipped: finite, absurd
    state["lm_head.weight"] = state["lm_head.weight"][:, :16].clone()
    optim = torch.load(good / "base_checkpoints" / trained / "optim_000003_rank0.pt", weights_only=True)
    entry = next(e for e in optim["state"].values() if "exp_avg_sq" in e)
    entry["exp_avg_sq"].view(-1)[0] = -entry["exp_avg_sq"].view(-1)[0] - 1e-3  # a sign bit flipped

    def garbage(path):
        path.write_bytes(os.urandom(4000))

    def truncated(path):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    cases = [  # (file, how it is broken, --resume-optimizer, what the line says)
        ("model_000003.pt", garbage, False, "is corrupt or truncated (4,000 bytes; ValueError: not a complete zip"),
        ("model_000003.pt", truncated, False, "is corrupt or truncated"),
        ("model_000003.pt", lambda p: torch.save(state, p), False,
         "lm_head.weight has shape (4096, 16), the model of its meta file (4096, 64)"),
        ("meta_000003.json", lambda p: p.write_text('{"model_config": {"n_layer": 2'), False, "JSONDecodeError"),
        ("model_000003.pt", lambda p: torch.save(flipped, p), False, "lm_head.weight holds values beyond 1e+15"),
        ("optim_000003_rank0.pt", lambda p: torch.save(optim, p), True, "negative values in a second moment"),
        ("optim_000003_rank0.pt", truncated, True, "or start without --resume-optimizer"),
    ]
    for i, (name, breaks, optimizer, message) in enumerate(cases):
        broken = tmp_path / f"broken{i}"
        shutil.copytree(good, broken)
        path = broken / "base_checkpoints" / trained / name
        breaks(path)
        with pytest.raises(UserError) as e:
            train(TINY_RUN + ["--num-iterations=1", f"--init-from={broken}", "--model-tag=c",
                              f"--resume-optimizer={optimizer}"])
        assert str(path) in str(e.value) and message in str(e.value) and "\n" not in str(e.value), str(e.value)
        if not optimizer:
            with pytest.raises(UserError, match=re.escape(str(path))):
                load_nanochat_checkpoint(str(broken / "base_checkpoints" / trained / "model_000003.pt"))
    assert "step compiled in" not in capsys.readouterr().out


@pytest.mark.entry
def test_refusals_exit_2_in_one_line_from_the_command_line(base_dir, trained, tmp_path):
    """tok_train over a tokenizer a checkpoint uses and base_eval of a garbage nanochat model, as commands (started
    together): exit code 2, one line, no traceback, nothing replaced."""
    from jaxchat.data.tokenizer import Tokenizer
    garbage = tmp_path / "nc" / "base_checkpoints" / "x" / "model_000001.pt"
    garbage.parent.mkdir(parents=True)
    garbage.write_bytes(os.urandom(3000))
    model_config = dict(sequence_len=64, vocab_size=4096, n_layer=2, n_head=1, n_kv_head=1, n_embd=64,
                        window_pattern="L")
    (garbage.parent / "meta_000001.json").write_text(json.dumps({"step": 1, "model_config": model_config}))
    before = Tokenizer.load(str(base_dir / "tokenizer_demo")).fingerprint()
    commands = {"tok_train": ["jaxchat.tok_train", "--demo", "--vocab-size=300"],
                "base_eval": ["jaxchat.base_eval", f"--nanochat-checkpoint={garbage}", "--eval=sample"]}
    procs = {name: subprocess.Popen([sys.executable, "-m", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=dict(os.environ)) for name, argv in commands.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2 and err.startswith("error: ") and err.count("\n") == 1, (name, err[-2000:])
        assert "Traceback" not in out + err
    assert Tokenizer.load(str(base_dir / "tokenizer_demo")).fingerprint() == before


def test_init_from_a_nanochat_folder_without_its_tokenizer_is_one_line(tmp_path):
    """nanochat's files record no tokenizer: --init-from a folder without tokenizer/ trained silently with the base
    dir's one (a same-size tokenizer of other merges gave val bpb 3.56 against 3.39). Refused in one line naming the
    folder to copy the tokenizer into; once it is there, the usual fingerprint check takes over."""
    import shutil

    from jaxchat.data import tokenizer as toklib
    from jaxchat.interop import nanochat_ckpt
    from jaxchat.interop.convert import config_from_dict
    from jaxchat.runtime.common import UserError

    model_config = dict(sequence_len=64, vocab_size=265, n_layer=2, n_head=1, n_kv_head=1, n_embd=32)
    ckpt = tmp_path / "nc" / "base_checkpoints" / "r"
    ckpt.mkdir(parents=True)
    (ckpt / "meta_000006.json").write_text(json.dumps(dict(step=6, model_config=model_config)))
    (ckpt / "model_000006.pt").write_bytes(b"not read before the tokenizer is known")
    run_tok = tmp_path / "base" / "tokenizer"
    toklib.Tokenizer(toklib.encoding_from_ranks({bytes([i]): i for i in range(256)})).save(str(run_tok))
    tok = toklib.Tokenizer.load(str(run_tok))
    config = config_from_dict(model_config)
    for source in (tmp_path / "nc", ckpt, ckpt / "model_000006.pt"):
        with pytest.raises(UserError) as e:
            nanochat_ckpt.check_source(str(source), config, False, tok)
        line = str(e.value)
        assert line.startswith(f"--init-from={source}: no tokenizer at {tmp_path / 'nc' / 'tokenizer'}") and \
            f"cp -r {run_tok} {tmp_path / 'nc' / 'tokenizer'}" in line and "\n" not in line, line
    shutil.copytree(run_tok, tmp_path / "nc" / "tokenizer")  # the user says which tokenizer it is
    # past the tokenizer, to the weights
    with pytest.raises(UserError, match="model_000006.pt is corrupt or truncated"):
        nanochat_ckpt.check_source(str(ckpt), config, False, tok)


def test_an_unfinished_export_is_named_and_leaves_no_temporary_file(tmp_path):
    """kill -9 during export left optim_*.pt.tmp and a model file the next export refused to overwrite without
    saying why: the refusal now names the unfinished export, --force clears its .tmp files; a write that fails (or a
    signal, an exception under cli.run) removes its own .tmp."""
    from jaxchat.export import check_targets
    from jaxchat.interop import nanochat_ckpt
    from jaxchat.runtime.common import UserError

    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.pkl").write_bytes(b"ours")
    files = nanochat_ckpt.paths(str(tmp_path / "nc"), "d4", 6)
    files["optim0"] = nanochat_ckpt.optim_path(files["model"], 0)
    nanochat_ckpt.save({"w": torch.zeros(2)}, files["model"], "model")  # what the killed export got to write
    Path(files["optim0"] + ".tmp").write_bytes(b"half")
    with pytest.raises(UserError, match=r"model_000006\.pt already exists, left by an export that did not finish \(no "
                                        r"meta_000006\.json, unfinished optim_000006_rank0\.pt\.tmp\): pass --force"):
        check_targets(files, str(tmp_path / "tok" / "tokenizer.pkl"), force=False)
    check_targets(files, str(tmp_path / "tok" / "tokenizer.pkl"), force=True)
    assert not Path(files["optim0"] + ".tmp").exists()
    nanochat_ckpt.write_json({"step": 6}, files["meta"])  # a finished export: the plain refusal
    with pytest.raises(UserError, match=r"model_000006\.pt already exists: pass --force to overwrite it"):
        check_targets(files, str(tmp_path / "tok" / "tokenizer.pkl"), force=False)
    with pytest.raises(Exception):
        nanochat_ckpt.save({"w": lambda: 0}, files["optim0"], "optim")  # torch cannot pickle it: fails mid-write
    assert not Path(files["optim0"] + ".tmp").exists() and not Path(files["optim0"]).exists()


def test_damaged_values_in_nanochat_files_are_one_line(tmp_path):
    """Bytes flipped inside a tensor keep the zip and the shapes intact: NaN, an absurd exponent or a negative second
    moment passed every check and gave a NaN loss at step 1 blamed on the learning rate."""
    from jaxchat.interop.nanochat_ckpt import check_values
    from jaxchat.runtime.common import UserError

    good = {"w": torch.ones(4, 4), "step": torch.tensor(3.0), "ids": torch.arange(3)}
    check_values(good, "f.pt", "fix")
    for name, value, message in [("w", float("nan"), "non-finite values"), ("w", float("inf"), "non-finite values"),
                                 ("w", 1.7e38, "values beyond 1e+15"), ("exp_avg_sq", -1.0, "negative values")]:
        tensors = dict(good, **{name: torch.ones(4, 4)})
        tensors[name][1, 2] = value
        with pytest.raises(UserError, match=rf"^f\.pt: {name} holds {re.escape(message)}.*: fix$"):
            check_values(tensors, "f.pt", "fix", non_negative=("exp_avg_sq",))


def test_base_eval_of_a_nanochat_model_without_its_tokenizer_is_one_line(tmp_path, monkeypatch):
    """The same class in base_eval: --nanochat-checkpoint without tokenizer/ beside it, and no --tokenizer-dir,
    evaluated with the base dir's tokenizer silently."""
    from jaxchat import base_eval
    from jaxchat.runtime.common import UserError

    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(tmp_path / "base"))
    ckpt = tmp_path / "nc" / "base_checkpoints" / "r"
    ckpt.mkdir(parents=True)
    (ckpt / "model_000006.pt").write_bytes(b"never read")
    with pytest.raises(UserError, match=rf"^--nanochat-checkpoint={ckpt / 'model_000006.pt'}: no tokenizer at "
                                        rf"{tmp_path / 'nc' / 'tokenizer'}, .*: pass --tokenizer-dir=DIR naming the "
                                        rf"tokenizer it was trained with, or copy"):
        base_eval.main(["--nanochat-checkpoint", str(ckpt / "model_000006.pt"), "--eval=bpb"])
    with pytest.raises(UserError, match=r"model\.npz records no tokenizer: pass --tokenizer-dir=DIR"):
        base_eval.main(["--nanochat-checkpoint", str(tmp_path / "model.npz"), "--eval=bpb"])
