"""Memory planning: predicted peak memory, --device-batch-size=auto, the out-of-memory message, and the
memory-saving model options (chunked cross-entropy, rematerialisation, bfloat16 tables) leave the numbers alone."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx


from jaxchat.model import mesh as meshlib
from jaxchat.model.gpt import GPT, GPTConfig
from jaxchat.runtime import cli
from jaxchat.runtime.common import UserError
from jaxchat.training import memory
from jaxchat.training import optim
from jaxchat.training import recipe
from jaxchat.training.config import optimizer_flags
from jaxchat.training.step import abstract_training, compile_step

# 5 layers of period 2 (pattern L, VE every other layer): 2 scanned repeats and 1 unrolled tail layer.
TINY = GPTConfig(sequence_len=32, vocab_size=100, n_layer=5, n_head=2, n_kv_head=2, n_embd=32, window_pattern="L")


def make_model(**kw) -> GPT:
    model = GPT(TINY, rngs=nnx.Rngs(0), **kw)
    # Randomise the zero-initialised projections and gates so every path carries signal.
    state = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(1), 64))
    nnx.update(model, jax.tree.map(lambda p: p + (0.05 * jax.random.normal(next(keys), p.shape)).astype(p.dtype),
                                   state))
    return model


def batch(B=2, T=24, seed=0):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, TINY.vocab_size, (B, T)).astype(np.int32)
    targets = rng.integers(0, TINY.vocab_size, (B, T)).astype(np.int32)
    targets[0, :3] = -1
    return jnp.asarray(idx), jnp.asarray(targets)


def loss_and_grads(model, idx, targets):
    return nnx.jit(lambda m: nnx.value_and_grad(lambda m: m(idx, targets))(m))(model)


def per_token_losses_and_logits(model, idx, targets):
    return nnx.jit(lambda m: (m(idx, targets, reduction="none"), m(idx)))(model)


def assert_same_loss_and_grads(a, b, rtol=1e-5):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    np.testing.assert_allclose(float(loss_a), float(loss_b), rtol=rtol)
    for (path, ga), (_, gb) in zip(nnx.to_flat_state(nnx.state(grads_a)), nnx.to_flat_state(nnx.state(grads_b))):
        ga, gb = np.asarray(ga[...], np.float32), np.asarray(gb[...], np.float32)
        assert np.abs(ga - gb).max() <= rtol * max(np.abs(gb).max(), 1e-6), path


@pytest.mark.slow
def test_chunked_cross_entropy_equals_plain():
    idx, targets = batch()
    plain, chunked = make_model(), make_model(loss_chunk=7)  # 24 positions: 4 chunks, the last one padded
    assert_same_loss_and_grads(loss_and_grads(chunked, idx, targets), loss_and_grads(plain, idx, targets))
    (losses_chunked, logits_chunked), (losses_plain, logits_plain) = (
        per_token_losses_and_logits(m, idx, targets) for m in (chunked, plain))
    np.testing.assert_allclose(losses_chunked, losses_plain, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(logits_chunked, logits_plain)  # logits without targets are not chunked


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["block", "dots", "dots_no_mlp"])
def test_remat_gives_identical_loss_and_grads(remat):
    idx, targets = batch()
    assert_same_loss_and_grads(loss_and_grads(make_model(remat=remat), idx, targets),
                               loss_and_grads(make_model(), idx, targets), rtol=1e-6)


@pytest.mark.slow
def test_bfloat16_tables_are_stored_bfloat16_and_train():
    model = make_model(embed_dtype=jnp.bfloat16)
    assert model.wte[...].dtype == jnp.bfloat16 and model.value_embeds[...].dtype == jnp.bfloat16
    assert model.lm_head[...].dtype == jnp.float32
    loss, grads = loss_and_grads(model, *batch())
    assert np.isfinite(float(loss)) and grads.wte[...].dtype == jnp.bfloat16
    np.testing.assert_allclose(float(loss), float(loss_and_grads(make_model(), *batch())[0]), rtol=1e-2)


def test_bad_remat_name_is_an_error_that_names_no_flag():
    with pytest.raises(ValueError, match="remat 'everything'") as e:  # the flag's message is config.validate's
        GPT(TINY, rngs=nnx.Rngs(0), remat="everything")
    assert "--" not in str(e.value)


# ------------------------------------------------------------------------------------------------------------------
# Prediction, auto batch, out-of-memory message

SMALL = GPTConfig(sequence_len=64, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)


def compile_small(mesh):
    tx = optim.make_optimizer(**optimizer_flags(), **recipe.get("348fbb3").optimizer_options(), model_dim=SMALL.n_embd, weight_decay=0.2, muon_dtype=jnp.float32)
    _, step, (params_like, opt_like) = abstract_training(SMALL, tx, mesh, compute_dtype="float32")
    return lambda b, accum, variant="": compile_step(step, params_like, opt_like, mesh, device_batch_size=b,
                                                     grad_accum=accum, seq_len=SMALL.sequence_len)


@pytest.fixture(scope="module")
def one_device_mesh():
    return meshlib.make_mesh(devices=jax.devices()[:1])


@pytest.mark.slow
def test_prediction_is_positive_and_grows_with_device_batch(one_device_mesh):
    compile_for = compile_small(one_device_mesh)
    predicted = [memory.peak_bytes(compile_for(b, 8 // b)) for b in (2, 8)]
    assert 0 < predicted[0] < predicted[1], predicted


@pytest.mark.slow
def test_auto_picks_a_smaller_batch_under_a_tiny_budget_and_keeps_the_total(one_device_mesh):
    compile_for = compile_small(one_device_mesh)
    total = 8 * SMALL.sequence_len  # 8 rows on one device
    roomy = memory.plan_step(compile_for, device_batch_size=memory.AUTO, total_batch_size=total,
                             seq_len=SMALL.sequence_len, data_parallel_size=1)
    assert (roomy.device_batch_size, roomy.grad_accum) == (8, 1) and roomy.fits
    budget = memory.peak_bytes(compile_for(4, 2)) / memory.SAFETY_MARGIN + 4096  # 4 just fits, 8 does not
    tight = memory.plan_step(compile_for, device_batch_size=memory.AUTO, total_batch_size=total,
                             seq_len=SMALL.sequence_len, data_parallel_size=1, budget_gb=budget / memory.GiB)
    assert (tight.device_batch_size, tight.grad_accum) == (4, 2) and sorted(tight.tried) == [4, 8]
    assert tight.capacity_source == "--memory-budget-gb"
    with pytest.raises(UserError, match="even device batch 1"):
        memory.plan_step(compile_for, device_batch_size=memory.AUTO, total_batch_size=total,
                         seq_len=SMALL.sequence_len, data_parallel_size=1, budget_gb=1e-6)
    fixed = memory.plan_step(compile_for, device_batch_size=8, total_batch_size=total, seq_len=SMALL.sequence_len,
                             data_parallel_size=1, budget_gb=1e-6)  # a fixed batch is only warned about
    assert "predicted to need" in memory.over_capacity_warning(fixed)


@pytest.mark.slow
def test_out_of_memory_is_one_line_exit_2_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    from jax.errors import JaxRuntimeError

    from jaxchat.runtime.checkpoint import Checkpointer, checkpoint_dir
    from jaxchat.train import train

    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(tmp_path))
    real_plan_step, calls = memory.plan_step, []

    def plan_that_runs_out(*args, **kwargs):  # the compiled step fails like XLA does on its third call
        chosen = real_plan_step(*args, **kwargs)
        compiled = chosen.compiled

        def step(*step_args):
            calls.append(1)
            if len(calls) == 3:
                raise JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8589934592 bytes.")
            return compiled(*step_args)
        chosen.compiled = step
        return chosen

    monkeypatch.setattr(memory, "plan_step", plan_that_runs_out)
    argv = ["--data=demo", "--depth=2", "--aspect-ratio=32", "--head-dim=32", "--max-seq-len=64",
            "--device-batch-size=auto", "--total-batch-size=2048", "--num-iterations=6", "--eval-every=100",
            "--eval-tokens=512", "--core-metric-every=-1", "--sample-every=-1", "--save-every=2", "--model-tag=oom",
            "--tensorboard=false"]
    with pytest.raises(SystemExit) as exit_info:
        cli.run(train, argv)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2
    assert "--device-batch-size=auto: 4 (1 accumulation steps" in out  # 8 devices x 4 rows x 64 = 2048 tokens
    assert "Predicted peak memory per device" in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: out of device memory at step 2 with --device-batch-size=4")
    assert "try --device-batch-size=2 or auto" in lines[0] and "--resume-from-step=2" in lines[0]
    assert Checkpointer(checkpoint_dir("oom"), async_save=False).steps() == [2]  # nothing saved after the failure


LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not LIBTPU, reason="libtpu is not installed: pip install \"jax[tpu]==<the installed "
                                  "jax version>\" (.ci/run installs it)")


@pytest.fixture(scope="module")
def v5e_chip():
    """One compile-only TPU v5e chip (jaxchat.aot's, XLA:TPU's real compiler: 15.75 GiB of HBM it may use)."""
    from jaxchat import aot
    return meshlib.make_mesh(devices=aot.topology_devices("v5e", 1))


def outer_product_step(mesh):
    """compile_for of a step whose output is (8192 b)^2 float32 for device batch b: 64 GiB at 32, 16 GiB at 8 (over
    a v5e chip's 15.75), 4 GiB at 4."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return lambda b, accum, variant="": jax.jit(lambda x: jnp.outer(x, x)).lower(
        jax.ShapeDtypeStruct((8192 * b,), jnp.float32, sharding=replicated)).compile()


