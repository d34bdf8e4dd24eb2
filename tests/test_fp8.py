"""fp8 matmuls (`--fp8`): parity with nanochat's fp8.py on its unit fixture, exact quantisation, per-shard scales."""

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import TINY_RUN, shared_fixture
from jaxchat import parity
from jaxchat.model import fp8
from jaxchat.model import mesh as meshlib
from jaxchat.model.architecture import MODEL_RECIPES
from jaxchat.runtime import backend


def test_unit_fixture_parity(tmp_path):
    """Quantised operands bit-identical, inverse scales identical, y and both gradients within 1% of their largest
    magnitude, through the parity CLI."""
    fixture = shared_fixture("nanochat_fp8_unit.npz")
    out_path = tmp_path / "fp8_out.npz"
    parity.main([str(fixture), "--out", str(out_path)])
    ref, ours = np.load(fixture), np.load(out_path)
    for name in ("q_x", "q_w", "q_go"):
        assert ours[name].dtype == np.uint8 and ours[name].shape == ref[name].shape
        assert np.array_equal(ours[name], ref[name]), f"{name}: {np.sum(ours[name] != ref[name])} bytes differ"
    for name in ("inv_x", "inv_w", "inv_go"):
        assert ours[name].dtype == np.float32 and ours[name] == ref[name], (name, ours[name], ref[name])
    for name in ("y", "grad_x", "grad_w"):
        error = np.abs(ours[name] - ref[name]).max() / np.abs(ref[name]).max()
        print(f"{name}: max |jaxchat - nanochat| / max |nanochat| = {error:.3g}")
        assert error <= 0.01, (name, error)


def reference_quantise(x: np.ndarray, fp8_dtype) -> tuple[np.ndarray, np.float32]:
    """nanochat/fp8.py `_to_fp8` in numpy: the scale's division in float64, then float32; saturate; round to even."""
    fp8_max = float(ml_dtypes.finfo(fp8_dtype).max)
    amax = np.abs(x.astype(np.float32)).max()
    scale = np.float32(fp8_max / max(np.float64(amax), 1e-12))
    q = np.clip(x.astype(np.float32) * scale, -fp8_max, fp8_max).astype(fp8_dtype)
    return q.view(np.uint8), np.float32(1) / scale


@pytest.mark.parametrize("fp8_dtype", [fp8.E4M3, fp8.E5M2])
def test_quantise_matches_reference_math(fp8_dtype):
    """Scales and roundings equal nanochat's float64-division math over amaxes from 1e-14 to 1e6, values on and next to
    the fp8 rounding midpoints, and an all-zero tensor."""
    rng = np.random.default_rng(0)
    grid = np.unique(np.arange(256, dtype=np.uint8).view(fp8_dtype).astype(np.float32))
    grid = grid[np.isfinite(grid)]
    mids = ((grid[:-1].astype(np.float64) + grid[1:]) / 2).astype(np.float32)
    cases = [np.zeros(16, np.float32)]
    for amax in 10.0 ** rng.uniform(-14, 6, 300):
        x = (rng.standard_normal(256) * amax).astype(np.float32)
        cases.append(x)
    # midpoints of the fp8 grid, reached exactly once the scale is 1 (amax = FP8_MAX)
    fp8_max = np.float32(ml_dtypes.finfo(fp8_dtype).max)
    cases.append(np.concatenate([[fp8_max], mids, np.nextafter(mids, np.float32(np.inf)), -mids]))
    quantise = jax.jit(lambda x: fp8.quantise(x, fp8_dtype))
    for x in cases:
        q, inv = quantise(x)
        ref_q, ref_inv = reference_quantise(x, fp8_dtype)
        assert np.array_equal(np.asarray(q).view(np.uint8), ref_q), np.abs(x).max()
        assert np.float32(inv) == ref_inv, (np.abs(x).max(), float(inv), ref_inv)


def test_qualifying_layers():
    """nanochat's filter: multiples of 16, the smaller side >= 128; gates are excluded."""
    assert fp8.qualifies(768, 768) and fp8.qualifies(768, 3072) and fp8.qualifies(128, 32768)
    assert not fp8.qualifies(32, 6)  # VE gate
    assert not fp8.qualifies(24, 1)  # smear gate
    assert not fp8.qualifies(64, 256) and not fp8.qualifies(136, 200)


