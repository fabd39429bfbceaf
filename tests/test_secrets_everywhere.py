"""A distinct secret planted in every place one can travel, through real traffic and the real
recorder and sinks; then every byte oisp put out is searched for every secret.

A real client process (its command line holds secrets, as CLI tools' do) sends a
chat request with secrets in its headers, query, user agent and body to a relay
that drives a FlowRecorder, as the proxy does, on its way to a real local HTTP
server that answers with a provider-style error quoting a key. The events go to
the JSONL, stdout (JSON and pretty) and webhook sinks, the webhook URL (with
its token) taken from OISP_WEBHOOK_URL as `oisp record` would, plus webhooks
that fail, so their warnings and errors are produced too, and to the OTLP sink with
content opted in (to a real OTLP receiver, where one is installed: tests/otlp_receiver.py).
Searched: every sink's bytes, what the webhook and OTLP receivers got, every log
record, stdout and stderr, the sinks' report (the status line's source).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import secrets
import socket
import string
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from oisp.decode import Direction, FlowContext
from oisp.events import FlowRecorder, Redactor
from oisp.sinks import StdoutSink, WebhookSink
from oisp.sinks.options import sinks_from_args
from oisp.sinks.otlp import OtlpSink, resolve
from tests.otlp_receiver import Receiver as OtlpReceiver, executable as otlp_executable
from tests.record_lab import await_recording


def _random(n: int = 28) -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(n - 2)) + "7q"  # surely mixed, as real keys are


# One secret per place; all unprefixed but the ones whose prefix the spec lists.
SECRETS = {place: _random() for place in (
    "header_bearer_two_spaces", "header_x_api_key", "query_key", "user_agent", "body_pair", "body_bearer_tab",
    "cmdline_api_key_eq", "cmdline_token_space", "cmdline_header", "cmdline_bearer", "error_message",
    "webhook_path", "webhook_query", "failing_webhook_path", "failing_webhook_query", "failing_webhook_userinfo")}
SECRETS |= {"body_together": "tgp_v1_" + _random(), "body_fireworks": "fw_" + _random(),
            "body_bedrock": "ABSK" + _random(40), "body_vertex": "ya29." + _random(40)}

CLIENT = """
import http.client, json, os, sys
s = json.loads(os.environ["PLANTED"])
body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content":
    f"keys: {s['body_together']} {s['body_fireworks']} {s['body_bedrock']} {s['body_vertex']}; "
    f"db password={s['body_pair']}; curl -H 'Authorization: Bearer\\t{s['body_bearer_tab']}'"}]})
conn = http.client.HTTPConnection("127.0.0.1", int(os.environ["RELAY_PORT"]), timeout=20)
conn.request("POST", "/v1/chat/completions?key=" + s["query_key"], body, headers={
    "Host": "api.openai.com", "Content-Type": "application/json",
    "Authorization": "Bearer  " + s["header_bearer_two_spaces"], "x-api-key": s["header_x_api_key"],
    "User-Agent": "acme-cli/2.1 (linux) " + s["user_agent"]})
response = conn.getresponse()
print(response.status, len(response.read()))
"""


class Provider(BaseHTTPRequestHandler):
    """Answers like OpenAI to a bad key: 401, quoting the key it was given."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"error": {"message": f"Incorrect API key provided: {SECRETS['error_message']}. You can "
                                                "find your API key at https://platform.openai.com/account/api-keys.",
                                     "type": "invalid_request_error", "code": "invalid_api_key"}}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class Receiver(BaseHTTPRequestHandler):
    bodies: list[bytes] = []

    def do_POST(self) -> None:
        Receiver.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def serve(handler) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def relay_one(listener: socket.socket, upstream_port: int, client_pid: int, emit, mode: str) -> None:
    """Accept one connection and carry it to the provider, feeding both directions to a FlowRecorder."""
    client, peer = listener.accept()
    upstream = socket.create_connection(("127.0.0.1", upstream_port))
    recorder = FlowRecorder(FlowContext(peer, ("127.0.0.1", upstream_port), time.time(), pid=client_pid),
                            redactor=Redactor(mode), streaming_chunks=True)
    lock = threading.Lock()

    def pump(src: socket.socket, dst: socket.socket, direction: Direction) -> None:
        while data := src.recv(65536):
            with lock:
                emit(recorder.feed(direction, data, time.time()))
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)

    up = threading.Thread(target=pump, args=(client, upstream, Direction.REQUEST))
    up.start()
    pump(upstream, client, Direction.RESPONSE)
    up.join(20)
    with lock:
        emit(recorder.close(time.time()))
    client.close()
    upstream.close()