@pytest.mark.slow
@needs_libtpu
def test_tpu_compile_refusal_means_does_not_fit_and_peak_is_xlas(v5e_chip):
    """XLA:TPU refuses at compile time what does not fit a chip: auto takes that as "does not fit" and tries the next
    size; a fixed device batch it refuses is one line. The prediction is XLA's peak (the summed fields over-count on
    TPU), which a CPU program does not report (there, arguments + temporaries + outputs)."""
    compile_for = outer_product_step(v5e_chip)
    plan = memory.plan_step(compile_for, device_batch_size=memory.AUTO, total_batch_size=32, seq_len=1,
                            data_parallel_size=1, capacity=(int(15.75 * memory.GiB), "v5e"))
    assert plan.device_batch_size == 4 and plan.tried == {32: None, 16: None, 8: None, 4: plan.predicted_bytes}
    stats = plan.compiled.memory_analysis()
    assert plan.predicted_bytes == stats.peak_memory_in_bytes >= 4 * memory.GiB
    with pytest.raises(UserError, match=r"^--device-batch-size=8 does not fit: XLA refuses to compile the step "
                                        r"\(Ran out of memory .*\); try --device-batch-size=4, auto") as refusal:
        memory.plan_step(compile_for, device_batch_size=8, total_batch_size=32, seq_len=1, data_parallel_size=1,
                         capacity=(int(15.75 * memory.GiB), "v5e"))
    assert "\n" not in str(refusal.value)
    cpu = outer_product_step(meshlib.make_mesh(devices=jax.devices()[:1]))(1, 1)
    m = cpu.memory_analysis()
    assert memory.peak_bytes(cpu) == m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes


