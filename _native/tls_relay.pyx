# cython: language_level=3
"""The relay's per-record TLS work in one C call per received buffer.

Python makes the handshakes on `ssl.SSLObject`s over two `MemoryBIO`s each; once
both are done, `pump()` takes the bytes one side's socket delivered and, on the
SSL* of those same objects: BIO_write into the side's read BIO, SSL_read until
it wants more, SSL_write of all the plaintext to the other side's SSL, and
BIO_read of what both SSLs produced. In Python that was a dozen calls, an
exception per buffer (SSLWantReadError) and a GIL release and re-take around
every SSL_read/SSL_write (a hand-off to the ring or reflector thread each time).
Here the GIL is held throughout: every call is on memory BIOs, so none blocks.

Getting the SSL*: CPython's `_ssl._SSLSocket` (what `SSLObject._sslobj` is)
starts PyObject_HEAD, PyObject *Socket, SSL *ssl (Modules/_ssl.c, 3.7 to 3.14),
and `_ssl` stores the object itself as the SSL's app data (SSL_set_app_data,
ex_data index 0). `handle()` reads the pointer and uses it only when
SSL_get_ex_data(ssl, 0) is that very object, which a wrong layout cannot
fake; at import the same check runs on a client and a server object, together
with SSL_is_server, and any mismatch leaves AVAILABLE false with the reason
(the relay then stays on the Python path).
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.object cimport PyObject, PyTypeObject
from libc.limits cimport INT_MAX
from libc.stdlib cimport free, malloc, realloc

import ssl
import sys

import _ssl

cdef extern from "tls_calls.h":
    int OISP_SSL_ERROR_WANT_READ
    int OISP_SSL_ERROR_ZERO_RETURN
    int OISP_BIO_CTRL_PENDING
    ctypedef struct oisp_tls_api:
        int (*SSL_read)(void *ssl, void *buf, int num)
        int (*SSL_write)(void *ssl, const void *buf, int num)
        int (*SSL_get_error)(const void *ssl, int ret)
        void *(*SSL_get_rbio)(const void *ssl)
        void *(*SSL_get_wbio)(const void *ssl)
        void *(*SSL_get_ex_data)(const void *ssl, int idx)
        int (*SSL_is_server)(const void *ssl)
        int (*BIO_write)(void *bio, const void *data, int len)
        int (*BIO_read)(void *bio, void *data, int len)
        long (*BIO_ctrl)(void *bio, int cmd, long larg, void *parg)
        void (*ERR_clear_error)()
        unsigned long (*ERR_get_error)()
        void (*ERR_error_string_n)(unsigned long e, char *buf, size_t len)
    int oisp_tls_load(oisp_tls_api *api, const char *ssl_module_path, const char **missing)

cdef extern from *:
    """
    typedef struct {
        PyObject_HEAD
        PyObject *Socket;
        void *ssl;
    } oisp_pyssl_head;
    """
    ctypedef struct oisp_pyssl_head:
        void *ssl

# pump()'s and seal()'s status, flags: what happened on the receiving side and the other.
OK = 0
ENDED = 1  # close_notify read: no more data from this side
SRC_FAILED = 2
DST_FAILED = 4
DST_WAITS = 8  # dst is mid-handshake (a TLS 1.2 renegotiation): it did not take the plaintext

# A received buffer's plaintext lands here before it is copied out once; grown on demand
# (plaintext never exceeds the ciphertext read plus one partial record), and shrunk back
# after an unusually large buffer so one big upload does not pin memory.
DEF SCRATCH_START = 1 << 16
DEF SCRATCH_KEEP = 1 << 20
DEF READ_ROOM = 1 << 14

cdef oisp_tls_api api
cdef unsigned char *scratch = NULL
cdef size_t scratch_size = 0
cdef bint busy = False
cdef type SSLSocketType = None


cdef class Tls:
    """The SSL* (and its two memory BIOs) of one handshaken SSLObject; holds the
    `_ssl._SSLSocket` so the SSL* lives as long as this does."""
    cdef object owner
    cdef void *ssl
    cdef void *rbio
    cdef void *wbio


cdef void *ssl_of(object sslsock):
    """The SSL* inside an `_ssl._SSLSocket`, or NULL unless its app data points back at it."""
    if type(sslsock) is not SSLSocketType:
        return NULL
    cdef void *candidate = (<oisp_pyssl_head *><PyObject *>sslsock).ssl
    if candidate == NULL or api.SSL_get_ex_data(candidate, 0) != <void *><PyObject *>sslsock:
        return NULL
    return candidate


def handle(sslobject):
    """A Tls for `sslobject` (an ssl.SSLObject), or None if its SSL* cannot be vouched for."""
    if not AVAILABLE:
        return None
    sslsock = getattr(sslobject, "_sslobj", None)
    cdef void *s = ssl_of(sslsock)
    if s == NULL:
        return None
    cdef Tls tls = Tls.__new__(Tls)
    tls.owner = sslsock
    tls.ssl = s
    tls.rbio = api.SSL_get_rbio(s)
    tls.wbio = api.SSL_get_wbio(s)
    if tls.rbio == NULL or tls.wbio == NULL:
        return None
    return tls


cdef str last_error(str fallback):
    cdef unsigned long code = api.ERR_get_error()
    cdef char text[256]
    api.ERR_clear_error()
    if code == 0:
        return fallback
    api.ERR_error_string_n(code, text, sizeof(text))
    return text.decode("ascii", "replace")


cdef object drain(void *bio):
    """All a memory BIO holds, as bytes (None when empty)."""
    cdef long pending = api.BIO_ctrl(bio, OISP_BIO_CTRL_PENDING, 0, NULL)
    if pending <= 0:
        return None
    if pending > INT_MAX:
        pending = INT_MAX  # the rest comes with the next drain
    out = PyBytes_FromStringAndSize(NULL, pending)
    cdef int got = api.BIO_read(bio, PyBytes_AS_STRING(out), <int>pending)
    if got != pending:
        return out[:got] if got > 0 else None
    return out


cdef int feed(void *bio, const char *p, Py_ssize_t left):
    cdef int n
    while left > 0:
        n = api.BIO_write(bio, p, <int>(left if left < INT_MAX else INT_MAX))
        if n <= 0:
            return -1
        p += n
        left -= n
    return 0


cdef int room(size_t needed) except -1:
    global scratch, scratch_size
    cdef size_t size = scratch_size if scratch_size else SCRATCH_START
    while size < needed:
        size *= 2
    if size != scratch_size:
        grown = <unsigned char *>realloc(scratch, size)
        if grown == NULL:
            raise MemoryError()
        scratch, scratch_size = grown, size
    return 0


def pump(Tls src, data, Tls dst=None):
    """Feed `data` (ciphertext `src`'s socket delivered: bytes, or the bytearray
    Windows' proactor loop hands over) to src, read all plaintext,
    and if `dst` is given write it to dst's SSL. Returns
    (plaintext or None, bytes for src's socket or None, bytes for dst's socket or None,
    status flags, error text or None). On SRC_FAILED nothing is written to dst; the
    plaintext read before the failure is dropped, as the Python path does. On
    DST_WAITS dst did not take the plaintext: the caller keeps it and offers it
    again (seal) once dst has read what its handshake waits for."""
    global busy, scratch, scratch_size
    cdef size_t total = 0
    cdef int n, err, status = OK
    cdef str error = None
    cdef Py_buffer view
    plain = back = out = None
    if busy:
        raise RuntimeError("tls_relay.pump re-entered")  # only an SSL callback could
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    api.ERR_clear_error()
    n = feed(src.rbio, <const char *>view.buf, view.len)
    PyBuffer_Release(&view)
    if n < 0:
        return None, None, None, SRC_FAILED, "BIO_write failed"
    busy = True
    try:
        while True:
            room(total + READ_ROOM)
            n = api.SSL_read(src.ssl, scratch + total,
                             <int>min(scratch_size - total, <size_t>INT_MAX))
            if n > 0:
                total += n
                continue
            err = api.SSL_get_error(src.ssl, n)
            if err == OISP_SSL_ERROR_ZERO_RETURN:
                status = ENDED
            elif err != OISP_SSL_ERROR_WANT_READ:
                status = SRC_FAILED
                error = last_error(f"SSL_read failed (SSL error {err})")
                total = 0
            break
        back = drain(src.wbio)  # records a read produces: KeyUpdate answers, alerts
        if total:
            plain = PyBytes_FromStringAndSize(<char *>scratch, total)
            if dst is not None:
                n = api.SSL_write(dst.ssl, scratch, <int>total) if total <= INT_MAX else -1
                if n <= 0 and total <= INT_MAX and api.SSL_get_error(dst.ssl, n) == OISP_SSL_ERROR_WANT_READ:
                    status |= DST_WAITS
                    api.ERR_clear_error()
                elif n != <int>total:
                    status |= DST_FAILED
                    error = last_error("SSL_write failed" if n <= 0 else "SSL_write was partial")
                out = drain(dst.wbio)
        return plain, back, out, status, error
    finally:
        if scratch_size > SCRATCH_KEEP:
            free(scratch)
            scratch, scratch_size = NULL, 0
        busy = False


def seal(Tls dst, data):
    """Write plaintext (any bytes-like object) to dst's SSL; (bytes for dst's socket or
    None, OK / DST_WAITS / DST_FAILED, error text or None)."""
    cdef int n = -1
    cdef Py_buffer view
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        api.ERR_clear_error()
        if view.len <= INT_MAX:
            n = api.SSL_write(dst.ssl, view.buf, <int>view.len)
        if n <= 0 and view.len <= INT_MAX and api.SSL_get_error(dst.ssl, n) == OISP_SSL_ERROR_WANT_READ:
            api.ERR_clear_error()
            return drain(dst.wbio), DST_WAITS, None
        if n != view.len:
            return drain(dst.wbio), DST_FAILED, last_error("SSL_write failed" if view.len <= INT_MAX
                                                           else "too large for one SSL_write")
        return drain(dst.wbio), OK, None
    finally:
        PyBuffer_Release(&view)


cdef str self_check():
    """Why the native path cannot be used here, or None."""
    global SSLSocketType
    cdef const char *missing = NULL
    cdef const char *path = NULL
    cdef void *s
    if not ((3, 7) <= sys.version_info[:2] <= (3, 14)):
        return f"_ssl's object layout is not known for Python {sys.version_info[0]}.{sys.version_info[1]}"
    module_path = getattr(_ssl, "__file__", None)
    encoded = module_path.encode() if module_path else None
    if encoded is not None:
        path = encoded
    if oisp_tls_load(&api, path, &missing) != 0:
        return f"OpenSSL symbol not found: {missing.decode()}"
    probes = [(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).wrap_bio(
                   ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="layout.check"), False),
              (ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).wrap_bio(
                   ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True), True)]
    SSLSocketType = type(probes[0][0]._sslobj)
    if SSLSocketType.__name__ != "_SSLSocket" or (<PyTypeObject *>SSLSocketType).tp_basicsize < <Py_ssize_t>sizeof(oisp_pyssl_head):
        SSLSocketType = None
        return "ssl.SSLObject._sslobj is not the _ssl._SSLSocket this module knows"
    for probe, server_side in probes:
        s = ssl_of(probe._sslobj)
        if s == NULL or bool(api.SSL_is_server(s)) != server_side:
            SSLSocketType = None
            return "the SSL* read from _ssl._SSLSocket failed the app-data check"
    return None


try:
    UNAVAILABLE = self_check()  # None, or why the relay keeps TLS in Python
except (ssl.SSLError, OSError, ValueError) as exc:  # no usable ssl here: Python's path reports it
    UNAVAILABLE = f"the layout check could not run: {exc}"
AVAILABLE = UNAVAILABLE is None
