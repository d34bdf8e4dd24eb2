"""CORE evaluation against nanochat's own results on a small bundle, prompt rendering and the base_eval CLI."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jaxchat.eval import core_eval
from jaxchat.runtime.common import UserError

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "core_small"
MARGIN_TOL = 1e-4  # decisions closer than this to a tie may flip between float32 implementations


def fixture_dir() -> Path:
    if not (FIXTURE / "expected.json").exists():
        pytest.skip(f"CORE fixture {FIXTURE} not found: clone the repo beside its shared/ folder to run CORE tests")
    return FIXTURE


@pytest.fixture(scope="module")
def reference():
    """(model, tokenizer, expected.json) of the fixture."""
    from jaxchat.data.tokenizer import Tokenizer
    from jaxchat.interop.convert import model_from_reference
    from jaxchat.interop.convert import read_reference_npz

    root = fixture_dir()
    config, state, _ = read_reference_npz(str(root / "model.npz"))
    tokenizer = Tokenizer.load(str(root / "tokenizer"))
    return model_from_reference(config, state), tokenizer, json.loads((root / "expected.json").read_text())


@pytest.fixture(scope="module")
def results(reference):
    """evaluate_core for the fixture's runs ("-1": every example, "8": max_per_task 8), with backend compile counts."""
    model, tokenizer, _ = reference
    compiles = []

    def listener(event, *args, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    core_eval._SCORERS.clear()  # count this model's compilations from scratch
    out = {}
    try:
        for run in ("-1", "8"):  # CPU matmuls are full float32, like the reference's CPU run
            n_before = len(compiles)
            out[run] = core_eval.evaluate_core(model, tokenizer, str(fixture_dir() / "eval_bundle"),
                                               max_per_task=int(run))
            out[run]["backend_compiles"] = len(compiles) - n_before
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    print({run: (r["compilations"], r["backend_compiles"], r["stats"]) for run, r in out.items()})
    return out


@pytest.mark.parametrize("run", ["-1", "8"])
def test_matches_reference_per_example(results, reference, run):
    expected = reference[2]["runs"][run]
    got = results[run]
    assert list(got["tasks"]) == list(expected["tasks"])
    near_ties, mismatches = 0, []
    for label, exp in expected["tasks"].items():
        correct = got["tasks"][label]["correct"]
        assert len(correct) == len(exp["correct"]), label
        for i, (a, b, margin) in enumerate(zip(correct, exp["correct"], exp["margins"])):
            near_ties += margin < MARGIN_TOL
            if a != b and margin >= MARGIN_TOL:
                mismatches.append((label, i, margin))
        if correct == exp["correct"]:
            assert got["tasks"][label]["accuracy"] == pytest.approx(exp["accuracy"], abs=1e-12)
            assert got["tasks"][label]["centered"] == pytest.approx(exp["centered"], abs=1e-12)
    assert not mismatches, f"examples decided differently from the reference: {mismatches}"
    assert near_ties == 0, "the fixture has near-tie examples: accuracies below may legitimately differ"
    assert got["core"] == pytest.approx(expected["core"], abs=1e-12)


def test_compilations_bounded(results):
    first, second = results["-1"], results["8"]
    used = {(r, t) for r, t in core_eval._SCORERS[next(iter(core_eval._SCORERS))].shapes}
    assert 1 <= first["compilations"] == len(used) <= len(core_eval.length_buckets(10 * 128))
    assert len({t for _, t in used}) == len(used)  # one row count per length: one shape per bucket
    assert second["compilations"] == 0  # the jitted scorer is kept across calls (the training loop's CORE evals)
    assert first["backend_compiles"] == first["compilations"]  # what XLA actually compiled
    assert second["backend_compiles"] == 0


def test_padding_and_batch_shape_do_not_change_results(reference):
    """Right padding with BOS and the batch shape never change a row's losses (the model is causal)."""
    model, tokenizer, _ = reference
    bundle = str(fixture_dir() / "eval_bundle")
    task = next(t for t in core_eval.load_tasks(bundle) if t.label == "arith")
    examples = core_eval.prepare_task(task, core_eval.load_task_data(bundle, task, 8), tokenizer)
    rows = [r for ex in examples for r in ex.rows]
    starts = [s for ex in examples for s in ex.starts]
    ends = [e for ex in examples for e in ex.ends]
    small, _ = core_eval.RowScorer(model, tokenizer.bos_id, tokens_per_device=64).score(rows, starts, ends)
    big, _ = core_eval.RowScorer(model, tokenizer.bos_id, tokens_per_device=4096).score(rows, starts, ends)
    assert abs(small - big).max() < 1e-5


# ----------------------------------------------------------------------------------------------------------------
# Prompt rendering (nanochat/core_eval.py render_prompts_mc, render_prompts_schema, render_prompts_lm)


def test_model_on_mesh_gives_the_backend_its_mesh():
    """Evaluation's model names the mesh its rows are split over (splash attention's shard_map on TPU needs it; the
    jitted scoring has no mesh in context), and the caller's model is left as it was."""
    from flax import nnx

    from jaxchat.model.gpt import GPT, GPTConfig
    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=1, n_kv_head=1, n_embd=16),
                rngs=nnx.Rngs(0))
    graphdef, state, mesh = core_eval.model_on_mesh(model)
    assert nnx.merge(graphdef, state).backend.mesh == mesh.abstract_mesh and model.backend.mesh is None


