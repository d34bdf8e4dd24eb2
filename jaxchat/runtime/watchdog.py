"""Peer liveness for multi-process runs: exit with one clear line when another process dies, hangs or fails.

JAX's own runtime notices a dead peer only after its heartbeat timeout and then aborts with a multi-line C++ log, while
every other process may sit in a collective that never completes. This thread writes a counter for its process into
the coordinator's key-value store every second and reads everyone's; a counter that stops advancing for
`peer_timeout` seconds, a peer that reported a failure, or a coordinator that stops answering ends this process with
`error: process P of N: ...` on stderr (exit code 3). The JAX heartbeat timeout is set longer, so this line comes first.
"""

import atexit
import os
import sys
import threading
import time

PREFIX = "jaxchat/alive/"
EXIT_CODE = 3

_state: dict = {}  # client, process, count, address of the running watchdog; empty in single-process runs


def start(client, process: int, count: int, address: str, peer_timeout: float, interval: float = 1.0) -> None:
    """Start beating and watching the other processes (once per process, after jax.distributed.initialize)."""
    _state.update(client=client, process=process, count=count, address=address, stop=threading.Event(),
                  peer_timeout=peer_timeout, interval=interval)
    thread = threading.Thread(target=_watch, args=(peer_timeout, interval), name="jaxchat-watchdog", daemon=True)
    thread.start()
    atexit.register(done)  # registered after JAX's own shutdown hook, so it runs before it (atexit is LIFO)


def active() -> bool:
    return bool(_state)


def prefix() -> str:
    """'process P of N: ' in multi-process runs, '' otherwise: the start of every error line."""
    return f"process {_state['process']} of {_state['count']}: " if _state else ""


def _set(value: str) -> None:
    _state["client"].key_value_set(PREFIX + str(_state["process"]), value, allow_overwrite=True)


def done() -> None:
    """This process finished normally: peers stop watching it."""
    if _state and not _state["stop"].is_set():
        _state["stop"].set()
        try:
            _set("done")
        except Exception:
            pass


def await_verdict() -> None:
    """After a failed collective: give the watchdog time to name the peer that died (it then exits this process)."""
    if _state:
        time.sleep(_state["peer_timeout"] + 3 * _state["interval"])


def abort(message: str, code: int) -> None:
    """Tell the peers this process failed (they exit at once instead of waiting in a collective), print, exit now."""
    if _state:
        _state["stop"].set()
        try:
            _set("failed " + message)
        except Exception:
            pass
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    # os._exit skips JAX's shutdown barrier, which would wait for peers that are about to exit too.
    os._exit(code)


def _die(what: str) -> None:
    _state["stop"].set()
    print(f"error: {prefix()}{what}; exiting. Restart all processes with --resume-from-step=last "
          f"(the last complete checkpoint is intact)", file=sys.stderr, flush=True)
    os._exit(EXIT_CODE)


def _watch(peer_timeout: float, interval: float) -> None:
    client, me, count = _state["client"], _state["process"], _state["count"]
    stop = _state["stop"]
    now = time.monotonic()
    seen = {k: (None, now) for k in range(count) if k != me}  # peer -> (last counter value, when it last changed)
    reachable = now  # last time the coordinator answered
    beat = 0
    while not stop.wait(interval):
        beat += 1
        now = time.monotonic()
        try:
            _set(str(beat))
            values = dict(client.key_value_dir_get(PREFIX))  # one request for every process's counter
            reachable = now
        except Exception as e:  # the coordinator (process 0) is gone or unreachable
            if stop.is_set():
                return
            if now - reachable > peer_timeout:
                reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
                _die(f"lost the coordinator at {_state['address']} for {now - reachable:.0f} s ({reason}): "
                     f"process 0 died or the network failed")
            continue
        if stop.is_set():
            return
        for peer, (last, since) in seen.items():
            value = values.get(PREFIX + str(peer))
            if value == "done":
                continue
            if value is not None and value.startswith("failed "):
                _die(f"process {peer} failed ({value[len('failed '):].strip()[:300]})")
            if value != last:
                seen[peer] = (value, now)
            elif now - since > peer_timeout:
                _die(f"process {peer} stopped responding {now - since:.0f} s ago (killed, crashed or hung)")
