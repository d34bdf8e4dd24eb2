"""Crash soak: N trainings each interrupted at random points (SIGKILL or SIGTERM, often inside an async save), resumed
until done, and compared with one uninterrupted run: printed loss history and final parameters + optimizer state.
Then two targeted scenarios: SIGKILL during the final evaluation (after the final save started), and saves to a
nearly full disk (a small tmpfs: the save fails with one line or is killed; the disk is grown and the run resumed).

    python bench/crash_soak.py --kills 20 [--final-eval-kills 3] [--full-disk-runs 3] [--seed 0] [--base-dir DIR]

Prints one line per interruption and a final 'survived K of N kills with nothing lost'. The full-disk scenario needs
`mount -t tmpfs` (root); without it it is skipped with the reason.
"""

import argparse
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from crash_harness import STEPS, final_state, losses, prepare, run  # noqa: E402

FINAL_EVAL = ("--eval-tokens=262144",)  # a final evaluation long enough (seconds) to be killed inside
KILLED = {-signal.SIGKILL, -signal.SIGTERM, 128 + signal.SIGTERM}


def differences(base: Path, tag: str, outputs: list[str], reference: tuple) -> list[str]:
    """What differs from the uninterrupted run (empty: nothing lost)."""
    ref_losses, ref_state = reference
    try:
        got = losses(outputs)
        if any(got.get(s) != v for s, v in ref_losses.items()):
            return ["loss history differs"]
        state = final_state(base, tag)
        return [key for key in ref_state if not np.array_equal(state[key], ref_state[key])]
    except AssertionError as e:
        return [str(e)]


def random_kills(base: Path, args, rng: random.Random, reference: tuple) -> tuple[int, int]:
    survived, kills, run_index = 0, 0, 0
    while kills < args.kills:
        tag, outputs = f"soak{run_index}", []
        for _ in range(min(args.kills_per_run, args.kills - kills)):
            sig = rng.choice([signal.SIGKILL, signal.SIGKILL, signal.SIGTERM])
            after, delay = rng.randrange(STEPS), rng.uniform(0.0, 0.3)  # a delay often lands inside a save
            code, output = run(base, tag, resume=True, kill_after_step=after, sig=sig, kill_delay=delay)
            if code == 0:  # the run finished before the signal landed: not an interruption
                break
            outputs.append(output)
            kills += 1
            print(f"kill {kills}: {signal.Signals(sig).name} {delay:.2f}s after step {after} -> exit code {code}",
                  flush=True)
        if code != 0:
            code, output = run(base, tag, resume=True)
        outputs.append(output)
        lost = differences(base, tag, outputs, reference) if code == 0 else [f"final exit code {code}"]
        n = len(outputs) - 1
        survived += n if not lost else 0
        print(f"run {run_index}: {n} interruption(s), " + ("identical to the uninterrupted run" if not lost
                                                          else f"DIFFERS: {lost[:3]}"), flush=True)
        run_index += 1
    return survived, kills


def final_eval_kills(base: Path, n: int, rng: random.Random, reference: tuple) -> tuple[int, int]:
    """SIGKILL while the final evaluation runs: the final checkpoint was started before it; resume finishes."""
    survived = 0
    for i in range(n):
        tag, delay = f"final_eval{i}", rng.uniform(0.0, 2.0)
        code, first = run(base, tag, resume=True, kill_after_step=STEPS - 1, sig=signal.SIGKILL, kill_delay=delay,
                          extra=FINAL_EVAL)
        code2, second = run(base, tag, resume=True, extra=FINAL_EVAL)
        lost = differences(base, tag, [first, second], reference) if code2 == 0 else [f"resume exit code {code2}"]
        survived += not lost
        print(f"final-eval kill {i}: SIGKILL {delay:.2f}s after step {STEPS - 1} -> exit code {code}; resumed: "
              + ("nothing lost" if not lost else f"DIFFERS: {lost[:3]}"), flush=True)
    return survived, n


def full_disk_runs(base: Path, n: int, rng: random.Random, reference: tuple) -> tuple[int, int] | None:
    """Checkpoints on a tmpfs with room for ~2.5 of them: a save fails (one line, exit 2) or is killed inside; the
    disk is then grown and the run resumed, which must end identical and leave no temporary folder."""
    survived = 0
    for i in range(n):
        tag = f"full{i}"
        mount = Path(tempfile.mkdtemp(prefix="crash_soak_tmpfs_"))
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=26m", "tmpfs", str(mount)], capture_output=True)
        if proc.returncode:
            print(f"full-disk scenario skipped: cannot mount a tmpfs ({proc.stderr.decode().strip()[:100]})")
            return None
        link = base / "base_checkpoints" / tag
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(mount)
        try:
            kill = rng.random() < 0.5
            code, first = run(base, tag, resume=True, **(dict(kill_after_step=rng.randrange(1, 4),
                                                              sig=signal.SIGKILL, kill_delay=rng.uniform(0, 0.3))
                                                         if kill else {}))
            errors = [line for line in first.splitlines() if line.startswith("error:")]
            problems = []
            if code == 2 and not (len(errors) == 1 and "no room to save checkpoint" in errors[0]):
                problems.append(f"exit 2 without the one line: {errors}")
            elif code not in (2, -signal.SIGKILL):
                problems.append(f"exit code {code}")
            if code == 2 and [p.name for p in mount.iterdir() if "tmp" in p.name]:
                problems.append("temporary folder left behind")
            subprocess.run(["mount", "-o", "remount,size=256m", str(mount)], check=True)
            code2, second = run(base, tag, resume=True)
            problems += differences(base, tag, [first, second], reference) if code2 == 0 else [f"resume {code2}"]
            survived += not problems
            print(f"full disk {i}: " + (f"SIGKILL during a save -> {code}" if kill else f"exit code {code}: "
                                        f"{errors[0][:120] if errors else ''}") + "; grown and resumed: "
                  + ("nothing lost" if not problems else f"PROBLEMS: {problems[:3]}"), flush=True)
        finally:
            link.unlink()
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)
            shutil.rmtree(mount, ignore_errors=True)
    return survived, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--kills-per-run", type=int, default=3, help="interruptions before a run may finish")
    parser.add_argument("--final-eval-kills", type=int, default=3, help="SIGKILLs during the final evaluation")
    parser.add_argument("--full-disk-runs", type=int, default=3, help="runs on a nearly full tmpfs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-dir", default=None, help="scratch $JAXCHAT_BASE_DIR (default: a temp dir)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    base = Path(args.base_dir or tempfile.mkdtemp(prefix="crash_soak_"))
    prepare(base)
    code, output = run(base, "reference", resume=False)
    assert code == 0, output[-3000:]
    reference = losses([output]), final_state(base, "reference")

    survived, kills = random_kills(base, args, rng, reference)
    s, k = final_eval_kills(base, args.final_eval_kills, rng, reference)
    survived, kills = survived + s, kills + k
    if args.full_disk_runs and (result := full_disk_runs(base, args.full_disk_runs, rng, reference)):
        survived, kills = survived + result[0], kills + result[1]
    print(f"survived {survived} of {kills} kills with nothing lost")
    sys.exit(0 if survived == kills else 1)


if __name__ == "__main__":
    main()