def test_render_mc_fewshot_answer_delimiter():
    fewshot = [{"query": "Q1?", "choices": ["a1", "b1"], "gold": 1}, {"query": "Q2?", "choices": ["a2"], "gold": 0}]
    item = {"query": "Q3?", "choices": ["x", "y"], "gold": 0}
    assert core_eval.render_prompts_mc(item, "\nAnswer: ", fewshot) == [
        "Q1?\nAnswer: b1\n\nQ2?\nAnswer: a2\n\nQ3?\nAnswer: x", "Q1?\nAnswer: b1\n\nQ2?\nAnswer: a2\n\nQ3?\nAnswer: y"]
    assert core_eval.render_prompts_mc(item, " ", []) == ["Q3? x", "Q3? y"]


def test_render_schema_fewshot_space_delimiter():
    fewshot = [{"context_options": ["A did it", "B did it"], "continuation": "because.", "gold": 1}]
    item = {"context_options": ["X ran", "Y ran"], "continuation": "away.", "gold": 0}
    assert core_eval.render_prompts_schema(item, " ", fewshot) == [
        "B did it because.\n\nX ran away.", "B did it because.\n\nY ran away."]
    assert core_eval.render_prompts_schema(item, "\nAnswer: ", []) == ["X ran\nAnswer: away.", "Y ran\nAnswer: away."]


def test_render_lm_trims_contexts_and_strips_prefix():
    fewshot = [{"context": "  Count: one two \n", "continuation": "three"}]
    item = {"context": "Count: five six ", "continuation": "seven"}
    # A space delimiter: the prompt without the continuation loses its trailing space.
    assert core_eval.render_prompts_lm(item, " ", fewshot) == [
        "Count: one two three\n\nCount: five six", "Count: one two three\n\nCount: five six seven"]
    # "\nAnswer: " ends in a space too; strip() removes it, and leading whitespace of the first few-shot context.
    assert core_eval.render_prompts_lm(item, "\nAnswer: ", []) == [
        "Count: five six\nAnswer:", "Count: five six\nAnswer: seven"]


def test_default_delimiter_and_baselines_from_bundle():
    tasks = {t.label: t for t in core_eval.load_tasks(str(fixture_dir() / "eval_bundle"))}
    assert tasks["count"].continuation_delimiter == " "  # no continuation_delimiter in core.yaml
    assert tasks["color_qa"].continuation_delimiter == "\nAnswer: "
    assert tasks["arith"].num_fewshot == 3 and tasks["arith"].task_type == "multiple_choice"
    assert tasks["pronoun"].random_baseline == 50.0 and tasks["pronoun"].task_type == "schema"


def test_fewshot_sampling_and_common_lengths():
    assert core_eval.fewshot_indices(3, 10, 0) == []
    picked = core_eval.fewshot_indices(3, 10, 4)
    assert picked == random.Random(1237).sample([0, 1, 2, 4, 5, 6, 7, 8, 9], 4) and 3 not in picked
    assert core_eval.common_length([[1, 2, 3], [1, 2, 4, 5]], "left") == 2
    assert core_eval.common_length([[9, 2, 3], [1, 7, 2, 3]], "right") == 2
    assert core_eval.common_length([[1, 2], [1, 2, 3]], "left") == 2


def test_shuffle_then_cut():
    bundle = str(fixture_dir() / "eval_bundle")
    task = core_eval.load_tasks(bundle)[0]
    full = core_eval.load_task_data(bundle, task, -1)
    assert core_eval.load_task_data(bundle, task, 5) == full[:5]
    lines = (fixture_dir() / "eval_bundle" / "eval_data" / task.dataset_uri).read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    random.Random(1337).shuffle(rows)
    assert full == rows


