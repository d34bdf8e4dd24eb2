"""Crash soak: N trainings each interrupted at random points (SIGKILL or SIGTERM, often inside an async save), resumed
until done, and compared with one uninterrupted run: printed loss history and final parameters + optimizer state.

    python bench/crash_soak.py --kills 20 [--seed 0] [--base-dir DIR]

Prints one line per interruption and a final 'survived K of N kills with nothing lost'.
"""

import argparse
import random
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from crash_harness import STEPS, final_state, losses, prepare, run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--kills-per-run", type=int, default=3, help="interruptions before a run may finish")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-dir", default=None, help="scratch $JAXCHAT_BASE_DIR (default: a temp dir)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    base = Path(args.base_dir or tempfile.mkdtemp(prefix="crash_soak_"))
    prepare(base)
    code, output = run(base, "reference", resume=False)
    assert code == 0, output[-3000:]
    ref_losses, ref_state = losses([output]), final_state(base, "reference")

    survived, kills, run_index = 0, 0, 0
    while kills < args.kills:
        tag, outputs, lost = f"soak{run_index}", [], []
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
        try:
            assert code == 0, f"final run exit code {code}: {output[-500:]}"
            assert losses(outputs) == ref_losses, "loss history differs"
            state = final_state(base, tag)
            for key in ref_state:
                if not np.array_equal(state[key], ref_state[key]):
                    lost.append(key)
        except AssertionError as e:
            lost.append(str(e))
        n = len(outputs) - 1
        survived += n if not lost else 0
        print(f"run {run_index}: {n} interruption(s), " + ("identical to the uninterrupted run" if not lost
                                                          else f"DIFFERS: {lost[:3]}"), flush=True)
        run_index += 1
    print(f"survived {survived} of {kills} kills with nothing lost")
    sys.exit(0 if survived == kills else 1)


if __name__ == "__main__":
    main()