# ------------------------------------------------------------------------------------------------------------------
# A length no device batch can hold: refused before tracing

def test_attention_pairs_count_what_the_cpu_attention_allocates():
    """memory.attention_pairs mirrors attention._attention_blocks without allocating: its count is the masks' (and
    the kept probabilities') size, so the bound covers what tracing would allocate in numpy."""
    from jaxchat.model.attention import _attention_blocks

    for T, w in [(64, 64), (64, 32), (100, 7), (256, 128), (2048, 1024)]:
        assert memory.attention_pairs(T, w, "blocked") == sum(m.size for *_, m in _attention_blocks(T, w)), (T, w)
    assert memory.attention_pairs(64, 32, "xla") == 64 * 64 and memory.attention_pairs(64, 32, "cudnn") == 0


def test_a_length_no_device_batch_holds_is_refused_before_tracing():
    """--max-seq-len=1048576 died with numpy's 64 GiB _ArrayMemoryError while tracing the CPU attention's masks,
    before the planner could refuse it. memory.check_length refuses it from the shapes alone; ordinary lengths pass,
    on CPU and on an H100's 80 GiB with cuDNN attention."""
    import dataclasses

    from jaxchat.runtime import backend
    from jaxchat.training.config import config_for_depth

    cpu = backend.for_devices(jax.devices("cpu"))
    demo = dict(aspect_ratio=32, head_dim=64, vocab_size=4096)
    with pytest.raises(UserError, match=r"^--max-seq-len=1048576 cannot fit: even --device-batch-size=1 needs at "
                                        r"least [\d.]+ GiB per device .* over the 64.00 GiB available \(H\); use a "
                                        r"shorter --max-seq-len$"):
        memory.check_length(config_for_depth(4, max_seq_len=1048576, **demo), cpu, capacity=(64 * memory.GiB, "H"))
    memory.check_length(config_for_depth(4, max_seq_len=256, **demo), cpu, capacity=(1 * memory.GiB, "H"))
    h100 = dataclasses.replace(cpu, platform="gpu", attention="cudnn", compute_dtype="bfloat16")
    memory.check_length(config_for_depth(26, max_seq_len=2048), h100, capacity=(80 * memory.GiB, "H100"))
    memory.check_length(config_for_depth(12, max_seq_len=65536), h100, capacity=(80 * memory.GiB, "H100"))
    with pytest.raises(UserError, match="--max-seq-len=16777216 cannot fit"):  # linear in T, but not unbounded
        memory.check_length(config_for_depth(26, max_seq_len=2**24), h100, capacity=(80 * memory.GiB, "H100"))
