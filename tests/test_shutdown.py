"""A process that used a divert handle must end cleanly, whatever order its objects go in.

eBPFDivert starts a detached worker thread on its first open, which outlives every
handle. Interpreter exit frees the cffi library object, and cffi then dlcloses the
library: unmapped under the live worker, the process died with SIGSEGV as soon as the
worker woke (seen as `oisp record` crashing after a clean SIGINT stop, and engine agents
crashing at exit). Each scenario runs in a fresh process in a test namespace.
"""

from __future__ import annotations

import json
import sys

import pytest

pytestmark = pytest.mark.privileged

# Frees the library object the way interpreter exit does (every reference dropped,
# then a collection), then lives on while the backend's worker thread wakes up.
RELEASE_THE_LIBRARY = """
import gc, os, time
from oisp.divert import backend, library
from oisp.divert.handle import Handle

def threads():
    return len(os.listdir("/proc/self/task"))

before = threads()
Handle("tcp.DstPort == 9").close()
assert threads() > before, "the backend started no thread of its own: this test no longer tests anything"
path = str(backend.get_backend().location.path)
backend.get_backend.cache_clear()
library.load.cache_clear()
gc.collect()
with open("/proc/self/maps") as maps:
    print("mapped" if path in maps.read() else "unmapped", flush=True)
time.sleep(1.5)  # the worker wakes every ~0.5 s (before the fix: SIGSEGV 0.48 s after the release)
print("alive", flush=True)
"""


def test_freeing_the_library_object_keeps_it_loaded_under_its_worker_thread(netns):
    done = netns.run(sys.executable, "-X", "faulthandler", "-c", RELEASE_THE_LIBRARY, timeout=60, check=False)
    assert done.returncode == 0, f"exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    assert done.stdout.split() == ["mapped", "alive"]

# A diverting engine on loopback, some datagrams through it, then stop() while the
# consumer holds one batch and another thread waits in next_batch().
STOP_WHILE_A_BATCH_IS_OUT = """
import json, socket, threading
from oisp.divert import errors
from oisp.divert.engine import Engine

rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
rx.bind(("127.0.0.1", 9999))
rx.settimeout(0.5)
engine = Engine("udp and udp.DstPort == 9999", watchdog=None)
tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(50):
    tx.sendto(b"%02d" % i, ("127.0.0.1", 9999))
held = engine.next_batch(timeout=5.0)
while (batch := engine.next_batch(timeout=0.5)) is not None:
    engine.commit(batch)
waited = []
waiter = threading.Thread(target=lambda: waited.append(engine.next_batch()))
waiter.start()
engine.stop()
waiter.join(5.0)
out = {"held": len(held), "waiter_done": not waiter.is_alive(), "waited": [b is None for b in waited]}
try:
    engine.commit(held)
except errors.HandleClosedError:
    out["commit"] = "refused"
for name, again in (("engine", lambda: engine.release(held)), ("ring", lambda: engine.ring.release_dropped(held.slot))):
    try:
        again()
        out[name] = "accepted"
    except ValueError:
        out[name] = "refused"
got = 0
try:
    while rx.recv(100):
        got += 1
except socket.timeout:
    pass
c = engine.counters()
out.update(delivered=got, adds_up=c["received"] == c["sent"] + c["dropped"] + c["consumed"] + c["drained"] + c["held"],
           received=c["received"], held_after=c["held"], occupancy=c["ring_occupancy"])
print(json.dumps(out))
"""


def test_stop_while_a_batch_is_out_and_a_consumer_waits(netns):
    done = netns.run(sys.executable, "-X", "faulthandler", "-c", STOP_WHILE_A_BATCH_IS_OUT, timeout=60, check=False)
    assert done.returncode == 0, f"exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    out = json.loads(done.stdout)
    assert out["held"] >= 1
    assert out["received"] == 50
    # the waiting consumer was told: stopped
    assert out["waiter_done"]
    assert out["waited"] == [True]
    assert out["commit"] == "refused"  # a batch still out when the handle closed is not injected...
    assert out["engine"] == out["ring"] == "refused"  # ...and cannot be handed back twice
    assert out["delivered"] == 50 - out["held"]
    assert out["adds_up"]
    assert out["held_after"] == out["occupancy"] == 0


# Two engines; a batch taken from one and handed to the other.
BATCH_OF_ANOTHER_ENGINE = """
import json, socket
from oisp.divert.engine import Engine

engines = [Engine(f"udp and udp.DstPort == {port}", watchdog=None) for port in (9998, 9999)]
tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for port in (9998, 9999):
    tx.sendto(b"x", ("127.0.0.1", port))
first, second = (engine.next_batch(timeout=5.0) for engine in engines)
out = {}
try:
    engines[1].commit(first)
    out["cross"] = "accepted"
except ValueError:
    out["cross"] = "refused"
out["own"] = [engines[0].commit(first), engines[1].commit(second)]
for engine in engines:
    engine.stop()
print(json.dumps(out))
"""


def test_a_batch_cannot_be_handed_to_another_engine(netns):
    """Regression: its slot number was taken as one of the other ring's slots."""
    done = netns.run(sys.executable, "-X", "faulthandler", "-c", BATCH_OF_ANOTHER_ENGINE, timeout=60, check=False)
    assert done.returncode == 0, f"exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    assert json.loads(done.stdout) == {"cross": "refused", "own": [1, 1]}
