"""Bad command lines and configs: each is one line that says what to do (a UserError, exit code 2), never a traceback."""

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import TINY_RUN
from jaxchat.runtime.common import UserError

TINY = TINY_RUN + ["--num-iterations=2", "--eval-every=-1"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A base dir with the demo corpus, its tokenizer and a 2-step checkpoint of the TINY model (tag 'tiny'). Once
    per module and about 15 s, so the tests that only read it are in the fast tier; those that train or start
    processes themselves are marked slow."""
    from jaxchat.train import train
    path = tmp_path_factory.mktemp("bad_input")
    old = os.environ.get("JAXCHAT_BASE_DIR")
    os.environ["JAXCHAT_BASE_DIR"] = str(path)
    train(TINY + ["--model-tag=tiny"])
    # A "fineweb-edu" directory with shards but no tokenizer, and a demo tokenizer of another vocabulary size.
    shutil.copytree(path / "base_data_demo", path / "base_data")
    shards = sorted((path / "base_data").glob("*.parquet"))
    shards[-1].rename(path / "base_data" / "shard_01822.parquet")
    from jaxchat.data.tok_train import train_tokenizer
    train_tokenizer(source="demo", vocab_size=1024, max_chars=300_000, doc_cap=10_000, out_dir=str(path / "tok1024"))
    yield path
    if old is None:
        del os.environ["JAXCHAT_BASE_DIR"]
    else:
        os.environ["JAXCHAT_BASE_DIR"] = old


CASES = [
    (["--depth=0"], "--depth=0 is out of range: use >= 1"),
    (["--depth=-4"], "--depth=-4 is out of range: use >= 1"),
    (["--depth=7"], "--depth=7 is odd"),
    (["--depth=abc"], "expected int"),
    (["--device-batch-size=3"], "use --device-batch-size in [1, 2]"),
    (["--device-batch-size=-2"], "--device-batch-size=-2 is out of range: use >= 0 (0 or 'auto' = largest that fits)"),
    (["--total-batch-size=1000"], "make --total-batch-size a multiple of"),
    (["--bogus=1"], "unrecognized arguments: --bogus=1"),
    (["--config=configs/missing.py"], "no such file"),
    (["--config.nope=1"], "unknown key"),
    (["--data=imagenet"], "choose fineweb-edu, climbmix or demo"),
    (["--data=climbmix"], "python -m jaxchat.dataset"),
    (["--data=fineweb-edu"], "python -m jaxchat.tok_train"),
    (["--fsdp=3"], "--fsdp=3 does not divide the 8 devices"),
    (["--model-tag=tiny", "--resume-from-step=99"], "no checkpoint for step 99"),
    (["--model-tag=none", "--resume-from-step=1"], "no checkpoint in"),
    (["--model-tag=tiny", "--resume-from-step=2", "--depth=4"], "saved 2, now 4"),
    (["--model-tag=tiny", "--resume-from-step=2", "--max-seq-len=32"], "sequence_len: saved 64, now 32"),
    (["--window-pattern=SXL"], "must use only the letters S and L"),
    (["--warmup-ratio=0.7", "--warmdown-ratio=0.5"], "exceeds 1"),
    (["--num-iterations=-1", "--target-param-data-ratio=-1"], "no training horizon"),
    (["--compute-dtype=fp8"], "choose bfloat16 or float32"),
    (["--resume-from-step=soon"], "step number or 'last'"),
    (["--core-metric-every=100"], "python -m jaxchat.core_eval --download"),
    (["--eval-tokens=0"], "--eval-tokens=0 is out of range: use >= 1"),
    (["--max-seq-len=63"], "--max-seq-len=63 is out of range: use >= 2 (even)"),
    (["--log-every=0"], "--log-every=0 is out of range: use >= 1"),
    (["--keep-last=-3"], "--keep-last=-3 is out of range: use >= 1"),
    (["--save-every-minutes=-2"], "--save-every-minutes=-2.0 is out of range: use -1 or > 0"),
    (["--eval-every=0"], "use -1 or >= 1 (-1 = off)"),
    (["--model-tag=tiny", "--resume-from-step=2", "--total-batch-size=2048"],
     "total_batch_size: saved 1024, now 2048"),
    # A horizon shorter than the checkpoint: the loop would never meet its end (and the LR would go negative).
    (["--model-tag=tiny", "--resume-from-step=last", "--num-iterations=1"], "checkpoint step 2 of tiny is past this "
     "run's horizon of 1 steps (from --num-iterations): to train on, resume with a horizon of more than 2 steps "
     "(--num-iterations=3 or more)"),
    (["--model-tag=tiny", "--resume-from-step=2", "--num-iterations=-1", "--target-flops=3e9"],
     "past this run's horizon of 1 steps (from --target-flops)"),
    (["--num-iterations=-1", "--target-flops=1e6"], "--target-flops=1e+06 trains 0 steps"),
    (["--num-iterations=-1", "--target-param-data-ratio=0.001"], "--target-param-data-ratio=0.001 trains 0 steps"),
    (["--config=configs/demo.py", "--config=configs/cpu.py"], "--config given twice"),
]


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_is_one_clear_line(base_dir, argv, message):
    from jaxchat.train import train
    with pytest.raises(UserError) as e:
        train(TINY + argv)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_checkpoint_at_the_horizon_finishes_at_once(base_dir, capsys):
    """A checkpoint at this run's last step is a finished run: no error, the loop goes straight to the final
    evaluation (one past it is refused: CASES)."""
    from jaxchat.train import check_horizon
    from jaxchat.training.build import run_plan
    from jaxchat.training.config import parse_flags
    c = parse_flags(TINY + ["--model-tag=tiny"])
    check_horizon(c, 2, run_plan(c, 4096, device_batch_size=1), [1, 2])
    assert ("Checkpoint step 2 is this run's horizon (2 steps, from --num-iterations): nothing left to train; running "
            "the final evaluation") in capsys.readouterr().out
    # One past it: the advice names the checkpoints at or before the horizon that exist (or says there are none).
    with pytest.raises(UserError, match=r"past this run's horizon of 2 steps .* --resume-from-step=N, N in \[1, 2\]"):
        check_horizon(c, 3, run_plan(c, 4096, device_batch_size=1), [1, 2, 3])
    with pytest.raises(UserError, match=r"train a new --model-tag \(no checkpoint at or before step 2\)"):
        check_horizon(c, 3, run_plan(c, 4096, device_batch_size=1), [3])


def test_checkpoint_with_another_tokenizer_vocabulary(base_dir):
    from jaxchat.train import train
    tok_dir = base_dir / "tokenizer_demo"
    shutil.move(tok_dir, base_dir / "tokenizer_demo_4096")
    shutil.copytree(base_dir / "tok1024", tok_dir)
    try:
        # the tokenizer is named first: it is what explains the vocabulary that differs
        with pytest.raises(UserError, match=r"checkpoint step 2 of tiny was trained with tokenizer [0-9a-f]{16}, but "
                                            r"\S*tokenizer_demo holds [0-9a-f]{16}"):
            train(TINY + ["--model-tag=tiny", "--resume-from-step=2"])
    finally:
        shutil.rmtree(tok_dir)
        shutil.move(base_dir / "tokenizer_demo_4096", tok_dir)


REPO = Path(__file__).resolve().parents[1]
# Each command's refusals as commands, one process each: exit code 2 and one line "error: ..." on stderr, no traceback
# (cli.run), from each place a command refuses its input. {command: [(id, base, argv, message)]}; base: "tiny"
# (this module's base dir: checkpoint tiny, fineweb-edu shards without a tokenizer) or "empty"; in argv {core} is the
# shared CORE fixture (tests/test_core_eval.py). In-process tests check each refusal's wording; these, that a command
# turns it into exit code 2 and one line.
COMMANDS = {
    "train": [
        ("odd-depth", "tiny", [*TINY, "--depth=7"], "--depth=7 is odd"),
        ("zero-depth", "empty", [*TINY, "--depth=0"], "--depth=0 is out of range: use >= 1"),
        ("device-batch", "empty", [*TINY, "--device-batch-size=3"], "use --device-batch-size in"),
        ("unknown-flag", "empty", [*TINY, "--bogus-flag=1"], "unrecognized arguments"),
        ("no-shards", "empty", [*TINY, "--data=fineweb-edu"], "python -m jaxchat.dataset"),
        ("no-tokenizer", "tiny", [*TINY, "--data=fineweb-edu"], "python -m jaxchat.tok_train"),
        ("resume-other-depth", "tiny", [*TINY, "--model-tag=tiny", "--resume-from-step=2", "--depth=4"],
         "saved 2, now 4"),
        ("resume-past-horizon", "tiny", [*TINY, "--model-tag=tiny", "--resume-from-step=last", "--num-iterations=1"],
         "past this run's horizon of 1 steps"),
        ("huge-max-seq-len", "empty", ["--config=configs/demo.py", "--eval-every=-1", "--sample-every=-1",
                                       "--max-seq-len=1048576", "--total-batch-size=1048576", "--device-batch-size=1",
                                       "--memory-budget-gb=64"], "--max-seq-len=1048576 cannot fit"),
    ],
    "base_eval": [
        ("model-tag-outside", "empty", ["--model-tag=../x", "--eval=bpb"], "plain folder name"),
        ("no-checkpoint", "empty", ["--model-tag", "d4", "--bundle", "{core}/eval_bundle"], "no checkpoint"),
        ("missing-bundle", "empty", ["--nanochat-checkpoint", "{core}/model.npz", "--tokenizer-dir", "{core}/tokenizer",
                                     "--bundle", "no_bundle"], "python -m jaxchat.core_eval --download"),
    ],
    "export": [
        ("no-checkpoint", "empty", ["--model-tag=nope", "--to=/tmp/x"], "no checkpoint in"),
        ("no-model-tag", "empty", ["--to=/tmp/x"], "--model-tag"),
        ("world-size", "tiny", ["--model-tag=tiny", "--to=/tmp/x", "--world-size=0"], "--world-size=0"),
    ],
}


@pytest.mark.slow
@pytest.mark.entry
@pytest.mark.parametrize("command, base, argv, message", [(c, *case[1:]) for c, cases in COMMANDS.items()
                                                          for case in cases],
                         ids=[f"{c}-{case[0]}" for c, cases in COMMANDS.items() for case in cases])
def test_commands_refuse_bad_input_with_exit_2_and_one_line(request, tmp_path, command, base, argv, message):
    if command == "export" and not importlib.util.find_spec("torch"):
        pytest.skip("jaxchat.export needs PyTorch: pip install -e '.[torch]'")
    root = request.getfixturevalue("base_dir") if base == "tiny" else tmp_path / "empty"
    core = str(request.getfixturevalue("core_fixture")) if any("{core}" in a for a in argv) else ""
    env = dict(os.environ, JAXCHAT_BASE_DIR=str(root), JAX_PLATFORMS="cpu")
    if command != "train" or "--max-seq-len=1048576" in argv:
        env["XLA_FLAGS"] = ""  # one CPU device starts faster; the memory check, not the batch's split, refuses that one
    proc = subprocess.run([sys.executable, "-m", f"jaxchat.{command}", *(a.replace("{core}", core) for a in argv)],
                          capture_output=True, text=True, env=env, cwd=tmp_path if command != "train" else REPO,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    if command == "base_eval":  # a failed look-up leaves no empty folder
        assert not (root / "base_checkpoints").exists()


@pytest.fixture
def core_fixture():
    """The shared CORE fixture's folder (a small bundle, its model and tokenizer), or skip."""
    from conftest import shared_fixture
    return shared_fixture("core_small/expected.json").parent


def test_corrupt_shard_names_the_file(base_dir, tmp_path, monkeypatch):
    from jaxchat.train import train
    shutil.copytree(base_dir / "base_data", tmp_path / "base_data")  # fineweb-edu layout (the demo would rebuild)
    shutil.copytree(base_dir / "tokenizer_demo", tmp_path / "tokenizer")
    shard = sorted((tmp_path / "base_data").iterdir())[0]
    shard.write_bytes(shard.read_bytes()[:1000])  # a download cut short
    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(UserError) as e:
        train(TINY + ["--data=fineweb-edu", "--model-tag=shard"])
    assert shard.name in str(e.value) and "\n" not in str(e.value)


def test_corrupt_tokenizer_names_the_file(base_dir, tmp_path, monkeypatch):
    from jaxchat.train import train
    shutil.copytree(base_dir / "base_data_demo", tmp_path / "base_data_demo")
    (tmp_path / "tokenizer_demo").mkdir()
    (tmp_path / "tokenizer_demo" / "tokenizer.pkl").write_bytes(b"\x80\x04garbage")
    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(UserError, match=r"tokenizer\.pkl.*python -m jaxchat\.tok_train --demo"):
        train(TINY + ["--model-tag=tok"])


# ----------------------------------------------------------------------------------------------------------------
# Inputs checked at start-up: config files, the directories a run writes, shards, the CORE bundle, the tokenizer


@pytest.mark.parametrize("body, message", [
    ("def get_config(:\n    pass\n", "line 1: SyntaxError"),
    ("def get_config():\n    return None\n", "get_config() returned NoneType"),
    ("def get_config():\n    return dict(depth=4.5)\n", "depth=4.5 must be int"),
    ("def get_config():\n    return dict(run=3)\n", "run=3 must be str"),
    # sys.exit(0) in the file ended the command with code 0 and nothing trained
    ("import sys\nsys.exit(0)\n", "line 2: SystemExit: sys.exit(0) while it was read"),
    ("import sys\ndef get_config():\n    sys.exit(3)\n", "line 3: SystemExit: sys.exit(3)"),
], ids=["syntax", "none", "float-depth", "int-run", "exit-at-import", "exit-in-get-config"])
def test_config_file_errors_name_the_file(tmp_path, body, message):
    from jaxchat.training.config import parse_flags
    path = tmp_path / "my_config.py"
    path.write_text(body)
    with pytest.raises(UserError) as e:
        parse_flags([f"--config={path}"])
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_every_numeric_flag_has_a_documented_range():
    """Every numeric flag has a range; its default is inside it, its --help line states it, and a value just past
    either end is refused in one line naming the flag."""
    from jaxchat.training.config import RANGES, check_ranges, defaults, make_parser, parse_flags, range_text
    c = defaults()
    numeric = {k for k, v in c.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numeric == set(RANGES)
    check_ranges(c)  # every default inside its range
    helps = {a.dest: a.help for a in make_parser(c)._actions}
    for key, (lo, hi, _) in RANGES.items():
        assert f"[{range_text(key)}] (default: " in helps[key], (key, helps[key])
        flag = "--" + key.replace("_", "-")
        for outside in (lo - 1, None if hi is None else hi + 1):
            if outside is not None:
                with pytest.raises(UserError, match=f"{flag}[ =]") as e:
                    parse_flags([f"{flag}={outside}"])
                assert "\n" not in str(e.value)


def _mount_tmpfs(path: Path, size: str) -> None:
    """A small tmpfs at path (root only): a real full or read-only file system; the test is skipped without one."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()[:80]}): needs root")


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_unwritable_directories_fail_before_compiling(base_dir, tmp_path, monkeypatch):
    from jaxchat.train import train
    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(tmp_path / "a_file"))
    (tmp_path / "a_file").write_text("not a directory")
    with pytest.raises(UserError, match="cannot use .*a_file as the base directory"):
        train(TINY + ["--model-tag=x"])
    ro = tmp_path / "ro"
    _mount_tmpfs(ro, "1m")
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        monkeypatch.setenv("JAXCHAT_BASE_DIR", str(ro))
        with pytest.raises(UserError, match="cannot write to the base directory .*Read-only file system"):
            train(TINY + ["--model-tag=x"])
        # A writable base dir whose checkpoint folder is on read-only storage: refused at start-up, not at a save.
        monkeypatch.setenv("JAXCHAT_BASE_DIR", str(base_dir))
        link = base_dir / "base_checkpoints" / "readonly"
        link.symlink_to(ro)
        try:
            with pytest.raises(UserError, match="cannot write to the checkpoint directory .*Read-only"):
                train(TINY + ["--model-tag=readonly"])
        finally:
            link.unlink()
    finally:
        _umount(ro)


def _fineweb_layout(base_dir: Path, tmp_path: Path) -> Path:
    shutil.copytree(base_dir / "base_data", tmp_path / "base_data")  # fineweb-edu layout (the demo would rebuild)
    shutil.copytree(base_dir / "tokenizer_demo", tmp_path / "tokenizer")
    return tmp_path / "base_data"


def _invalid_utf8_table():
    offsets = pa.py_buffer(bytes([0, 0, 0, 0, 5, 0, 0, 0]))
    return pa.table({"text": pa.Array.from_buffers(pa.string(), 1, [None, offsets, pa.py_buffer(b"ok\xff\xfe!")])})


@pytest.mark.parametrize("case", ["int-text", "invalid-utf8-val", "all-train-empty"])
def test_bad_shards_name_the_file(base_dir, tmp_path, monkeypatch, case):
    from jaxchat.train import train
    data = _fineweb_layout(base_dir, tmp_path)
    shards = sorted(data.glob("*.parquet"))
    if case == "int-text":
        bad = shards[0]
        pq.write_table(pa.table({"text": pa.array([1, 2, 3])}), bad)
        message = f"{bad.name} (TypeError: column 'text' holds int64"
    elif case == "invalid-utf8-val":
        bad = data / "shard_01822.parquet"
        pq.write_table(_invalid_utf8_table(), bad)
        message = f"{bad.name} (ArrowInvalid"
    else:
        for shard in shards[:-1]:
            pq.write_table(pa.table({"text": pa.array([], pa.string())}), shard)
        message = "hold 0 document(s)"
    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(UserError) as e:
        train(TINY + ["--data=fineweb-edu", "--model-tag=shard"])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_invalid_utf8_while_training_names_the_file(base_dir, tmp_path):
    from jaxchat.data.dataloader import DataLoader
    from jaxchat.data.tokenizer import Tokenizer
    path = tmp_path / "shard_00000.parquet"
    pq.write_table(_invalid_utf8_table(), path)
    loader = DataLoader(Tokenizer.load(str(base_dir / "tokenizer_demo")), [str(path)], 1, 16, rank=0, world_size=1)
    with pytest.raises(UserError, match=f"cannot read shard {path} \\(UnicodeDecodeError"):
        next(loader)


def write_bundle(root: Path, core_yaml: str, tasks: dict[str, str]) -> Path:
    """A small CORE bundle: core.yaml as given, a baseline row per task, eval_data/<file> contents."""
    (root / "eval_data").mkdir(parents=True)
    (root / "core.yaml").write_text(core_yaml)
    (root / "eval_meta_data.csv").write_text("Eval Task,Random baseline\nlm,0\n")
    for name, text in tasks.items():
        (root / "eval_data" / name).write_text(text)
    return root


LM_TASK = "icl_tasks:\n- label: lm\n  dataset_uri: lm.jsonl\n  num_fewshot: [0]\n  icl_task_type: language_modeling\n"


@pytest.mark.parametrize("core_yaml, tasks, message", [
    ("icl_tasks: [unclosed\n", {}, "core.yaml / eval_meta_data.csv"),
    ("", {}, "lists no tasks"),
    ("icl_tasks: []\n", {}, "lists no tasks"),
    ("icl_tasks:\n- label: lm\n", {}, "task 0 is malformed (KeyError"),
    (LM_TASK, {}, "task lm: cannot read"),
    (LM_TASK, {"lm.jsonl": "{not json\n"}, "task lm: cannot read"),
], ids=["yaml-syntax", "empty", "no-tasks", "task-keys", "missing-file", "bad-json"])
def test_broken_bundle_fails_at_start_up(base_dir, tmp_path, monkeypatch, core_yaml, tasks, message):
    from jaxchat.train import train
    shutil.copytree(base_dir / "base_data_demo", tmp_path / "base_data_demo")
    shutil.copytree(base_dir / "tokenizer_demo", tmp_path / "tokenizer_demo")
    write_bundle(tmp_path / "eval_bundle", core_yaml, tasks)
    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(UserError) as e:
        train(TINY + ["--core-metric-every=1", "--model-tag=core"])
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "base_checkpoints" / "core").exists()  # refused before anything was written


def test_core_settings_checked_against_the_bundle_at_start_up(base_dir, tmp_path, monkeypatch):
    """--core-metric-max-per-task below a task's few-shot count (nanochat #550) and repeated task labels: one line
    before compiling, not at the first CORE step hours in."""
    from jaxchat.train import train
    shutil.copytree(base_dir / "base_data_demo", tmp_path / "base_data_demo")
    shutil.copytree(base_dir / "tokenizer_demo", tmp_path / "tokenizer_demo")
    three_shot = LM_TASK.replace("num_fewshot: [0]", "num_fewshot: [3]")
    examples = '{"context": "a", "continuation": "b"}\n' * 5
    bundle = write_bundle(tmp_path / "eval_bundle", three_shot, {"lm.jsonl": examples})
    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(tmp_path))
    run = TINY + ["--core-metric-every=1", "--model-tag=core"]
    for value, message in [("3", "--core-metric-max-per-task=3 leaves task lm too few examples to draw its 3-shot "
                                 "prompts from: use --core-metric-max-per-task=4 or more, or -1 for all"),
                           ("0", "--core-metric-max-per-task=0 is out of range: use -1 or >= 1 (-1 = all; more than "
                                 "any CORE task's few-shot count)")]:
        with pytest.raises(UserError) as e:
            train(run + [f"--core-metric-max-per-task={value}"])
        assert str(e.value) == message
    (bundle / "core.yaml").write_text(LM_TASK + LM_TASK.replace("icl_tasks:\n", ""))
    with pytest.raises(UserError, match=r"tasks 0 and 1 are both labelled 'lm'"):
        train(run)
    assert not (tmp_path / "base_checkpoints" / "core").exists()  # refused before anything was written


def test_resume_with_another_tokenizer_of_the_same_size(base_dir):
    """Same vocabulary size, other tokens (a retrained tokenizer): the model fits, the recorded inputs differ."""
    from jaxchat.data.tokenizer import Tokenizer, encoding_from_ranks
    from jaxchat.train import train
    tok_dir = base_dir / "tokenizer_demo"
    enc = Tokenizer.load(str(tok_dir)).enc
    ranks = dict(enc._mergeable_ranks)
    a, b = [t for t, r in ranks.items() if r in (300, 301)]
    ranks[a], ranks[b] = ranks[b], ranks[a]
    shutil.move(tok_dir, base_dir / "tokenizer_demo_orig")
    try:
        Tokenizer(encoding_from_ranks(ranks, enc._pat_str)).save(str(tok_dir))
        with pytest.raises(UserError, match=r"trained with tokenizer [0-9a-f]{16}, but \S*tokenizer_demo holds "
                                            r"[0-9a-f]{16}.* or train a new --model-tag"):
            train(TINY + ["--model-tag=tiny", "--resume-from-step=2"])
    finally:
        shutil.rmtree(tok_dir, ignore_errors=True)
        shutil.move(base_dir / "tokenizer_demo_orig", tok_dir)


def test_retrained_tokenizer_is_refused_then_kept_and_found(base_dir):
    """tok_train over the tokenizer checkpoint 'tiny' was trained with: refused without --force; with it, the old one
    is kept as tokenizer_demo.<fingerprint>; a resume names the command that puts it back, base_eval finds and uses
    it, an explicit --tokenizer-dir of the wrong one is refused; --restore puts it back and nothing was deleted."""
    from jaxchat import base_eval
    from jaxchat.data import tok_train
    from jaxchat.data.tokenizer import Tokenizer, kept_dir, kept_fingerprints
    from jaxchat.train import train
    tok_dir = base_dir / "tokenizer_demo"
    original = Tokenizer.load(str(tok_dir)).fingerprint()
    with pytest.raises(UserError, match=rf"holds tokenizer {original}, which checkpoints were trained with \(tiny "
                                        rf"step 2\): pass --force"):
        tok_train.main(["--demo", "--vocab-size=300", "--max-chars=100000"])
    assert Tokenizer.load(str(tok_dir)).fingerprint() == original  # refused before anything was written
    kept = kept_dir(str(tok_dir), original)
    try:
        tok_train.main(["--demo", "--vocab-size=300", "--max-chars=100000", "--force"])
        retrained = Tokenizer.load(str(tok_dir))
        assert Tokenizer.load(kept).fingerprint() == original and retrained.vocab_size == 300
        with pytest.raises(UserError, match=rf"step 2 of tiny was trained with tokenizer {original}, but .* the one it "
                                            rf"needs is in {kept}: put it in place with `python -m jaxchat.tok_train "
                                            rf"--demo --restore={original}`"):
            train(TINY + ["--model-tag=tiny", "--resume-from-step=2"])
        loaded = base_eval.load_model(base_eval.parse_args(["--model-tag=tiny", "--eval=sample"]))
        assert loaded.tokenizer.directory == kept and loaded.tokenizer.fingerprint() == original
        with pytest.raises(UserError, match=f"pass --tokenizer-dir={kept}"):
            base_eval.load_model(base_eval.parse_args(["--model-tag=tiny", f"--tokenizer-dir={tok_dir}"]))
    finally:
        tok_train.main(["--demo", f"--restore={original}"])
    assert Tokenizer.load(str(tok_dir)).fingerprint() == original
    assert {original, retrained.fingerprint()} <= set(kept_fingerprints(str(tok_dir)))  # both kept, none deleted


def test_output_paths_are_checked_before_the_work(base_dir, tmp_path):
    """Every output flag (base_eval --json, export --to, tok_train --out-dir, parity --out) goes through
    common.check_output before any reading, training or evaluating: one line naming the flag."""
    from jaxchat import base_eval, parity
    from jaxchat.data import tok_train
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    bundle = write_bundle(tmp_path / "bundle", LM_TASK, {"lm.jsonl": '{"context": "a", "continuation": "b"}\n'})
    eval_argv = ["--model-tag=tiny", "--eval=core", f"--bundle={bundle}"]
    cases = [
        (base_eval.main, eval_argv + [f"--json={a_file}/x.json"], f"cannot write --json {a_file}/x.json: {a_file} is a "
                                                                  f"file, not a directory"),
        (base_eval.main, eval_argv + [f"--json={tmp_path}"], f"--json {tmp_path} is a directory: give a file name"),
        (tok_train.main, ["--demo", f"--out-dir={a_file}"], f"--out-dir {a_file} is a file, not a directory"),
        (parity.main, [str(a_file), "--out", str(tmp_path)], f"--out {tmp_path} is a directory"),
    ]
    if importlib.util.find_spec("torch"):
        from jaxchat import export
        cases.append((export.export, ["--model-tag=tiny", f"--to={a_file}"], f"--to {a_file} is a file, not a "
                                                                              f"directory: choose another --to"))
    for main, argv, message in cases:
        with pytest.raises(UserError) as e:
            main(argv)
        assert message in str(e.value) and "\n" not in str(e.value), (argv, str(e.value))
    assert not (base_dir / "base_eval").exists()  # refused before the evaluation
def test_resume_on_changed_train_shards(base_dir, tmp_path, monkeypatch):
    """A train shard rewritten or removed since the checkpoint: one line naming it and the flag, before compiling
    (the loader state names its shards; tests/test_dataloader.py checks the resume that the flag accepts)."""
    from jaxchat.train import train
    shutil.copytree(base_dir / "base_data_demo", tmp_path / "base_data_demo")
    shutil.copytree(base_dir / "tokenizer_demo", tmp_path / "tokenizer_demo")
    shutil.copytree(base_dir / "base_checkpoints" / "tiny", tmp_path / "base_checkpoints" / "tiny")
    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(tmp_path))
    data = tmp_path / "base_data_demo"
    (data / "shard_00001.parquet").write_bytes((data / "shard_00000.parquet").read_bytes())  # other documents
    resume = TINY + ["--model-tag=tiny", "--resume-from-step=2"]
    with pytest.raises(UserError) as e:
        train(resume)
    assert "since checkpoint step 2 of tiny was saved (other content: shard_00001.parquet (size " in str(e.value)
    assert "--allow-data-change=true" in str(e.value) and "\n" not in str(e.value)
    (data / "shard_00000.parquet").unlink()  # the shard the checkpoint was reading
    with pytest.raises(UserError, match=r"removed: shard_00000\.parquet; other content: shard_00001"):
        train(resume)
    assert sorted(p.name for p in (tmp_path / "base_checkpoints" / "tiny").iterdir()) == ["2"]  # nothing moved


# ----------------------------------------------------------------------------------------------------------------
# The checkpoint directory: one writer, stale locks, incomplete step folders, full disks


def test_second_run_on_the_same_tag_refuses(base_dir):
    from jaxchat.runtime.checkpoint import Checkpointer
    from jaxchat.train import train
    ckpt = base_dir / "base_checkpoints" / "tiny"
    other = subprocess.Popen(["sleep", "60"])  # a live process on this host holds the lock
    (ckpt / ".lock").write_text(json.dumps(dict(host=socket.gethostname(), pid=other.pid, started="earlier")))
    try:
        with pytest.raises(UserError, match=f"another run \\(pid {other.pid} on .*use another --model-tag"):
            train(TINY + ["--model-tag=tiny", "--resume-from-step=2"])
        assert (ckpt / ".lock").exists()  # still theirs
    finally:
        other.kill()
        other.wait()
        (ckpt / ".lock").unlink()
    assert Checkpointer(str(ckpt)).steps() == [2]


@pytest.mark.slow
def test_full_disk_during_a_save_is_one_line(base_dir, tmp_path, capsys):
    """A checkpoint folder on a 16 MiB file system: the first save(s) fit, then one does not."""
    from jaxchat.runtime.checkpoint import Checkpointer
    from jaxchat.train import train
    mount = tmp_path / "small"
    _mount_tmpfs(mount, "16m")
    link = base_dir / "base_checkpoints" / "full"
    link.symlink_to(mount)
    try:
        with pytest.raises(UserError) as e:
            train(TINY + ["--model-tag=full", "--num-iterations=4", "--save-every=1"])
        message = str(e.value)
        match = re.match(rf"no room to save checkpoint step (\d) in {link}: it needs about [0-9.]+ MiB, [0-9.]+ MiB "
                         rf"free; step (\d) is the last complete checkpoint", message)
        assert match and int(match[1]) >= 2 and int(match[2]) == int(match[1]) - 1 and "\n" not in message, message
        saved = list(range(1, int(match[1])))
        out = capsys.readouterr().out
        assert [int(line.split()[3]) for line in out.splitlines() if line.startswith("Saved checkpoint")] == saved
        assert Checkpointer(str(link)).steps() == saved
        assert not [p for p in mount.iterdir() if "tmp" in p.name]
    finally:
        link.unlink()
        _umount(mount)


def test_failed_write_inside_orbax_is_one_line(tmp_path):
    """The disk fills while orbax writes (the free-space check passed): one line, no temporary folder left."""
    import jax.numpy as jnp
    import numpy as np
    from jaxchat.runtime.checkpoint import Checkpointer
    mount = tmp_path / "tiny_fs"
    _mount_tmpfs(mount, "300k")  # 256 KiB of state passes the check; orbax writes ~320 KiB
    try:
        ckpt = Checkpointer(str(mount / "ck"), lock=True)
        params = {"w": jnp.asarray(np.random.default_rng(0).random((256, 256), np.float32))}
        with pytest.raises(UserError) as e:
            ckpt.save(1, params, {"m": jnp.zeros(3)}, {"kind": "step"})
            ckpt.wait()
        assert f"no room to save checkpoint step 1 in {mount}/ck" in str(e.value) and "\n" not in str(e.value)
        assert sorted(os.listdir(mount / "ck")) == [".lock"]
        ckpt.release()
    finally:
        _umount(mount)
