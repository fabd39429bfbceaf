"""The one IPC between the elevated redirector and the sensor that runs as a user:
protocol (sans-IO messages and framing), transport (Unix socket / named pipe, the
peer's identity), server (the redirector's side, in a thread), client (asyncio, the
sensor's side). docs/ipc.md is the protocol's description."""
