"""Monitoring: the per-step line, MFU against the peak-FLOPs table, WandB and TensorBoard (process 0 only)."""

import os

import jax

from jaxchat.runtime.common import print0


def step_line(step: int, num_iterations: int, loss: float, lrm: float, dt: float, tokens_per_sec: int, mfu: float,
              epoch: int, total_time: float, eta: float | None, mfu_label: str = "mfu") -> str:
    """nanochat's per-step print (scripts/base_train.py, the training loop at 348fbb3); with fp8 the MFU is labelled
    bf16_mfu, as nanochat 92d63d4 labels it."""
    line = (f"step {step:05d}/{num_iterations:05d} ({100 * step / num_iterations:.2f}%) | loss: {loss:.6f} | "
            f"lrm: {lrm:.2f} | dt: {dt * 1000:.2f}ms | tok/sec: {tokens_per_sec:,} | {mfu_label}: {mfu:.2f} | "
            f"epoch: {epoch} | total time: {total_time / 60:.2f}m")
    return line + (f" | eta: {eta / 60:.1f}m" if eta is not None else "")


def _wandb_logged_in() -> bool:
    """Whether WandB has credentials (env or `wandb login`'s .netrc entry): online mode would otherwise fail."""
    netrc = os.path.join(os.path.expanduser("~"), ".netrc")
    return bool(os.environ.get("WANDB_API_KEY")) or (os.path.exists(netrc) and "wandb" in open(netrc).read())


class Monitor:
    """WandB (project "nanochat", the reference's keys; off for run "dummy") and TensorBoard event files, on process 0."""

    def __init__(self, run: str, config: dict, tensorboard_dir: str | None, wandb_dir: str):
        self.wandb_run = None
        self.tb = None
        if jax.process_index() != 0:
            return
        if run != "dummy":
            import wandb
            mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_logged_in() else "offline")
            self.wandb_run = wandb.init(project="nanochat", name=run, config=config, dir=wandb_dir, mode=mode)
            if mode == "offline":
                print0(f"WandB offline (no API key): `wandb sync {self.wandb_run.dir}/..` uploads the run later")
        if tensorboard_dir:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(tensorboard_dir)
            print0(f"TensorBoard logs: {tensorboard_dir}")

    def log(self, metrics: dict, step: int) -> None:
        """Log scalars (and dicts of scalars, e.g. CORE's centered results) at a step."""
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, dict):
                    for sub, v in value.items():
                        self.tb.add_scalar(f"{key}/{sub}", v, step)
                elif key != "step":
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
