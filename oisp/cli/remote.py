"""The redirector as `oisp sensor` sees it: another process, over the IPC (oisp.ipc).

The sensor's part of the bargain: listen where the redirector reflects (the welcome
says where), show it so (listeners.set; the redirector checks the sockets are ours),
and say on stderr when the redirector goes and comes back. The same calls as the
in-process redirector of `oisp record --single-process` (oisp.cli.record.LocalRedirector),
so oisp.cli.sensor.record_events runs over either.
"""

from __future__ import annotations

import asyncio
import sys

from oisp.ipc.client import IPCClient, IPCRequestError, IPCUnavailable
from oisp.proxy.flow_source import IPCFlows

SAY_AWAY_AFTER = 1.0  # seconds without the redirector before saying so (a restart is usually quicker)
STOP_OPENING_WAIT = 1.0


def nested(flat: dict[str, int]) -> dict:
    """The IPC's flat counters ("reflector.engine.dropped") as the redirector's tree."""
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *path, leaf = name.split(".")
        for part in path:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):  # a name that is both a value and a group: keep the value
                break
            node = child
        else:
            node[leaf] = value
    return tree


class RemoteRedirector:
    def __init__(self, address: str, label: str, on_quic_refused):
        from oisp import __version__

        self.label, self.on_quic_refused = label, on_quic_refused
        self.client = IPCClient(address, software=f"oisp {__version__}", on_note=self._note, on_state=self._state,
                                on_quic_refused=self._quic)
        self.flows = IPCFlows(self.client)
        self.on_listen = None  # set by the sensor: async {server port: port} → the ports it listens on
        self.notes: list[str] = []
        self.failure = None  # the redirector's own failures are its business: the sensor waits for it
        self._counters: dict = {}
        self._recording = False
        self._resuming: asyncio.Task | None = None

    async def start(self, stop: asyncio.Event) -> bool:
        """Connected, listening and believed; False if `stop` came first."""
        await self.client.start()
        said = False
        while not stop.is_set():
            if not await self._connected(stop, SAY_AWAY_AFTER if not said else None):
                if stop.is_set():
                    return False
                self._say(f"the redirector is not reachable ({self.client.last_error}); waiting for it "
                          f"(sudo oisp redirector --user USER, or sudo oisp record)")
                said = True
                continue
            try:
                await self._listen()
            except IPCUnavailable:
                continue  # it went again meanwhile
            self.notes = [note.text for note in self.client.notes]
            self._recording = True
            return True
        return False

    async def _connected(self, stop: asyncio.Event, timeout: float | None) -> bool:
        waiter = asyncio.ensure_future(self.client.wait_connected())
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([waiter, stopper], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (waiter, stopper):
                task.cancel()
        return self.client.connected

    async def _listen(self) -> None:
        ports = await self.on_listen(dict(self.client.listen))
        await self.client.set_listeners(ports)

    def _say(self, text: str) -> None:
        print(f"{self.label}: {text}", file=sys.stderr, flush=True)

    def _note(self, note) -> None:
        if self._recording:  # those in force at start are printed with the banner
            self._say(f"note: {note.text}")

    def _quic(self, message) -> None:
        self.on_quic_refused({"client": (message.client_addr, message.client_port),
                              "server": (message.server_addr, message.server_port), "ts": message.ts})

    def _state(self, up: bool) -> None:
        if not self._recording:
            return
        if not up:
            self._say(f"the redirector went away ({self.client.last_error}); traffic flows directly; "
                      f"waiting for it")
        elif self._resuming is None or self._resuming.done():
            self._resuming = asyncio.get_running_loop().create_task(self._resume())

    async def _resume(self) -> None:
        try:
            await self._listen()
        except IPCUnavailable:
            return  # gone again: the next welcome tries again
        except (OSError, IPCRequestError) as e:
            self._say(f"the redirector is back, but recording cannot resume: {e}")
            return
        self._say("the redirector is back; recording again")

    async def refresh(self) -> None:
        if self.client.connected:
            try:
                self._counters = nested(await self.client.counters())
            except (IPCUnavailable, IPCRequestError):
                pass

    def counters(self) -> dict:
        return {"reflector": {}, "quic": {}, **self._counters}

    async def stop_opening(self) -> None:
        """Nothing new is reflected to us from here on (the redirector's half of a clean stop)."""
        if self.client.connected:
            try:
                await asyncio.wait_for(self.client.set_listeners({}), STOP_OPENING_WAIT)
            except (IPCUnavailable, IPCRequestError, asyncio.TimeoutError):
                pass  # gone, or too slow: its side stops reflecting when our connection closes

    async def close(self) -> None:
        await self.client.close()