@pytest.fixture(scope="module", params=["safe", "full"])
def outputs(request, tmp_path_factory):
    mode = request.param
    tmp = tmp_path_factory.mktemp(f"secrets-{mode}")
    provider, receiver = serve(Provider), serve(Receiver)
    otlp = OtlpReceiver().start() if otlp_executable() else None
    Receiver.bodies = []
    listener = socket.create_server(("127.0.0.1", 0))
    s = SECRETS
    good_url = f"http://127.0.0.1:{receiver.server_port}/hooks/{s['webhook_path']}?token={s['webhook_query']}"
    dead = socket.create_server(("127.0.0.1", 0))  # a port that refuses once closed
    dead_port = dead.getsockname()[1]
    dead.close()
    failing = [WebhookSink(f"http://127.0.0.1:{dead_port}/h/{s['failing_webhook_path']}?k={s['failing_webhook_query']}",
                           max_retries=0, flush_interval=0.05),
               WebhookSink(f"http://user:{s['failing_webhook_userinfo']}@127.0.0.1:{dead_port}/", max_retries=0,
                           flush_interval=0.05)]
    json_out, pretty_out = io.StringIO(), io.StringIO()
    old_env = os.environ.get("OISP_WEBHOOK_URL")
    os.environ["OISP_WEBHOOK_URL"] = good_url  # as a user keeps it out of `ps`
    root = logging.getLogger()
    log_text = io.StringIO()
    handler = logging.StreamHandler(log_text)
    handler.setLevel(logging.DEBUG)
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    printed_out, printed_err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(printed_out), contextlib.redirect_stderr(printed_err):
            events, report = _run(mode, tmp, s, listener, provider, failing, json_out, pretty_out, otlp)
        otlp_received = otlp.raw() if otlp else ""
        otlp_logs = len(otlp.logs()) if otlp else None
    finally:
        if otlp:
            otlp.stop()
        root.removeHandler(handler)
        root.setLevel(old_level)
        if old_env is None:
            os.environ.pop("OISP_WEBHOOK_URL", None)
        else:
            os.environ["OISP_WEBHOOK_URL"] = old_env
        listener.close()
        provider.shutdown()
        receiver.shutdown()
    return {"mode": mode, "events": events, "texts": {
        "jsonl": (tmp / "events.jsonl").read_text(), "stdout_json": json_out.getvalue(),
        "stdout_pretty": pretty_out.getvalue(), "webhook_received": b"".join(Receiver.bodies).decode(),
        "logs": log_text.getvalue(), "sink_report": report, "stdout": printed_out.getvalue(),
        "stderr": printed_err.getvalue(), "otlp_received": otlp_received}, "otlp_logs": otlp_logs}


def _run(mode, tmp, s, listener, provider, failing, json_out, pretty_out, otlp):
    args = argparse.Namespace(jsonl=str(tmp / "events.jsonl"), jsonl_max_mb=64.0, webhook=None, stdout=False,
                              pretty=False, quiet=False)
    fan = sinks_from_args(args)
    fan.sinks += [StdoutSink(json_out), StdoutSink(pretty_out, pretty=True), *failing]
    if otlp:
        fan.sinks.append(OtlpSink(resolve(otlp.http_url, None), content=True))  # content in, secrets still out
    assert {sink.name for sink in fan.sinks} == {"jsonl", "webhook", "stdout"} | ({"otlp"} if otlp else set())
    events: list[dict] = []

    def emit(batch: list[dict]) -> None:
        for event in batch:
            events.append(event)
            fan.emit(event)

    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, f"--api-key={s['cmdline_api_key_eq']}", "--token", s["cmdline_token_space"],
         "-H", f"x-api-key: {s['cmdline_header']}", "-H", f"Authorization: Bearer {s['cmdline_bearer']}"],
        env={**os.environ, "PLANTED": json.dumps(s), "RELAY_PORT": str(listener.getsockname()[1])},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    relay = threading.Thread(target=relay_one, args=(listener, provider.server_port, client.pid, emit, mode))
    relay.start()
    client_out, client_err = client.communicate(timeout=30)
    relay.join(30)
    assert client.returncode == 0, client_err
    assert client_out.split()[0] == "401", client_err
    time.sleep(0.3)  # the failing webhooks' one attempt each
    fan.close()
    report = json.dumps(fan.report())
    return events, report


def test_the_traffic_really_went_through_every_sink(outputs):
    kinds = [e["event_type"] for e in outputs["events"]]
    assert {"ai.request", "ai.response", "network.flow"} <= set(kinds)
    request = next(e for e in outputs["events"] if e["event_type"] == "ai.request")
    assert request["process"]["cmdline_args"][0] == sys.executable
    assert request["data"]["auth"]["key_hash"]
    texts = outputs["texts"]
    assert texts["jsonl"].count("\n") == len(kinds) == texts["stdout_json"].count("\n")
    assert sum(len(json.loads(b)) for b in Receiver.bodies) == len(kinds)  # the env's webhook got them all
    report = json.loads(texts["sink_report"])
    assert report["webhook"]["lost"] >= len(kinds)  # the failing ones did fail, and said so
    assert "events lost" in texts["logs"]
    if outputs["otlp_logs"] is not None:
        assert outputs["otlp_logs"] == len(kinds)
        assert report["otlp"]["emitted"] == len(kinds)