def test_buckets():
    assert core_eval.length_buckets(1280)[:8] == [64, 128, 192, 256, 384, 512, 768, 1024]
    assert core_eval.length_buckets(1280)[-1] == 1280
    assert core_eval.bucket_length(65, 1280) == 128 and core_eval.bucket_length(1100, 1280) == 1280
    with pytest.raises(UserError):
        core_eval.bucket_length(1281, 1280)


def test_max_per_task_below_a_tasks_fewshot_count_is_one_line():
    """nanochat #550: few-shot examples come from the task's other examples after the cut, so random.sample failed
    below num_fewshot + 1; 0 and negatives other than -1 meant 'all'. Now one line naming the smallest valid value."""
    bundle = str(fixture_dir() / "eval_bundle")
    tasks = core_eval.load_tasks(bundle)  # arith is 3-shot: 4 examples at least
    for value, reason in [(3, "leaves task arith too few examples to draw its 3-shot prompts from"),
                          (0, "is not a number of examples"), (-5, "is not a number of examples")]:
        with pytest.raises(UserError) as e:
            core_eval.check_max_per_task(tasks, value, "--max-per-task")
        assert str(e.value) == f"--max-per-task={value} {reason}: use --max-per-task=4 or more, or -1 for all"
    for value in (-1, 4):
        core_eval.check_max_per_task(tasks, value, "--max-per-task")
    # every caller of evaluate_core too, before any task is scored (no model is needed to get there)
    with pytest.raises(UserError, match="max_per_task=2 leaves task arith"):
        core_eval.evaluate_core(None, None, bundle, max_per_task=2)


def test_duplicate_labels_and_too_few_examples_are_one_line(tmp_path):
    """Results are keyed by label: a repeated label dropped a task from CORE's average; a task file with no more
    examples than its shots cannot build a prompt."""
    (tmp_path / "eval_data").mkdir()
    task = "- label: {}\n  dataset_uri: t.jsonl\n  num_fewshot: [{}]\n  icl_task_type: language_modeling\n"
    (tmp_path / "eval_meta_data.csv").write_text("Eval Task,Random baseline\nt,0\nu,0\n")
    (tmp_path / "eval_data" / "t.jsonl").write_text('{"context": "a", "continuation": "b"}\n' * 2)
    labels = [("t", 0), ("u", 0), ("t", 1)]
    (tmp_path / "core.yaml").write_text("icl_tasks:\n" + "".join(task.format(*t) for t in labels))
    with pytest.raises(UserError, match=r"core\.yaml: tasks 0 and 2 are both labelled 't'; give each task its own"):
        core_eval.load_tasks(str(tmp_path))
    (tmp_path / "core.yaml").write_text("icl_tasks:\n" + task.format("t", 2))
    with pytest.raises(UserError, match=r"task t: .*t\.jsonl holds 2 example\(s\), too few for 2-shot prompts"):
        core_eval.check_bundle(str(tmp_path))


# ----------------------------------------------------------------------------------------------------------------
# The command line