def test_qualifying_matmuls_are_counted_from_the_parameter_table():
    """Per layer q, k, v, both projections and c_fc, and the lm_head, where they qualify (jaxchat.aot's expected fp8
    GEMMs); a width under 128 has none."""
    from jaxchat.training.config import config_for_depth

    assert fp8.qualifying_matmuls(config_for_depth(12)) == 6 * 12 + 1
    assert fp8.qualifying_matmuls(config_for_depth(24, max_seq_len=2048)) == 6 * 24 + 1
    assert fp8.qualifying_matmuls(config_for_depth(2, aspect_ratio=32, head_dim=32)) == 0  # n_embd 64


def test_which_devices_have_fp8_matmuls():
    """CUDA compute capability 8.9 and up (Ada, Hopper, Blackwell); a CPU, an A100 or a ROCm device get the note."""
    from types import SimpleNamespace as Device
    for capability in ("8.9", "9.0", "10.0"):
        gpu = Device(platform="gpu", compute_capability=capability, device_kind="GPU")
        b = backend.for_devices([gpu])
        assert b.fp8_gemms and fp8.no_speedup_note(b) is None
    for platform, capability, kind in (("gpu", "8.0", "A100"), ("gpu", "gfx942", "MI300X"), ("cpu", None, "cpu")):
        b = backend.for_devices([Device(platform=platform, compute_capability=capability, device_kind=kind)])
        assert not b.fp8_gemms and kind in fp8.no_speedup_note(b)


def dot_types(hlo: str) -> list[tuple[str, str, str]]:
    """For each dot of an HLO module: (left operand's dtype, right operand's dtype, result dtype)."""
    dtypes = dict(re.findall(r"^\s*(\S+) = (\w+)\[", hlo, re.M))
    return [(dtypes.get(a), dtypes.get(b), out) for out, a, b in re.findall(r" = (\w+)\[\S* dot\(([^,]+), ([^)]+)\)", hlo)]


def test_matmul_multiplies_fp8_operands_into_the_compute_dtype():
    """Forward and both backward dots take the fp8 operands themselves (no dequantised float32 copies) and produce the
    compute dtype: XLA:GPU makes each an fp8 cuBLASLt GEMM writing bf16 (tests/test_aot.py checks the H100 program)."""
    x, w = jnp.ones((8, 128), jnp.bfloat16), jnp.ones((128, 256), jnp.float32)
    step = jax.jit(jax.value_and_grad(lambda x, w: fp8.matmul(x, w).astype(jnp.float32).sum(), argnums=(0, 1)))
    types = dot_types(step.lower(x, w).as_text(dialect="hlo"))
    assert types == [("f8e4m3fn", "f8e4m3fn", "bf16"), ("f8e5m2", "f8e4m3fn", "bf16"),
                     ("f8e4m3fn", "f8e5m2", "bf16")], types


def per_shard_reference(x, w, g, shards: int):
    """y, grad_x (rows concatenated) and grad_w (summed) with each shard's rows through the one-device matmul."""
    ys, gxs, gw = [], [], 0.0
    for xs, gs in zip(np.split(x, shards), np.split(g, shards)):
        y, vjp = jax.vjp(fp8.matmul, jnp.asarray(xs), jnp.asarray(w))
        gx, gws = vjp(jnp.asarray(gs))
        ys.append(np.asarray(y))
        gxs.append(np.asarray(gx))
        gw = gw + np.asarray(gws, np.float64)
    return np.concatenate(ys), np.concatenate(gxs), gw


