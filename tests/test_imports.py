"""Importing jaxchat changes no process-wide state: signal handlers, environment, logging filters, jax's config."""

import os
import subprocess
import sys

PROBE = r"""
import importlib, logging, os, pkgutil, signal, sys
import jax
import jaxchat

def snapshot():
    handlers = {s: signal.getsignal(s) for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP)}
    filters = {n: list(logging.getLogger(n).filters) for n in ("", "absl", "asyncio", "jax", "orbax")}
    config = {k: getattr(jax.config, k) for k in dir(jax.config) if k.startswith("jax_")}
    return handlers, dict(os.environ), filters, config

before = snapshot()
names = sorted(m.name for m in pkgutil.iter_modules(jaxchat.__path__))
for name in names:
    importlib.import_module(f"jaxchat.{name}")
after = snapshot()
changes = {label: sorted(str(k) for k in set(a) | set(b) if a.get(k) != b.get(k))
           for label, a, b in zip(("signal handlers", "environment", "logging filters", "jax config"), before, after)}
print(len(names), {k: v for k, v in changes.items() if v})
"""


def test_importing_every_module_changes_no_global_state():
    # No JAX_PLATFORMS (nor XLA_FLAGS, ...: tests/conftest.py sets them in this process) in the probe's environment,
    # so that a module writing one at import is seen; the probe starts no backend. PYTHONPATH: the checkout tested.
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", **{k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    imported, changes = done.stdout.strip().splitlines()[-1].split(" ", 1)
    assert changes == "{}" and int(imported) >= 30, done.stdout
