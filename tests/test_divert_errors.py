"""Every failure is a typed error that says what to do about it."""

from __future__ import annotations

import errno
import subprocess
import sys

import pytest

from oisp.divert import error_codes, errors
from oisp.divert.backend import get_backend
from oisp.divert.constants import Flag, Layer, Param
from oisp.divert.filter import check_filter, compile_filter, format_filter

WINDOWS_CODES = {
    2: errors.BackendMissingError,
    87: errors.InvalidParameterError,
    122: errors.BufferTooSmallError,
    232: errors.HandleClosedError,
    577: errors.DriverSignatureError,
    654: errors.IncompatibleDriverError,
    1060: errors.DriverNotInstalledError,
    1275: errors.DriverBlockedError,
    1753: errors.BaseFilteringEngineError,
}


@pytest.mark.parametrize("code, cls", list(WINDOWS_CODES.items()))
def test_windows_codes_map_to_typed_errors_with_a_remedy(code, cls):
    error = error_codes.from_winerror(code, "cannot open divert handle")
    assert type(error) is cls
    assert error.code == code
    assert error.hint
    assert error.hint in str(error)
    assert isinstance(error, OSError)


def test_windows_87_for_a_bad_filter_names_the_position():
    invalid = get_backend().invalid_filter("tcp and (udp or", 0)
    error = error_codes.from_winerror(87, "open", invalid_filter=invalid)
    assert isinstance(error, errors.InvalidFilterError)
    assert error.position == len("tcp and (udp or")


def test_windows_access_denied_is_a_privilege_error():
    assert isinstance(error_codes.from_winerror(5, "open"), errors.PrivilegeError)


@pytest.mark.parametrize("err, cls", [
    (errno.EOPNOTSUPP, errors.LayerNotSupportedError),
    (errno.ESHUTDOWN, errors.HandleClosedError),
    (errno.EAGAIN, errors.DivertTimeoutError),
    (errno.EPERM, errors.PrivilegeError),
])
def test_errno_maps_to_typed_errors(err, cls):
    assert isinstance(error_codes.from_errno(err, "open"), cls)


@pytest.mark.parametrize("filter, bad_token", [
    ("tcp and fooo == 3", "fooo"),
    ("tcp.DstPort == 443 and outbound or bogus", "bogus"),
    ("(tcp or udp", ""),
])
def test_invalid_filter_reports_the_position_of_the_bad_token(filter, bad_token):
    with pytest.raises(errors.InvalidFilterError) as info:
        check_filter(filter)
    error = info.value
    assert filter[error.position:].startswith(bad_token)
    assert error.reason
    assert f"\n  {filter}\n  {' ' * error.position}^" in str(error)
    assert (False, error.position, error.reason) == compile_filter(filter)


def test_format_filter_normalises_and_rejects():
    assert format_filter("tcp.DstPort==443") == "tcp.DstPort = 443"
    with pytest.raises(errors.InvalidFilterError):
        format_filter("tcp.DstPort ==")


def test_bad_priority_is_refused_before_opening():
    from oisp.divert import Handle

    with pytest.raises(ValueError, match="-30000..30000"):
        Handle("false", priority=40000)


PROBE = (
    "import sys\n"
    "from oisp.divert import Handle, Layer, Flag, DivertError\n"
    "try:\n"
    "    Handle('true', Layer(int(sys.argv[1])), 0, Flag(int(sys.argv[2]))).close()\n"
    "    print('opened')\n"
    "except DivertError as e:\n"
    "    print(type(e).__name__); print(e)\n"
)


def _probe(prefix: list[str], layer=Layer.NETWORK, flags=Flag.NONE) -> str:
    done = subprocess.run([*prefix, sys.executable, "-c", PROBE, str(int(layer)), str(int(flags))],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.privileged
def test_missing_capabilities_are_named_with_the_fix():
    out = _probe(["setpriv", "--bounding-set=-all,+net_admin"])
    assert out.startswith("PrivilegeError")
    for cap in ("CAP_BPF", "CAP_PERFMON", "CAP_NET_RAW"):
        assert cap in out
    assert "CAP_NET_ADMIN" not in out.split("missing", 1)[1].split(".")[0]
    assert "setcap" in out
    assert "sudo" in out


@pytest.mark.privileged
def test_oisp_check_says_what_is_missing():
    done = subprocess.run(["setpriv", "--bounding-set=-all", sys.executable, "-m", "oisp", "check"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "MISSING" in done.stdout
    assert "CAP_NET_ADMIN" in done.stdout
    assert "NOT READY" in done.stdout


@pytest.mark.privileged
@pytest.mark.parametrize("mount, expected", [("tmpfs", "LayerNotSupportedError"), ("cgroup2", "opened")])
def test_flow_layer_needs_cgroup2(netns, mount, expected):
    shell = (f"mount --make-rprivate / && mount -t {mount} none /sys/fs/cgroup && "
             f"exec {sys.executable} -c \"$0\" {int(Layer.FLOW)} {int(Flag.SNIFF | Flag.RECV_ONLY)}")
    done = subprocess.run(netns.cmd("unshare", "-m", "sh", "-c", shell, PROBE), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == expected, done.stdout
    if expected != "opened":
        assert "cgroup" in done.stdout
        assert "unshare" in done.stdout


@pytest.mark.privileged
def test_parameters_are_range_checked_and_applied():
    from oisp.divert import Handle

    with Handle("false") as handle:
        handle.set_param(Param.QUEUE_LENGTH, 8192)
        assert handle.get_param(Param.QUEUE_LENGTH) == 8192
        with pytest.raises(ValueError, match="QUEUE_TIME must be in 100..16000"):
            handle.set_param(Param.QUEUE_TIME, 50)
    with pytest.raises(errors.HandleClosedError):
        handle.get_param(Param.QUEUE_LENGTH)


def test_importing_errors_or_address_loads_nothing_native():
    # errors is a leaf: a program that only catches our exceptions (or builds address
    # arrays) must not dlopen the backend or load the compiled ring.
    code = ("import sys; import oisp.divert.errors, oisp.divert.address; "
            "loaded = [m for m in ('oisp._native.ring', 'oisp.divert.backend', 'oisp.divert.handle') if m in sys.modules]; "
            "print(','.join(loaded))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == ""
