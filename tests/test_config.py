"""The config file (oisp.config) and `--config` (oisp.cli.configured): a good file gives
the options their values, the command line wins, every kind of bad file is an error that
names the key and the file (never a traceback), and root refuses a file others can change."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from oisp import config
from oisp.cli import build_parser
from oisp.cli.configured import with_config

ROOT = Path(__file__).resolve().parents[1]

GOOD = """
[service]
user = "alice"
socket = "/run/oisp/ipc.sock"

[capture]
process = ["python", 4242]
exclude = "ollama"
plain = ["11434", "gpu-box:8000=vllm", 9000]
local = false
allow_quic = true
proxy_port = 9443
flow_idle_timeout = 60

[events]
redaction = "full"
streaming_chunks = true

[output]
jsonl = "/var/lib/oisp/events.jsonl"
jsonl_max_mb = 8
webhook = "@/etc/oisp/webhook.url"

[output.ui]
host = "127.0.0.1"

[output.otlp]
url = "http://127.0.0.1:4318"
protocol = "grpc"
content = true
"""


def _file(tmp_path: Path, text: str, name: str = "oisp.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o644)
    return path


def _record(argv: list[str]):
    parser = build_parser()
    full = ["record", *argv]
    return with_config(parser, parser.parse_args(full), full)


def test_a_good_file_gives_each_option_its_value(tmp_path):
    args = _record(["--config", str(_file(tmp_path, GOOD))])
    assert args.process == "python,4242" and args.exclude == "ollama"
    assert args.plain == ["11434", "gpu-box:8000=vllm", "9000"]
    assert args.no_local is True and args.allow_quic is True
    assert args.proxy_port == 9443 and args.flow_idle_timeout == 60.0
    assert args.redaction == "full" and args.streaming_chunks is True
    assert args.output == "/var/lib/oisp/events.jsonl" and args.jsonl_max_mb == 8.0
    assert args.webhook == "@/etc/oisp/webhook.url"
    assert args.ui == config.UI_DEFAULT_PORT and args.ui_host == "127.0.0.1"  # [output.ui] alone turns it on
    assert args.otlp == "http://127.0.0.1:4318" and args.otlp_protocol == "grpc" and args.otlp_content is True
    assert args.config_file.get("service.user") == "alice"
    assert args.user == "alice"  # record's --user names the sensor's user, as [service] user does


def test_the_ui_default_port_is_the_servers():
    from oisp.sinks.ui.server import DEFAULT_PORT

    assert config.UI_DEFAULT_PORT == DEFAULT_PORT


def test_without_the_tables_their_options_stay_off(tmp_path):
    args = _record(["--config", str(_file(tmp_path, "[capture]\nproxy_port = 8444\n"))])
    assert args.ui is None and args.otlp is None and args.plain == [] and args.redaction == "safe"
    assert args.proxy_port == 8444


def test_the_command_line_wins(tmp_path):
    path = _file(tmp_path, GOOD + '\n')
    args = _record(["--config", str(path), "--redaction", "safe", "--proxy-port", "8443", "--plain", "1234",
                    "-o", "/tmp/other.jsonl", "--ui", "9999", "--process", "node"])
    assert args.redaction == "safe"  # the option's own default value, given explicitly, still wins
    assert args.proxy_port == 8443
    assert args.plain == ["1234"]  # replaced, not added to the file's list
    assert args.output == "/tmp/other.jsonl" and args.ui == 9999 and args.process == "node"
    assert args.exclude == "ollama"  # what the command line did not give still comes from the file


def test_a_port_in_the_ui_table_sets_the_dashboard_port(tmp_path):
    args = _record(["--config", str(_file(tmp_path, "[output.ui]\nport = 0\n"))])
    assert args.ui == 0


BAD = [
    ("[capture\nprocess = 1\n", "not valid TOML"),
    ("proxy_port = 1\n", "unknown key proxy_port"),
    ("[capture]\nproces = ['x']\n", "unknown key capture.proces; did you mean process?"),
    ("[outputs]\n", "unknown key outputs; did you mean output?"),
    ("[output.ui]\nport = 7777\ncolour = 'red'\n", "unknown key output.ui.colour"),
    ("[capture]\nproxy_port = '8443'\n", "capture.proxy_port: expected an integer 1..65535 (got '8443')"),
    ("[capture]\nproxy_port = 70000\n", "capture.proxy_port: expected an integer 1..65535 (got 70000)"),
    ("[capture]\nproxy_port = true\n", "capture.proxy_port: expected an integer 1..65535 (got True)"),
    ("[capture]\nlocal = 'no'\n", "capture.local: expected true or false (got 'no')"),
    ("[capture]\nprocess = ['a,b']\n", "capture.process: expected names or pids without commas"),
    ("[capture]\nplain = ['99999']\n", "capture.plain: '99999': '99999' is not a TCP port"),
    ("[capture]\nplain = '11434'\n", "capture.plain: expected a list"),
    ("[capture]\nspec = 'spec.json'\n", "capture.spec: expected an absolute path"),
    ("[capture]\nflow_idle_timeout = 0\n", "capture.flow_idle_timeout: expected a positive number (got 0)"),
    ("[events]\nredaction = 'fulll'\n", "events.redaction: expected one of safe, full, minimal (got 'fulll')"),
    ("[output]\nui = 7777\n", "[output.ui] must be a table, not an integer"),
    ("output = 'x'\n", "[output] must be a table"),
    ("[output.otlp]\nprotocol = 'udp'\n", "output.otlp.protocol: expected one of http/protobuf, grpc"),
    ("[service]\nuser = ''\n", "service.user: expected a non-empty one-line string"),
    ("[service]\nsocket = 2020-01-01\n", "service.socket: expected a non-empty one-line string (got date)"),
]


@pytest.mark.parametrize("text, message", BAD, ids=[m.split(":")[0][:40] for _, m in BAD])
def test_each_kind_of_bad_file_is_a_clear_error(tmp_path, text, message):
    path = _file(tmp_path, text)
    with pytest.raises(config.ConfigError) as caught:
        config.read(path)
    assert str(caught.value).startswith(f"{path}: "), caught.value
    assert message in str(caught.value), caught.value


def test_a_secret_is_never_echoed_in_an_error(tmp_path):
    for text in ("[output]\nwebhook = 'ftp://user:s3cret-token@example/x'\n",
                 "[output.otlp]\nurl = 'grpc://s3cret-token@collector'\n"):
        with pytest.raises(config.ConfigError) as caught:
            config.read(_file(tmp_path, text))
        assert "s3cret-token" not in str(caught.value) and "expected" in str(caught.value)


def test_a_missing_file_and_a_huge_one_are_refused(tmp_path):
    with pytest.raises(config.ConfigError, match="no such file"):
        config.read(tmp_path / "absent.toml")
    with pytest.raises(config.ConfigError, match="larger than"):
        config.read(_file(tmp_path, "# " + "x" * config.MAX_BYTES + "\n"))
    with pytest.raises(config.ConfigError, match="not a regular file"):
        config.read(tmp_path)


def test_the_command_says_what_is_wrong_without_a_traceback(tmp_path):
    path = _file(tmp_path, "[capture]\nproxy_port = 'x'\n")
    done = subprocess.run([sys.executable, "-m", "oisp", "record", "--config", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2
    assert done.stderr == f"oisp record: {path}: capture.proxy_port: expected an integer 1..65535 (got 'x')\n"


root_only = pytest.mark.skipif(os.geteuid() != 0, reason="the file checks apply when root reads the file")


@root_only
@pytest.mark.parametrize("mode, says", [(0o664, "writable by group"), (0o646, "writable by others"),
                                        (0o666, "writable by group and others")])
def test_root_refuses_a_file_others_can_change(tmp_path, mode, says):
    path = _file(tmp_path, GOOD)
    path.chmod(mode)
    with pytest.raises(config.ConfigError) as caught:
        config.read(path)
    assert says in str(caught.value) and f"chmod go-w {path}" in str(caught.value)


@root_only
def test_root_refuses_a_file_another_user_owns(tmp_path):
    path = _file(tmp_path, GOOD)
    os.chown(path, 65534, 65534)
    with pytest.raises(config.ConfigError, match=f"owned by uid 65534.*chown root: {path}"):
        config.read(path)


@root_only
def test_root_refuses_a_file_in_a_directory_others_can_write(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    path = _file(shared, GOOD)
    shared.chmod(0o777)  # not sticky: anyone could put their own file in its place
    with pytest.raises(config.ConfigError, match=f"{shared} .* writable by others"):
        config.read(path)
    shared.chmod(0o1777)  # sticky, like /tmp: nobody else may rename or remove root's file
    assert config.read(path).get("service.user") == "alice"


@root_only
def test_root_checks_where_a_link_leads_too(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    target = _file(theirs, GOOD)
    link = tmp_path / "oisp.toml"
    link.symlink_to(target)
    with pytest.raises(config.ConfigError, match=f"{theirs} .*belongs to uid 65534"):
        config.read(link)


@pytest.mark.privileged
def test_record_runs_with_the_files_options(tmp_path, netns):
    """The real `oisp record`, given only --config, listens on the file's proxy port and
    writes the file's JSONL path."""
    events = tmp_path / "from-config.jsonl"
    path = _file(tmp_path, f"[capture]\nproxy_port = 9447\n[output]\njsonl = \"{events}\"\n")
    done = netns.run(sys.executable, "-m", "oisp", "record", "--config", str(path), "--duration", "1",
                     timeout=90, check=False)
    assert done.returncode == 0, done.stderr
    assert "oisp record: recording (proxy :9447)" in done.stderr
    assert events.exists()


def test_the_documented_example_is_a_good_file_and_every_key_is_documented(tmp_path):
    doc = (ROOT / "docs" / "config.md").read_text()
    example = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    loaded = config.read(_file(tmp_path, example))
    assert loaded.get("service.user") == "alice" and loaded.get("output.ui") == config.UI_DEFAULT_PORT
    for table, keys in config.SCHEMA.items():
        for key in keys:
            assert f"| `{table}.{key}` |" in doc, f"{table}.{key} is not in docs/config.md"
    for table in config.SWITCHES:
        assert f"| `[{table}]` |" in doc
