"""Importing jaxchat changes no process-wide state: signal handlers, environment, logging filters, jax's config."""

import os
import subprocess
import sys

# Imports every module of a package (sub-packages too) and prints how many, then what changed.
PROBE = r"""
import importlib, logging, os, pkgutil, signal, sys
import jax

package = importlib.import_module(sys.argv[1])

def snapshot():
    handlers = {s: signal.getsignal(s) for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP)}
    filters = {n: list(logging.getLogger(n).filters) for n in ("", "absl", "asyncio", "jax", "orbax")}
    config = {k: getattr(jax.config, k) for k in dir(jax.config) if k.startswith("jax_")}
    return handlers, dict(os.environ), filters, config

before = snapshot()
names = sorted(m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + "."))
for name in names:
    importlib.import_module(name)
after = snapshot()
changes = {label: sorted(str(k) for k in set(a) | set(b) if a.get(k) != b.get(k))
           for label, a, b in zip(("signal handlers", "environment", "logging filters", "jax config"), before, after)}
print(len(names), {k: v for k, v in changes.items() if v})
"""


def probe(package: str, pythonpath: str) -> tuple[int, str]:
    """(modules imported, the changes seen) of importing every module of `package` in a fresh process.

    No JAX_PLATFORMS, XLA_FLAGS, ... in its environment (tests/conftest.py sets them in this process), so that a
    module writing one at import is seen; the probe starts no backend."""
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "PYTHONPATH": pythonpath}
    done = subprocess.run([sys.executable, "-c", PROBE, package], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    imported, changes = done.stdout.strip().splitlines()[-1].split(" ", 1)
    return int(imported), changes


def test_importing_every_module_changes_no_global_state():
    checkout = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))) if p)
    imported, changes = probe("jaxchat", checkout)
    assert changes == "{}" and imported >= 30, changes


def test_the_probe_sees_a_module_that_sets_up_the_process_at_import(tmp_path):
    """What jaxchat.aot once did (JAX_PLATFORMS=cpu at import, unseen while the probe's environment set it), and a
    signal handler and a jax option, in a sub-package: each is reported."""
    package = tmp_path / "leaky" / "inner"
    package.mkdir(parents=True)
    (tmp_path / "leaky" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "command.py").write_text(
        "import os, signal\nimport jax\nos.environ.setdefault('JAX_PLATFORMS', 'cpu')\n"
        "signal.signal(signal.SIGTERM, lambda *a: None)\njax.config.update('jax_enable_x64', True)\n")
    imported, changes = probe("leaky", str(tmp_path))
    assert imported == 2 and changes == ("{'signal handlers': ['15'], 'environment': ['JAX_PLATFORMS'], "
                                         "'jax config': ['jax_enable_x64']}"), changes