@pytest.mark.parametrize("fsdp", [1, 4])
def test_scales_per_data_parallel_shard(fsdp):
    """On 8 devices each data-parallel shard quantises its own rows (as each nanochat rank does), the weight is
    quantised whole even when FSDP shards it, and the shards' weight gradients are summed; a global amax would differ."""
    mesh = meshlib.make_mesh(fsdp)
    rng = np.random.default_rng(0)
    magnitudes = np.repeat(10.0 ** rng.uniform(-2, 2, 8), 2)[:, None, None]  # each shard its own range
    x = (rng.standard_normal((16, 4, 128)) * magnitudes).astype(np.float32)
    w = (rng.standard_normal((128, 256)) * 0.05).astype(np.float32)
    g = (rng.standard_normal((16, 4, 256)) * magnitudes).astype(np.float32)

    def loss(x, w):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            y = fp8.matmul(x, w)
        return jnp.sum(y * g), y

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True),
                   in_shardings=(NamedSharding(mesh, P(meshlib.DATA_AXES)), NamedSharding(mesh, P("fsdp", None))))
    (_, y), (grad_x, grad_w) = step(x, w)
    ref_y, ref_gx, ref_gw = per_shard_reference(x, w, g, 8)
    assert np.array_equal(np.asarray(y), ref_y) and np.array_equal(np.asarray(grad_x), ref_gx)
    np.testing.assert_allclose(np.asarray(grad_w), ref_gw, rtol=1e-5, atol=1e-6 * np.abs(ref_gw).max())
    assert not np.allclose(np.asarray(fp8.matmul(jnp.asarray(x), jnp.asarray(w))), ref_y)  # one global scale differs


# ----------------------------------------------------------------------------------------------------------------
# A tiny model trained with --fp8 (width 128, so q, k, v, both projections, c_fc and lm_head qualify), on 8 devices

FP8_TINY = TINY_RUN + ["--aspect-ratio=64", "--num-iterations=6", "--eval-every=3", "--save-every=3",
                       "--tensorboard=false"]


def train_printing(argv: list[str]) -> tuple[dict, str]:
    """train(argv) -> (its result, what it printed)."""
    from jaxchat.train import train
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = train(argv)
    return result, out.getvalue()


def val_bpb(printed: str) -> dict[int, str]:
    """{step: validation bpb as printed}."""
    return {int(s): v for s, v in re.findall(r"Step (\d+) \| Validation bpb: (\S+)", printed)}


@pytest.fixture(scope="module")
def runs(base_dir):
    """The same tiny run without and with --fp8: {name: (result, printed)}."""
    return {name: train_printing(FP8_TINY + flags + [f"--model-tag={name}"])
            for name, flags in (("plain", []), ("fp8", ["--fp8=true"]))}


@pytest.mark.slow
def test_fp8_run_tracks_the_unquantised_run(runs):
    """Training losses within 2% of the run without fp8; validation (step 0, same weights) identical, because
    evaluation never uses fp8; the MFU is labelled bf16_mfu; the CPU says it gets no speed-up, once."""
    (plain, plain_out), (fp8_run, fp8_out) = runs["plain"], runs["fp8"]
    assert sorted(fp8_run["losses"]) == list(range(6))
    for step, loss in plain["losses"].items():
        assert abs(fp8_run["losses"][step] - loss) <= 0.02 * abs(loss), (step, fp8_run["losses"][step], loss)
    assert fp8_run["losses"] != plain["losses"]  # fp8 is really on
    assert val_bpb(fp8_out)[0] == val_bpb(plain_out)[0]
    assert fp8_out.count("has no fp8 matmuls") == 1 and "bf16_mfu:" in fp8_out
    assert "has no fp8 matmuls" not in plain_out and "| mfu:" in plain_out


@pytest.mark.slow
@pytest.mark.parametrize("resume_flags", [["--fp8=true"], []], ids=["with-fp8", "without-fp8"])
def test_fp8_checkpoint_resumes_bit_identically(base_dir, runs, resume_flags):
    """A checkpoint saved with --fp8 resumes exactly: with --fp8 the continued losses equal the uninterrupted run's;
    either way the evaluation right after the restore (bf16) equals the one the saving run printed at that step."""
    fp8_run, fp8_out = runs["fp8"]
    tag = "resume-" + ("fp8" if resume_flags else "plain")
    ckpt = base_dir / "base_checkpoints"
    shutil.copytree(ckpt / "fp8" / "3", ckpt / tag / "3")
    resumed, out = train_printing(FP8_TINY + resume_flags + [f"--model-tag={tag}", "--resume-from-step=last"])
    assert val_bpb(out)[3] == val_bpb(fp8_out)[3]
    assert sorted(resumed["losses"]) == [3, 4, 5]
    if resume_flags:
        assert all(resumed["losses"][s] == fp8_run["losses"][s] for s in (3, 4, 5))
    else:
        assert all(abs(resumed["losses"][s] - fp8_run["losses"][s]) <= 0.02 * fp8_run["losses"][s] for s in (3, 4, 5))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", MODEL_RECIPES)
