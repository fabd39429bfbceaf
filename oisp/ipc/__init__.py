"""The one IPC between the elevated redirector and the sensor that runs as a user
(docs/ipc.md is the protocol's description):

protocol           sans-IO messages, their schema and framing
transport          the platform seam: where the endpoint lives, who the peer is
serve_unix         the server's I/O on POSIX (a selectors loop in a thread)
transport_windows  the server's and client's I/O on Windows (named pipe; never run here)
server             the redirector's side: sessions, handlers over the flow table
client             the sensor's side, on asyncio
"""
