"""jaxchat.runtime.watchdog's contract, with an in-memory key-value store standing in for the coordinator's: a peer that
stops beating, reports a failure or finishes; this process's own failure (abort). Each case runs in a subprocess,
since the watchdog ends its process with os._exit."""

import subprocess
import sys
import textwrap

from jaxchat.runtime import watchdog

HARNESS = textwrap.dedent("""
    import sys, threading, time
    from jaxchat.runtime import watchdog

    class Store:  # the coordinator's key-value store, in memory
        def __init__(self):
            self.data, self.lock = {}, threading.Lock()
        def key_value_set(self, key, value, allow_overwrite=False):
            with self.lock:
                self.data[key] = value
        def key_value_dir_get(self, prefix):
            with self.lock:
                return [(k, v) for k, v in self.data.items() if k.startswith(prefix)]

    store = Store()
    watchdog.start(store, 0, 2, "127.0.0.1:1234", peer_timeout=0.5, interval=0.05)
    peer = watchdog.PREFIX + "1"
""")


def run(body: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HARNESS + textwrap.dedent(body)], capture_output=True, text=True,
                          timeout=60)


def test_a_peer_that_stops_beating_ends_this_process_with_one_line():
    proc = run("""
        for beat in range(5):  # alive for a while, then silent
            store.key_value_set(peer, str(beat)); time.sleep(0.05)
        time.sleep(5)
        print("not reached")
    """)
    assert proc.returncode == watchdog.EXIT_CODE and "not reached" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: process 0 of 2: process 1 stopped responding")
    assert "--resume-from-step=last" in lines[0]


def test_a_peer_that_failed_is_named_at_once():
    proc = run("""
        store.key_value_set(peer, "failed error: process 1 of 2: out of device memory")
        time.sleep(5)
    """)
    assert proc.returncode == watchdog.EXIT_CODE
    assert "process 1 failed (error: process 1 of 2: out of device memory)" in proc.stderr


def test_a_finished_peer_is_not_watched_and_this_one_reports_done():
    proc = run("""
        store.key_value_set(peer, "done")
        time.sleep(1.5)  # three peer timeouts
        assert watchdog.active() and watchdog.prefix() == "process 0 of 2: "
        watchdog.done()
        print(store.data[watchdog.PREFIX + "0"])
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done"


def test_abort_tells_the_peers_and_exits_with_the_code():
    proc = run("""
        store.key_value_set(peer, "0")
        real_set = store.key_value_set
        def spy(key, value, allow_overwrite=False):
            if value.startswith("failed"):
                print("told the peers:", key, value, flush=True)
            real_set(key, value, allow_overwrite)
        store.key_value_set = spy
        watchdog.abort("error: process 0 of 2: bad flag", 2)
        print("not reached")
    """)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: process 0 of 2: bad flag"
    assert proc.stdout.strip() == f"told the peers: {watchdog.PREFIX}0 failed error: process 0 of 2: bad flag"


def test_single_process_runs_have_no_watchdog():
    assert not watchdog.active() and watchdog.prefix() == ""
    watchdog.done()
    watchdog.await_verdict()  # both no-ops without a watchdog