def test_fp8_quantises_only_the_qualifying_layers(monkeypatch, recipe):
    """With fp8 on, exactly q, k, v, both projections, c_fc and lm_head go through fp8 (never the VE or smear gate,
    the embeddings or the scalars), decoding never does, and the gates' and embeddings' gradients keep the direction
    of the unquantised model's (cosine > 0.99), float32 and in the same tree; in both recipes."""
    from flax import nnx
    from jaxchat.model.gpt import GPT
    from jaxchat.training.config import config_for_depth
    config = config_for_depth(2, aspect_ratio=64, head_dim=32, max_seq_len=64, vocab_size=512, recipe=recipe)
    n, Vp = config.n_embd, config.padded_vocab
    idx = jnp.asarray(np.random.default_rng(0).integers(0, 512, (4, 65)), jnp.int32)
    seen, real = [], fp8.matmul
    monkeypatch.setattr(fp8, "matmul", lambda x, w: (seen.append(tuple(w.shape)), real(x, w))[1])
    grads = {}
    for fp8_on in (False, True):
        graphdef, params = nnx.split(GPT(config, rngs=nnx.Rngs(0), fp8=fp8_on), nnx.Param)
        # non-zero projections, so every layer's gradient flows (they start at zero, as in nanochat)
        params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(1), p.shape, p.dtype), params)
        loss = lambda p: nnx.merge(graphdef, p)(idx[:, :-1], idx[:, 1:])  # noqa: E731
        grads[fp8_on] = nnx.to_flat_state(jax.jit(jax.grad(loss))(params))
    per_layer = [(n, n), (n, n), (n, n), (n, n), (n, 4 * n), (4 * n, n)]  # q, k, v, c_proj, c_fc, mlp_proj
    assert sorted(seen) == sorted(per_layer * config.n_layer + [(n, Vp)])
    assert len(seen) == fp8.qualifying_matmuls(config)  # the count jaxchat.aot checks a compiled step against
    seen.clear()
    model = nnx.merge(graphdef, params)
    model.decode_step(idx[:, 0], jnp.int32(0), model.init_cache(4, 8))
    assert seen == []
    cosine = {}
    for (path, g0), (_, g1) in zip(grads[False], grads[True], strict=True):
        a, b = np.asarray(g0[...]), np.asarray(g1[...])
        assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
        cosine["/".join(map(str, path))] = float(np.vdot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))
    print({k: round(v, 4) for k, v in cosine.items()})
    gates = ("wte", "value_embeds", "blocks/ve_gate") + (("smear_gate",) if "smear_gate" in cosine else ())
    assert all(cosine[name] > 0.99 for name in gates), cosine


@pytest.mark.slow
def test_throughput_benchmark_with_fp8():
    """bench/throughput.py --fp8: the step trains in fp8 (CPU: the no-speed-up line), the JSON says so, MFU against
    the bf16 peak, and the README row's depth reads "2 fp8"."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, str(root / "bench" / "throughput.py"), "--depth=2", "--aspect-ratio=64", "--head-dim=32",
           "--seq-len=32", "--vocab-size=128", "--device-batch-size=1", "--grad-accum=2", "--steps=2", "--warmup=1",
           "--fp8"]
    lines = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=300,
                           check=True).stdout.strip().splitlines()
    assert sum("has no fp8 matmuls" in line for line in lines) == 1
    result = json.loads(lines[-2])
    assert result["fp8"] is True and result["mfu_peak"] == "bf16" and result["loss"] > 0
    assert lines[-1].split(" | ")[3] == "2 fp8"