def _run_cli(args: list[str], base: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAXCHAT_BASE_DIR=str(base), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device is enough, and starts faster
    return subprocess.run([sys.executable, "-m", "jaxchat.base_eval", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.slow
@pytest.mark.entry
def test_base_eval_json_end_to_end(tmp_path):
    root = fixture_dir()
    out = tmp_path / "results" / "core.json"  # a folder not there yet: checked at start-up, created at the end
    proc = _run_cli(["--nanochat-checkpoint", str(root / "model.npz"), "--tokenizer-dir", str(root / "tokenizer"),
                     "--bundle", str(root / "eval_bundle"), "--eval", "core", "--max-per-task", "8",
                     "--json", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got, expected = json.loads(out.read_text()), json.loads((root / "expected.json").read_text())["runs"]["8"]
    assert got["core"] == pytest.approx(expected["core"], abs=1e-12)
    assert {k: v["correct"] for k, v in got["tasks"].items()} == {k: v["correct"] for k, v in expected["tasks"].items()}
    assert "Evaluating: arith (3-shot, type: multiple_choice)... accuracy: 0.6250 | centered: 0.5000" in proc.stdout
    csv_text = (tmp_path / "base_eval" / "model.csv").read_text().splitlines()
    assert csv_text[0].split(",")[0].strip() == "Task" and csv_text[-1].startswith("CORE")
    assert len(csv_text) == 2 + len(expected["tasks"])


def test_base_eval_max_per_task_below_fewshot_is_one_line_before_loading(tmp_path):
    """In process (a UserError is one line and exit code 2 in every command: cli.run); bfloat16 leaves this
    process's matmul precision alone."""
    from jaxchat import base_eval
    args = ["--nanochat-checkpoint", str(tmp_path / "never_read.npz"), "--bundle", str(fixture_dir() / "eval_bundle"),
            "--dtype", "bfloat16"]
    for value in ("3", "0"):  # the model file is never opened: checked first
        with pytest.raises(UserError, match=f"--max-per-task={value} .*: use --max-per-task=4 or more, or -1 for all"):
            base_eval.main([*args, "--max-per-task", value])


# ----------------------------------------------------------------------------------------------------------------
# Two processes (2 CPU devices each): the batches are split over all 4 devices, every process gets every result

_WORKER = """
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax
try:  # cross-process collectives on CPU (the default in newer jax)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
except AttributeError:
    pass
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from jaxchat.interop.convert import read_reference_npz
from jaxchat.eval.core_eval import evaluate_core
from jaxchat.interop.convert import model_from_reference
from jaxchat.data.tokenizer import Tokenizer
root = sys.argv[3]
config, state, _ = read_reference_npz(root + "/model.npz")
r = evaluate_core(model_from_reference(config, state), Tokenizer.load(root + "/tokenizer"), root + "/eval_bundle",
                  max_per_task=8)
print("RESULT", json.dumps({"devices": jax.device_count(), "core": r["core"],
                            "correct": {k: v["correct"] for k, v in r["tasks"].items()}}))
"""


@pytest.mark.slow
def test_two_processes_agree_with_reference(tmp_path):
    import socket

    root = fixture_dir()
    with socket.socket() as s:
        s.bind(("localhost", 0))
        address = f"localhost:{s.getsockname()[1]}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAXCHAT_BASE_DIR=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, address, str(i), str(root)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        if p.returncode and "gloo" in err.lower() and "RESULT" not in out:
            pytest.skip(f"multi-process CPU collectives unavailable: {err.strip().splitlines()[-1]}")
        assert p.returncode == 0, err[-2000:]
    expected = json.loads((root / "expected.json").read_text())["runs"]["8"]
    for out, _ in outputs:
        got = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT"))[len("RESULT "):])
        assert got["devices"] == 4
        assert got["core"] == pytest.approx(expected["core"], abs=1e-12)
        assert got["correct"] == {k: v["correct"] for k, v in expected["tasks"].items()}


@pytest.mark.slow
@pytest.mark.entry
@pytest.mark.parametrize("delay", [0.5, 1.0])
def test_ctrl_c_during_core_is_one_line_and_130_never_a_crash(tmp_path, delay):
    """Ctrl-C while base_eval's CORE compiles or runs its second task: "interrupted by SIGINT", then a segmentation
    fault (rc 139) as the interpreter was torn down under XLA's threads. cli.run now leaves at once with 130."""
    import signal
    import time

    root = fixture_dir()
    env = dict(os.environ, JAXCHAT_BASE_DIR=str(tmp_path), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen([sys.executable, "-m", "jaxchat.base_eval", "--nanochat-checkpoint",
                             str(root / "model.npz"), "--tokenizer-dir", str(root / "tokenizer"), "--bundle",
                             str(root / "eval_bundle"), "--eval=core", "--compile-cache=off"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen = ""
    while "Evaluating: arith" not in seen and (ch := proc.stdout.read(1)):
        seen += ch
    assert "Evaluating: arith" in seen, seen
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err == "interrupted by SIGINT: exiting\n", (proc.returncode, err[-2000:])


def test_base_eval_reads_every_task_file_at_start_up_and_restores_the_bundle_given(tmp_path):
    """A task file too short for its shots was found when its turn came (after the others had run), and the advice
    fetched the bundle to $JAXCHAT_BASE_DIR/eval_bundle, not the --bundle given. base_eval now checks the bundle as
    training does (core_eval.check_bundle), before the model is opened, and the fix names --dest."""
    import shutil

    from jaxchat import base_eval

    bundle = tmp_path / "my_bundle"
    shutil.copytree(fixture_dir() / "eval_bundle", bundle)
    color = bundle / "eval_data" / "reading_comprehension" / "color.jsonl"  # the last task, 1-shot
    color.write_text(color.read_text().splitlines()[0] + "\n")
    with pytest.raises(UserError, match=rf"^task color_qa: {color} holds 1 example\(s\), too few for 1-shot prompts; "
                                        rf"restore the bundle with `rm -r {bundle} && python -m jaxchat.core_eval "
                                        rf"--download --dest {bundle}`$"):
        base_eval.main(["--nanochat-checkpoint", str(tmp_path / "never_read.npz"), "--bundle", str(bundle),
                        "--dtype", "bfloat16", "--eval=core"])
