"""`--help` of base_eval, dataset, tok_train, tok_eval and core_eval (core_bundle): exits 0, every option described."""

import argparse
import importlib

import pytest

from jaxchat.runtime.common import JAXCHAT_ONLY

CLIS = ["base_eval", "dataset", "tok_train", "tok_eval", "core_bundle"]


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings]


@pytest.mark.parametrize("name", CLIS)
def test_help_exits_0_and_describes_every_option(name, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    module = importlib.import_module(f"jaxchat.{name}")
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    for action in options(module.parser()):
        assert action.help and action.help.strip(), f"{name}: {action.option_strings} has no description"
        # its line in --help: the flag, then the description on the same line or the next, indented further
        i = next(i for i, line in enumerate(lines) if line.lstrip().startswith(action.option_strings[0]))
        flag_text = lines[i].strip()
        rest = flag_text.split("  ", 1)[1].strip() if "  " in flag_text else lines[i + 1].strip()
        assert rest and not rest.startswith("-"), f"{name}: {lines[i]!r} has no description in --help"
        if action.default is not argparse.SUPPRESS and action.dest != "help":
            assert "default:" in " ".join(lines[i:i + 4]), f"{name}: {action.option_strings} shows no default"


@pytest.mark.parametrize("name", CLIS)
def test_booleans_take_no_value_and_jaxchat_flags_are_marked(name):
    parser = importlib.import_module(f"jaxchat.{name}").parser()
    for action in options(parser):
        if isinstance(action.default, bool):
            assert isinstance(action, argparse.BooleanOptionalAction), f"{name}: {action.option_strings}"
            assert f"--no-{action.option_strings[0][2:]}" in action.option_strings
    # every CLI here has flags nanochat's counterpart lacks, and they say so
    assert any(a.help.startswith(JAXCHAT_ONLY) for a in options(parser))


@pytest.mark.entry
def test_core_eval_is_the_bundle_command():
    """`python -m jaxchat.core_eval --download` (the command the error messages name) is core_bundle's command line."""
    import subprocess
    import sys

    from jaxchat.eval import core_bundle

    proc = subprocess.run([sys.executable, "-m", "jaxchat.core_eval", "--help"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "--download, --no-download" in proc.stdout, proc.stderr[-2000:]
    assert core_bundle.DOWNLOAD_COMMAND == "python -m jaxchat.core_eval --download"


def test_base_eval_and_dataset_flags_parse():
    from jaxchat import base_eval
    from jaxchat.data import dataset, tok_train

    args = base_eval.parse_args(["--eval", "bpb", "--device-batch-size", "4", "--split-tokens", "1024"])
    assert args.evals == ["bpb"] and args.device_batch_size == 4 and args.split_tokens == 1024
    assert dataset.parser().parse_args(["--demo"]).demo and not dataset.parser().parse_args(["--no-demo"]).demo
    assert tok_train.parser().parse_args(["--max-chars", "1e6"]).max_chars == 1e6
