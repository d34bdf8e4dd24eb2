"""Training flags: reference defaults, config files and overrides (bad input: test_bad_input.py)."""

import re

import pytest

from jaxchat.runtime.common import JAXCHAT_ONLY, UserError
from jaxchat.training.config import AUTO, FLAGS, JAXCHAT_GROUP, defaults, parse_flags, range_text


def test_reference_defaults():
    c = parse_flags([])
    assert (c.depth, c.target_param_data_ratio, c.device_batch_size, c.total_batch_size) == (20, 10.5, 32, 524288)
    assert (c.matrix_lr, c.embedding_lr, c.unembedding_lr, c.weight_decay, c.warmdown_ratio) == (0.02, 0.3, 0.004, 0.2, 0.5)
    assert (c.eval_every, c.core_metric_every, c.sample_every, c.save_every, c.run) == (250, 2000, 2000, -1, "dummy")


def test_nanochat_flags_and_config_files():
    c = parse_flags(["--depth=26", "--target-param-data-ratio=8.25", "--device-batch-size=16", "--run=my-run",
                     "--model-tag=my-model", "--sample-every=-1"])
    assert (c.depth, c.target_param_data_ratio, c.device_batch_size, c.run, c.model_tag, c.sample_every) == \
        (26, 8.25, 16, "my-run", "my-model", -1)
    c = parse_flags(["--config=configs/d26.py", "--config.device_batch_size=8"])
    assert (c.depth, c.target_param_data_ratio, c.device_batch_size) == (26, 8.25, 8)
    c = parse_flags(["--config=configs/d26.py", "--config.device_batch_size=8", "--device-batch-size=4"])
    assert c.device_batch_size == 4  # explicit flags win over the config file


def test_remat_and_window_pattern_are_checked_here_with_the_flag_named():
    with pytest.raises(UserError, match="--remat=.everything.: choose auto, none, block"):
        parse_flags(["--remat=everything"])
    with pytest.raises(UserError, match="--window-pattern='SXL' must use only the letters S and L"):
        parse_flags(["--window-pattern=SXL"])


def test_booleans_take_both_spellings():
    assert parse_flags([]).tensorboard is True and parse_flags([]).allow_odd_depth is False
    assert parse_flags(["--no-tensorboard"]).tensorboard is False
    assert parse_flags(["--tensorboard=False"]).tensorboard is False  # nanochat's spelling
    assert parse_flags(["--no-tensorboard", "--tensorboard"]).tensorboard is True  # the last one wins
    assert parse_flags(["--depth=7", "--allow-odd-depth"]).allow_odd_depth is True
    assert parse_flags(["--depth=7", "--allow-odd-depth=True"]).allow_odd_depth is True
    assert parse_flags(["--config=configs/demo.py", "--config.tensorboard=false"]).tensorboard is False


def test_device_batch_size_auto_is_memory_auto():
    assert parse_flags(["--device-batch-size=auto"]).device_batch_size == AUTO
    assert parse_flags(["--config.device_batch_size=auto"]).device_batch_size == AUTO


def test_help_describes_every_flag_in_nanochat_groups(capsys):
    with pytest.raises(SystemExit) as e:
        parse_flags(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    headings = re.findall(r"^(\S[^\n]*):$", text, re.M)
    assert headings[:9] == ["options", "config files", "logging", "runtime", "model architecture",
                            "training horizon (the first one set wins)", "optimization", "evaluation", "output"]
    assert headings[9:] and all(h.startswith(JAXCHAT_GROUP + ": ") for h in headings[9:])
    assert sorted(name for flags in FLAGS.values() for name, _, _ in flags) == sorted(defaults())
    # Each flag's entry: its option, a description and its default, in its group's section.
    sections = dict(zip(headings, re.split(r"^\S[^\n]*:$", text, flags=re.M)[1:]))
    for group, flags in FLAGS.items():
        for name, default, description in flags:
            option = "--" + name.replace("_", "-")
            entry = re.search(rf"^  {re.escape(option)}\b(.*?)(?=^  --|\Z)", sections[group], re.M | re.S)
            assert entry, (group, option)
            words = " ".join(entry.group(1).split())
            assert description.split()[0] in words and f"(default: {default!r})" in words, (option, words)
            assert (JAXCHAT_ONLY.strip() in words) == group.startswith(JAXCHAT_GROUP), (option, words)
    assert "--tensorboard, --no-tensorboard" in text and "--depth INT" in text


def test_help_shows_a_config_files_values(capsys):
    with pytest.raises(SystemExit):
        parse_flags(["--config=configs/demo.py", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ("--depth INT number of transformer layers: the one dial that sizes the model "
            f"[{range_text('depth')}] (default: 4)") in text
    assert "(default: 'demo')" in text and "(default: 'fineweb-edu')" not in text  # --data of configs/demo.py


FLOAT_FLAGS = [name for group in FLAGS.values() for name, default, _ in group if isinstance(default, float)]


@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "1e400"])
def test_every_float_flag_refuses_non_finite_numbers(text, tmp_path):
    """NaN fails every comparison, so it passed every range check (--matrix-lr=nan trained to a NaN at step 1 whose
    line blamed the LR); inf crashed int() (--target-param-data-ratio=inf). One validator, common.finite_float, for
    flags, --config.KEY and config files alike; an int flag given inf is the same line, not OverflowError."""
    assert {"matrix_lr", "target_flops", "target_param_data_ratio", "save_every_minutes",
            "memory_budget_gb"} <= set(FLOAT_FLAGS)
    for name in FLOAT_FLAGS + ["depth", "num_iterations"]:
        flag = "--" + name.replace("_", "-")
        for argv in ([f"{flag}={text}"], [f"--config.{name}={text}"]):
            with pytest.raises(UserError, match=rf"^{re.escape(argv[0].split('=')[0])}: '{text}' is not a finite "
                                                rf"number .*; use "):
                parse_flags(argv)
    config = tmp_path / "c.py"
    config.write_text(f"from ml_collections import ConfigDict\n\ndef get_config():\n"
                      f"    return ConfigDict(dict(matrix_lr=float('{text}')))\n")
    with pytest.raises(UserError, match=r"matrix_lr: .* is not a finite number"):
        parse_flags([f"--config={config}"])


@pytest.mark.parametrize("command, argv", [
    ("plan", ["--target-param-data-ratio=nan"]), ("plan", ["--target-flops=inf"]), ("plan", ["--weight-decay=-inf"]),
    ("tok_train", ["--max-chars=nan"]), ("tok_train", ["--max-chars=inf"])])
def test_other_commands_float_flags_refuse_non_finite_numbers(command, argv):
    """jaxchat.training.plan's and tok_train's own float flags go through the same validator (their argparse type), one
    line naming the flag via cli.run (exit code 2: test_bad_input.py)."""
    import importlib

    main = importlib.import_module(f"jaxchat.{command}").main
    flag = argv[0].split("=")[0]
    with pytest.raises(UserError, match=rf"^argument {flag}: '.*' is not a finite number"):
        main(argv)


def test_no_command_parses_a_float_flag_without_the_validator():
    """Every float flag of every command is parsed by common.finite_float (a new `type=float` would let NaN in)."""
    from pathlib import Path

    sources = sorted((Path(__file__).resolve().parents[1] / "jaxchat").rglob("*.py"))
    offenders = [f"{p.name}:{i}" for p in sources for i, line in enumerate(p.read_text().splitlines(), 1)
                 if re.search(r"type\s*=\s*float\b", line)]
    assert not offenders, offenders
