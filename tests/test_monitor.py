"""jaxchat.runtime.monitor's contract: nanochat's step line, the peak-FLOPs table, TensorBoard scalars on disk."""

import math
import struct

from jaxchat.runtime.monitor import Monitor, step_line
from jaxchat.runtime.targets import PEAK_FLOPS, peak_flops


def test_step_line_is_nanochats_format():
    # nanochat's scripts/base_train.py (348fbb3) prints exactly these fields, in this order and format.
    line = step_line(42, 2205, 3.1234567, 0.5, 0.25, 2_097_152, 41.234, 1, 750.0, 1320.0)
    assert line == ("step 00042/02205 (1.90%) | loss: 3.123457 | lrm: 0.50 | dt: 250.00ms | tok/sec: 2,097,152 | "
                    "mfu: 41.23 | epoch: 1 | total time: 12.50m | eta: 22.0m")
    assert step_line(3, 10, 1.0, 1.0, 0.001, 5, 0.0, 2, 0.0, None).endswith("| epoch: 2 | total time: 0.00m")


def test_peak_flops_matches_the_most_specific_name_first():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12 and peak_flops("NVIDIA H100 NVL") == 835e12
    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("NVIDIA GB200") == 2.5e15
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("cpu") == math.inf and peak_flops("TPU v7x") == math.inf  # MFU then reads 0
    # TPU chips (jax's device kinds): v5e, v5p, v6e, v4
    assert (peak_flops("TPU v5 lite"), peak_flops("TPU v5"), peak_flops("TPU v6 lite"), peak_flops("TPU v4")) == (
        197e12, 459e12, 918e12, 275e12)
    # A name listed after a shorter one it contains would never match: the longer one must come first.
    names = [name for name, _ in PEAK_FLOPS]
    for i, name in enumerate(names):
        assert not any(earlier in name for earlier in names[:i]), name


def read_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} from TensorBoard event files (TFRecord framing around Event protos)."""
    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in sorted(directory.iterdir()):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos: pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12: pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_gets_scalars_and_dicts_of_scalars(tmp_path):
    monitor = Monitor("dummy", {"depth": 2}, str(tmp_path / "tb"), wandb_dir=str(tmp_path))
    assert monitor.wandb_run is None  # run 'dummy' disables WandB, as in nanochat
    monitor.log({"step": 0, "val/bpb": 2.5}, 0)
    monitor.log({"step": 100, "train/loss": 3.25, "centered_results": {"hellaswag": 0.125, "arc_easy": 0.5}}, 100)
    monitor.close()
    scalars = read_scalars(tmp_path / "tb")
    assert scalars == {"val/bpb": [(0, 2.5)], "train/loss": [(100, 3.25)],
                       "centered_results/hellaswag": [(100, 0.125)], "centered_results/arc_easy": [(100, 0.5)]}


def test_without_wandb_or_tensorboard_logging_is_a_no_op(tmp_path):
    monitor = Monitor("dummy", {}, None, wandb_dir=str(tmp_path))
    monitor.log({"step": 1, "train/loss": 1.0}, 1)
    monitor.close()
    assert list(tmp_path.iterdir()) == []