@pytest.mark.parametrize("place", sorted(SECRETS))
def test_no_secret_in_any_output(outputs, place):
    secret = SECRETS[place]
    for name, text in outputs["texts"].items():
        assert secret not in text, (outputs["mode"], place, name)
        assert secret[6:22] not in text, (outputs["mode"], place, name)  # nor a large piece of it


# -- the same through `oisp record` itself: real redirector, proxy, TLS, SDK client --------------

RECORD_SECRETS = {place: _random() for place in (
    "sdk_bearer_key", "sdk_user_agent", "cmdline_api_key_eq", "cmdline_token_space", "webhook_path", "webhook_query")}
RECORD_SECRETS |= {"prompt_fireworks": "fw_" + _random(), "prompt_vertex": "ya29." + _random(40)}

SDK_CLIENT = """
import json, os, openai
s = json.loads(os.environ["PLANTED"])
client = openai.OpenAI(api_key=s["sdk_bearer_key"], base_url="https://api.openai.com/v1", max_retries=0, timeout=20,
                       default_headers={"User-Agent": "acme-cli/2.1 " + s["sdk_user_agent"]})
reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content":
    f"keep {s['prompt_fireworks']} and {s['prompt_vertex']} safe"}])
print(json.dumps({"text": reply.choices[0].message.content}))
"""


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """`oisp record --stdout` with the webhook from OISP_WEBHOOK_URL (one that is down), and one SDK call."""
    import shutil
    import signal
    from pathlib import Path

    from tests.fakeprovider import make_test_pki
    from tests.netns import VethPair, stop_all

    tmp = tmp_path_factory.mktemp("record-secrets")
    s = RECORD_SECRETS
    pair = VethPair.create()
    hosts_dir = Path("/etc/netns") / pair.a.name
    hosts_dir.mkdir(parents=True, exist_ok=True)
    (hosts_dir / "hosts").write_text(f"127.0.0.1 localhost\n{pair.b_ip4} api.openai.com\n")
    upstream_ca, cert, key = make_test_pki(tmp)
    here = Path(__file__).parent
    processes = [pair.b.popen(sys.executable, str(here / "fakeprovider.py"), "--host", pair.b_ip4, "--port", "443",
                              "--cert", cert, "--key", key, stdout=subprocess.DEVNULL)]
    env = {**os.environ, "XDG_DATA_HOME": str(tmp / "data"),
           "OISP_WEBHOOK_URL": f"http://127.0.0.1:9/hooks/{s['webhook_path']}?token={s['webhook_query']}"}
    try:
        time.sleep(1.0)  # hypercorn binding
        sensor = pair.a.popen(sys.executable, "-m", "oisp", "record", "-o", str(tmp / "events.jsonl"), "--stdout",
                              "--upstream-ca", upstream_ca, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env)
        processes.append(sensor)
        early = await_recording(sensor)
        client = subprocess.run(
            pair.a.cmd(sys.executable, "-c", SDK_CLIENT, f"--api-key={s['cmdline_api_key_eq']}", "--token",
                       s["cmdline_token_space"]),
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "SSL_CERT_FILE": str(tmp / "data" / "oisp" / "oisp-ca.pem"), "PLANTED": json.dumps(s)})
        assert client.returncode == 0, client.stderr[-2000:]
        time.sleep(1.5)  # the webhook's first attempts fail (and are reported) while recording
        sensor.send_signal(signal.SIGINT)
        out, late = sensor.communicate(timeout=60)
        assert sensor.returncode == 0, late
    finally:
        stop_all(processes)
        pair.delete()
        shutil.rmtree(hosts_dir, ignore_errors=True)
    return {"client": client.stdout, "texts": {"events.jsonl": (tmp / "events.jsonl").read_text(), "stdout": out,
                                               "stderr": "".join(early) + late}}


@pytest.mark.privileged
def test_oisp_record_recorded_the_call(recorded):
    events = [json.loads(line) for line in recorded["texts"]["events.jsonl"].splitlines()]
    request = next(e for e in events if e["event_type"] == "ai.request")
    assert request["process"]["cmdline_args"][:2] == [sys.executable, "-c"]
    assert request["data"]["auth"]["key_hash"].startswith("sha256:")
    assert "sink webhook lost" in recorded["texts"]["stderr"]
    assert "http://127.0.0.1:9" in recorded["texts"]["stderr"]
    assert recorded["texts"]["stdout"].count("\n") == len(events)
    assert RECORD_SECRETS["prompt_fireworks"] in recorded["client"]  # echoed: it travelled both ways


@pytest.mark.privileged
@pytest.mark.parametrize("place", sorted(RECORD_SECRETS))
def test_no_secret_in_what_oisp_record_wrote(recorded, place):
    secret = RECORD_SECRETS[place]
    for name, text in recorded["texts"].items():
        assert secret not in text, (place, name)
        assert secret[6:22] not in text, (place, name)
