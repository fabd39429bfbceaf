"""A process that used a divert handle must end cleanly, whatever order its objects go in.

eBPFDivert starts a detached worker thread on its first open, which outlives every
handle. Interpreter exit frees the cffi library object, and cffi then dlcloses the
library: unmapped under the live worker, the process died with SIGSEGV as soon as the
worker woke (seen as `oisp record` crashing after a clean SIGINT stop, and engine agents
crashing at exit). Each scenario runs in a fresh process in a test namespace.
"""

from __future__ import annotations

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
time.sleep(3.0)  # the worker wakes within this (it crashed 4 of 4 times before the fix)
print("alive", flush=True)
"""


def test_freeing_the_library_object_keeps_it_loaded_under_its_worker_thread(netns):
    done = netns.run(sys.executable, "-X", "faulthandler", "-c", RELEASE_THE_LIBRARY, timeout=60, check=False)
    assert done.returncode == 0, f"exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    assert done.stdout.split() == ["mapped", "alive"]
