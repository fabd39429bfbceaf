# cython: language_level=3
"""Batch packet core: split a WinDivert batch, parse every header into numpy
rows, verify/compute checksums, and rewrite addresses/ports with RFC 1624
incremental checksum updates.

All hot loops run without the GIL over a raw byte pointer and the rows'
memory cast to `PacketRow` (a packed C struct that mirrors PACKET_DTYPE);
no Python object is created per packet. The public, documented API lives in
`oisp.packet`; this module is its engine.

Checksum arithmetic is done on network-order numeric values ("BE domain"):
bulk sums run native-endian in C and are converted once, after folding.
"""

from libc.stdint cimport int8_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

cimport numpy as cnp
import numpy as np

cnp.import_array()

cdef extern from "packet_bytes.h" nogil:
    uint32_t be16 "oisp_be16"(const unsigned char *p)
    void put16 "oisp_put16"(unsigned char *p, uint32_t v)
    uint32_t fold16 "oisp_fold16"(uint64_t s)
    enum:
        OISP_TCP_FIN
        OISP_TCP_SYN
        OISP_TCP_RST
        OISP_TCP_PSH
        OISP_TCP_ACK
        OISP_TCP_URG
        OISP_TCP_ECE
        OISP_TCP_CWR

cdef extern from "packet_checksum.h" nogil:
    uint64_t oisp_sum_native(const unsigned char *p, size_t n)
    uint32_t oisp_fold_native(uint64_t acc)
    uint32_t oisp_sum16(const unsigned char *p, size_t n)


ctypedef packed struct PacketRow:
    uint32_t offset
    uint32_t length
    uint32_t payload_len
    uint32_t seq
    uint32_t ack
    uint32_t ip_id
    uint32_t flow_label
    uint16_t ip_header_len
    uint16_t l4_offset
    uint16_t l4_header_len
    uint16_t payload_offset
    uint16_t src_port
    uint16_t dst_port
    uint16_t window
    uint16_t frag_offset
    uint16_t ip_checksum
    uint16_t l4_checksum
    uint8_t status
    uint8_t ip_version
    uint8_t protocol
    uint8_t ttl
    uint8_t tos
    uint8_t tcp_flags
    uint8_t icmp_type
    uint8_t icmp_code
    int8_t ip_checksum_ok
    int8_t l4_checksum_ok
    uint8_t is_fragment
    uint8_t more_fragments
    uint8_t src_addr[16]
    uint8_t dst_addr[16]


PACKET_DTYPE = np.dtype([
    ("offset", np.uint32),          # start of the packet in the batch buffer
    ("length", np.uint32),          # IP total length; on a framing error, the bytes left
    ("payload_len", np.uint32),
    ("seq", np.uint32),
    ("ack", np.uint32),
    ("ip_id", np.uint32),           # IPv4 identification / IPv6 fragment identification
    ("flow_label", np.uint32),      # IPv6 only
    ("ip_header_len", np.uint16),   # IPv4 IHL*4; IPv6 40 + extension headers
    ("l4_offset", np.uint16),       # from packet start
    ("l4_header_len", np.uint16),   # 0 when there is no parsed L4 header
    ("payload_offset", np.uint16),  # from packet start
    ("src_port", np.uint16),
    ("dst_port", np.uint16),
    ("window", np.uint16),
    ("frag_offset", np.uint16),     # in bytes
    ("ip_checksum", np.uint16),     # as found in the packet, host order
    ("l4_checksum", np.uint16),
    ("status", np.uint8),           # 0 = ok, else one of the status codes
    ("ip_version", np.uint8),
    ("protocol", np.uint8),         # upper-layer protocol, after IPv6 extension headers
    ("ttl", np.uint8),              # TTL / hop limit
    ("tos", np.uint8),              # IPv4 TOS / IPv6 traffic class
    ("tcp_flags", np.uint8),
    ("icmp_type", np.uint8),
    ("icmp_code", np.uint8),
    ("ip_checksum_ok", np.int8),    # 1 good, 0 bad, -1 not checked / not applicable
    ("l4_checksum_ok", np.int8),
    ("is_fragment", np.uint8),
    ("more_fragments", np.uint8),
    ("src_addr", np.uint8, (16,)),  # network order; IPv4 in the first 4 bytes
    ("dst_addr", np.uint8, (16,)),
])

# Row status codes. Framing errors (< FIRST_PACKET_ERROR) mean the packet's
# boundary cannot be trusted, so splitting stops at that row; the others mark
# one packet whose IP framing is sound, and splitting continues past it.
cdef enum Status:
    ST_OK = 0
    ST_TRUNCATED = 1
    ST_BAD_VERSION = 2
    ST_BAD_HEADER_LENGTH = 3
    ST_BAD_TOTAL_LENGTH = 4
    ST_BAD_EXTENSION_HEADER = 5
    ST_L4_TRUNCATED = 6
    ST_BAD_L4_HEADER = 7

OK = ST_OK
TRUNCATED = ST_TRUNCATED
BAD_VERSION = ST_BAD_VERSION
BAD_HEADER_LENGTH = ST_BAD_HEADER_LENGTH
BAD_TOTAL_LENGTH = ST_BAD_TOTAL_LENGTH
BAD_EXTENSION_HEADER = ST_BAD_EXTENSION_HEADER
L4_TRUNCATED = ST_L4_TRUNCATED
BAD_L4_HEADER = ST_BAD_L4_HEADER
FIRST_PACKET_ERROR = ST_BAD_EXTENSION_HEADER

# TCP flag bits as found in a row's `tcp_flags` (packet_bytes.h: the C code reads the same).
TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH = OISP_TCP_FIN, OISP_TCP_SYN, OISP_TCP_RST, OISP_TCP_PSH
TCP_ACK, TCP_URG, TCP_ECE, TCP_CWR = OISP_TCP_ACK, OISP_TCP_URG, OISP_TCP_ECE, OISP_TCP_CWR

cdef enum:
    PROTO_ICMP = 1
    PROTO_TCP = 6
    PROTO_UDP = 17
    PROTO_ICMPV6 = 58


cdef PacketRow _probe


def _check_layout():
    """Fail loudly at import if PacketRow and PACKET_DTYPE ever disagree."""
    cdef size_t base = <size_t>&_probe
    c_offsets = {
        "offset": <size_t>&_probe.offset - base, "length": <size_t>&_probe.length - base,
        "payload_len": <size_t>&_probe.payload_len - base, "seq": <size_t>&_probe.seq - base,
        "ack": <size_t>&_probe.ack - base, "ip_id": <size_t>&_probe.ip_id - base,
        "flow_label": <size_t>&_probe.flow_label - base,
        "ip_header_len": <size_t>&_probe.ip_header_len - base,
        "l4_offset": <size_t>&_probe.l4_offset - base,
        "l4_header_len": <size_t>&_probe.l4_header_len - base,
        "payload_offset": <size_t>&_probe.payload_offset - base,
        "src_port": <size_t>&_probe.src_port - base, "dst_port": <size_t>&_probe.dst_port - base,
        "window": <size_t>&_probe.window - base, "frag_offset": <size_t>&_probe.frag_offset - base,
        "ip_checksum": <size_t>&_probe.ip_checksum - base,
        "l4_checksum": <size_t>&_probe.l4_checksum - base,
        "status": <size_t>&_probe.status - base, "ip_version": <size_t>&_probe.ip_version - base,
        "protocol": <size_t>&_probe.protocol - base, "ttl": <size_t>&_probe.ttl - base,
        "tos": <size_t>&_probe.tos - base, "tcp_flags": <size_t>&_probe.tcp_flags - base,
        "icmp_type": <size_t>&_probe.icmp_type - base, "icmp_code": <size_t>&_probe.icmp_code - base,
        "ip_checksum_ok": <size_t>&_probe.ip_checksum_ok - base,
        "l4_checksum_ok": <size_t>&_probe.l4_checksum_ok - base,
        "is_fragment": <size_t>&_probe.is_fragment - base,
        "more_fragments": <size_t>&_probe.more_fragments - base,
        "src_addr": <size_t>&_probe.src_addr[0] - base, "dst_addr": <size_t>&_probe.dst_addr[0] - base,
    }
    np_offsets = {name: PACKET_DTYPE.fields[name][1] for name in PACKET_DTYPE.names}
    if c_offsets != np_offsets or PACKET_DTYPE.itemsize != sizeof(PacketRow):
        raise ImportError("PacketRow and PACKET_DTYPE layouts differ")


_check_layout()


# ---------------------------------------------------------------- byte helpers

cdef inline uint32_t be32(const unsigned char *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


# ---------------------------------------------------------------- framing + parse

cdef inline int frame_one(const unsigned char *p, size_t avail, size_t *total) noexcept nogil:
    """Find one packet's length from its IP header; nonzero = framing error."""
    cdef uint32_t version = p[0] >> 4
    cdef uint32_t ihl, tl
    if version == 4:
        if avail < 20:
            return ST_TRUNCATED
        ihl = (p[0] & 0x0F) * 4
        tl = be16(p + 2)
        if ihl < 20:
            return ST_BAD_HEADER_LENGTH
        if tl < 20:
            return ST_BAD_TOTAL_LENGTH
        if tl < ihl:
            return ST_BAD_HEADER_LENGTH
        if tl > avail:
            return ST_TRUNCATED
        total[0] = tl
        return ST_OK
    if version == 6:
        if avail < 40:
            return ST_TRUNCATED
        tl = 40 + be16(p + 4)
        if tl > avail:
            return ST_TRUNCATED
        total[0] = tl
        return ST_OK
    return ST_BAD_VERSION


cdef inline int is_generic_ext_header(uint32_t nh) noexcept nogil:
    # Hop-by-hop, routing, destination options, mobility, HIP, shim6:
    # all "next header, length in 8-octet units not counting the first 8".
    return nh == 0 or nh == 43 or nh == 60 or nh == 135 or nh == 139 or nh == 140


cdef int parse_ipv6_chain(const unsigned char *p, size_t total, PacketRow *r) noexcept nogil:
    """Walk IPv6 extension headers; sets protocol, ip_header_len, fragment fields."""
    cdef uint32_t nh = p[6]
    cdef size_t hl = 40
    cdef size_t elen
    cdef uint32_t fo
    while True:
        if is_generic_ext_header(nh) or nh == 51:
            if hl + 8 > total:
                return ST_BAD_EXTENSION_HEADER
            if nh == 51:  # AH counts 4-octet units, minus 2
                elen = (<size_t>p[hl + 1] + 2) * 4
            else:
                elen = (<size_t>p[hl + 1] + 1) * 8
            if hl + elen > total:
                return ST_BAD_EXTENSION_HEADER
            nh = p[hl]
            hl += elen
        elif nh == 44:
            if hl + 8 > total:
                return ST_BAD_EXTENSION_HEADER
            fo = be16(p + hl + 2)
            r.frag_offset = fo & 0xFFF8
            r.more_fragments = fo & 1
            r.ip_id = be32(p + hl + 4)
            nh = p[hl]
            hl += 8
            if r.frag_offset != 0:
                break  # later fragments carry no further headers
        else:
            break
    r.protocol = <uint8_t>nh
    r.ip_header_len = <uint16_t>hl
    return ST_OK


cdef int parse_l4(const unsigned char *p, PacketRow *r) noexcept nogil:
    """Parse TCP/UDP/ICMP/ICMPv6 at r.l4_offset; r.payload_* already span the rest."""
    cdef const unsigned char *q = p + r.l4_offset
    cdef size_t rem = r.length - r.l4_offset
    cdef size_t doff, ulen
    cdef uint32_t proto = r.protocol
    if proto == PROTO_TCP:
        if rem < 20:
            return ST_L4_TRUNCATED
        r.src_port = <uint16_t>be16(q)
        r.dst_port = <uint16_t>be16(q + 2)
        r.seq = be32(q + 4)
        r.ack = be32(q + 8)
        r.tcp_flags = q[13]
        r.window = <uint16_t>be16(q + 14)
        r.l4_checksum = <uint16_t>be16(q + 16)
        doff = (q[12] >> 4) * 4
        if doff < 20:
            return ST_BAD_L4_HEADER
        if doff > rem:
            return ST_L4_TRUNCATED
        r.l4_header_len = <uint16_t>doff
        r.payload_len = <uint32_t>(rem - doff)
    elif proto == PROTO_UDP:
        if rem < 8:
            return ST_L4_TRUNCATED
        r.src_port = <uint16_t>be16(q)
        r.dst_port = <uint16_t>be16(q + 2)
        r.l4_checksum = <uint16_t>be16(q + 6)
        ulen = be16(q + 4)
        if ulen < 8:
            return ST_BAD_L4_HEADER
        r.l4_header_len = 8
        if r.more_fragments:
            r.payload_len = <uint32_t>(rem - 8)  # UDP length spans the whole datagram
        elif ulen > rem:
            r.l4_header_len = 0
            return ST_L4_TRUNCATED
        else:
            r.payload_len = <uint32_t>(ulen - 8)  # bytes past ulen are link padding
    elif proto == PROTO_ICMP or proto == PROTO_ICMPV6:
        if rem < 4:
            return ST_L4_TRUNCATED
        r.icmp_type = q[0]
        r.icmp_code = q[1]
        r.l4_checksum = <uint16_t>be16(q + 2)
        if rem < 8:
            return ST_L4_TRUNCATED
        r.l4_header_len = 8
        r.payload_len = <uint32_t>(rem - 8)
    else:
        return ST_OK
    r.payload_offset = <uint16_t>(r.l4_offset + r.l4_header_len)
    return ST_OK


cdef int parse_one(const unsigned char *p, size_t avail, PacketRow *r) noexcept nogil:
    """Fill row r (offset already set) from the packet at p; returns its status."""
    cdef size_t total = 0
    cdef uint32_t offset = r.offset
    cdef uint32_t ff
    cdef int st
    memset(r, 0, sizeof(PacketRow))
    r.offset = offset
    r.ip_checksum_ok = -1
    r.l4_checksum_ok = -1
    r.ip_version = p[0] >> 4
    st = frame_one(p, avail, &total)
    if st != ST_OK:
        r.length = <uint32_t>avail
        r.status = <uint8_t>st
        return st
    r.length = <uint32_t>total
    if r.ip_version == 4:
        r.tos = p[1]
        r.ip_id = be16(p + 4)
        ff = be16(p + 6)
        r.more_fragments = (ff >> 13) & 1
        r.frag_offset = <uint16_t>((ff & 0x1FFF) * 8)
        r.ttl = p[8]
        r.protocol = p[9]
        r.ip_checksum = <uint16_t>be16(p + 10)
        memcpy(r.src_addr, p + 12, 4)
        memcpy(r.dst_addr, p + 16, 4)
        r.ip_header_len = (p[0] & 0x0F) * 4
    else:
        r.tos = <uint8_t>(((p[0] & 0x0F) << 4) | (p[1] >> 4))
        r.flow_label = ((<uint32_t>p[1] & 0x0F) << 16) | be16(p + 2)
        r.ttl = p[7]
        memcpy(r.src_addr, p + 8, 16)
        memcpy(r.dst_addr, p + 24, 16)
        st = parse_ipv6_chain(p, total, r)
    r.is_fragment = 1 if (r.more_fragments or r.frag_offset) else 0
    r.l4_offset = r.ip_header_len
    r.payload_offset = r.ip_header_len
    r.payload_len = <uint32_t>(total - r.ip_header_len) if st == ST_OK else 0
    if st == ST_OK and r.frag_offset == 0:
        st = parse_l4(p, r)
    r.status = <uint8_t>st
    return st


# ---------------------------------------------------------------- checksums

cdef inline int row_is_sound(const PacketRow *r, size_t buflen) noexcept nogil:
    """Guard for rows handed back by callers: never touch bytes outside the packet."""
    return (r.status == ST_OK and (r.ip_version == 4 or r.ip_version == 6)
            and <size_t>r.offset + r.length <= buflen
            and r.ip_header_len <= r.length and r.l4_offset >= r.ip_header_len
            and <size_t>r.l4_offset + r.l4_header_len + r.payload_len <= r.length)


cdef inline int checksum_field(const PacketRow *r) noexcept nogil:
    """Offset of the L4 checksum inside the L4 header, or -1 if none we handle."""
    if r.l4_header_len == 0 or r.frag_offset != 0:
        return -1
    if r.protocol == PROTO_TCP:
        return 16
    if r.protocol == PROTO_UDP:
        return 6
    if (r.protocol == PROTO_ICMP and r.ip_version == 4) or (
            r.protocol == PROTO_ICMPV6 and r.ip_version == 6):
        return 2
    return -1


cdef inline uint32_t l4_sum(const unsigned char *p, const PacketRow *r) noexcept nogil:
    """Folded BE sum of the L4 segment, plus the pseudo-header where one applies."""
    cdef size_t seg = <size_t>r.l4_header_len + r.payload_len
    cdef uint64_t acc = oisp_sum_native(p + r.l4_offset, seg)
    if r.protocol == PROTO_ICMP:
        return oisp_fold_native(acc)
    if r.ip_version == 4:
        acc += oisp_sum_native(p + 12, 8)
    else:
        acc += oisp_sum_native(p + 8, 32)
    return fold16(<uint64_t>oisp_fold_native(acc) + r.protocol + seg)


cdef inline void verify_row(const unsigned char *p, PacketRow *r) noexcept nogil:
    cdef int field
    r.ip_checksum_ok = -1
    r.l4_checksum_ok = -1
    if r.ip_version == 4:
        r.ip_checksum_ok = 1 if oisp_sum16(p, r.ip_header_len) == 0xFFFF else 0
    if r.status != ST_OK or r.is_fragment:
        return  # a fragment's L4 checksum covers bytes we do not have
    field = checksum_field(r)
    if field < 0:
        return
    if r.protocol == PROTO_UDP and r.ip_version == 4 and r.l4_checksum == 0:
        return  # zero means "no checksum" for UDP over IPv4
    r.l4_checksum_ok = 1 if l4_sum(p, r) == 0xFFFF else 0


cdef inline void compute_row(unsigned char *p, PacketRow *r) noexcept nogil:
    cdef int field
    cdef uint32_t c
    if r.ip_version == 4:
        put16(p + 10, 0)
        c = (~oisp_sum16(p, r.ip_header_len)) & 0xFFFF
        put16(p + 10, c)
        r.ip_checksum = <uint16_t>c
        r.ip_checksum_ok = 1
    field = checksum_field(r)
    if field < 0 or r.is_fragment:
        return
    put16(p + r.l4_offset + field, 0)
    c = (~l4_sum(p, r)) & 0xFFFF
    if c == 0 and r.protocol == PROTO_UDP:
        c = 0xFFFF  # a computed zero is sent as all ones; zero means "none"
    put16(p + r.l4_offset + field, c)
    r.l4_checksum = <uint16_t>c
    r.l4_checksum_ok = 1


cdef size_t parse_into(const unsigned char *buf, size_t nbytes, PacketRow *rows,
                       size_t cap, bint verify) noexcept nogil:
    cdef size_t off = 0, n = 0
    cdef PacketRow *r
    cdef int st
    while off < nbytes and n < cap:
        r = rows + n
        r.offset = <uint32_t>off
        st = parse_one(buf + off, nbytes - off, r)
        n += 1
        if st != ST_OK and st < ST_BAD_EXTENSION_HEADER:
            break
        if verify:
            verify_row(buf + off, r)
        off += r.length
    return n


# ---------------------------------------------------------------- rewrite

cdef struct Rewrite:
    bint swap_addresses
    bint set_src
    bint set_dst
    int src_port   # -1 = leave as is
    int dst_port
    unsigned char src_addr[16]
    unsigned char dst_addr[16]


cdef inline uint32_t adjust(uint32_t hc, uint32_t old_sum, uint32_t new_sum) noexcept nogil:
    """RFC 1624 eqn 3 on folded BE sums: HC' = ~(~HC + ~m + m')."""
    return (~fold16(<uint64_t>((~hc) & 0xFFFF) + ((~old_sum) & 0xFFFF) + new_sum)) & 0xFFFF


cdef void rewrite_row(unsigned char *p, PacketRow *r, const Rewrite *w) noexcept nogil:
    cdef size_t alen = 4 if r.ip_version == 4 else 16
    cdef size_t src_at = 12 if r.ip_version == 4 else 8
    cdef unsigned char new_src[16]
    cdef unsigned char new_dst[16]
    cdef uint32_t old_addr, new_addr, old_ports = 0, new_ports = 0, hc
    cdef uint32_t sport = r.src_port, dport = r.dst_port
    cdef int field = checksum_field(r)
    cdef bint has_ports = field >= 0 and (r.protocol == PROTO_TCP or r.protocol == PROTO_UDP)
    cdef unsigned char *q = p + r.l4_offset

    memcpy(new_src, p + src_at + (alen if w.swap_addresses else 0), alen)
    memcpy(new_dst, p + src_at + (0 if w.swap_addresses else alen), alen)
    if w.set_src:
        memcpy(new_src, w.src_addr, alen)
    if w.set_dst:
        memcpy(new_dst, w.dst_addr, alen)
    old_addr = oisp_sum16(p + src_at, 2 * alen)
    new_addr = fold16(<uint64_t>oisp_sum16(new_src, alen) + oisp_sum16(new_dst, alen))
    memcpy(p + src_at, new_src, alen)
    memcpy(p + src_at + alen, new_dst, alen)
    memcpy(r.src_addr, new_src, alen)
    memcpy(r.dst_addr, new_dst, alen)

    if r.ip_version == 4:
        hc = adjust(be16(p + 10), old_addr, new_addr)
        if hc == 0xFFFF:
            hc = 0  # the canonical form a full computation gives
        put16(p + 10, hc)
        r.ip_checksum = <uint16_t>hc

    if has_ports:
        old_ports = sport + dport
        if w.src_port >= 0:
            sport = <uint32_t>w.src_port
        if w.dst_port >= 0:
            dport = <uint32_t>w.dst_port
        new_ports = sport + dport
        put16(q, sport)
        put16(q + 2, dport)
        r.src_port = <uint16_t>sport
        r.dst_port = <uint16_t>dport

    if field < 0:
        return
    hc = be16(q + field)
    if r.protocol == PROTO_UDP and r.ip_version == 4 and hc == 0:
        return  # no checksum stays no checksum
    if r.protocol == PROTO_ICMP:
        return  # ICMPv4 has no pseudo-header and no ports
    hc = adjust(hc, fold16(<uint64_t>old_addr + old_ports), fold16(<uint64_t>new_addr + new_ports))
    if r.protocol == PROTO_UDP:
        if hc == 0:
            hc = 0xFFFF
    elif hc == 0xFFFF:
        hc = 0
    put16(q + field, hc)
    r.l4_checksum = <uint16_t>hc


# ---------------------------------------------------------------- Python entry points

cdef size_t effective_nbytes(Py_ssize_t buflen, object nbytes) except? 0:
    if nbytes is None:
        return <size_t>buflen
    n = int(nbytes)
    if n < 0 or n > buflen:
        raise ValueError(f"nbytes={n} is outside the buffer (0..{buflen})")
    return <size_t>n


cdef PacketRow *rows_pointer(object rows) except NULL:
    if not isinstance(rows, np.ndarray) or rows.dtype != PACKET_DTYPE or rows.ndim != 1:
        raise TypeError("rows must be a 1-D numpy array of PACKET_DTYPE")
    if not rows.flags.c_contiguous or not rows.flags.writeable:
        raise ValueError("rows must be C-contiguous and writable "
                         "(a boolean-mask copy would not update the batch's rows)")
    return <PacketRow *>cnp.PyArray_DATA(rows)


cdef cnp.ndarray selection(object rows, object select):
    """Row indices as contiguous intp, with numpy's indexing rules and errors."""
    if select is None:
        return np.arange(len(rows), dtype=np.intp)
    if isinstance(select, np.ndarray) and select.dtype == np.bool_ and select.shape == (len(rows),):
        return np.flatnonzero(select)  # the common case, without the arange
    return np.ascontiguousarray(np.arange(len(rows), dtype=np.intp)[select])


def parse_batch(const unsigned char[::1] buf, nbytes=None, *, Py_ssize_t max_packets=255,
                bint verify=True, out=None):
    """Split a batch and parse every packet into PACKET_DTYPE rows (a view of `out`).

    Reads only buf[:nbytes]. A framing error yields a final row with that
    status; at most min(max_packets, len(out)) rows are filled. With verify,
    the *_checksum_ok columns are filled too.
    """
    cdef size_t n = effective_nbytes(buf.shape[0], nbytes)
    cdef size_t count
    cdef PacketRow *rows
    cdef const unsigned char *data = &buf[0] if buf.shape[0] > 0 else NULL
    if max_packets < 0:
        raise ValueError("max_packets must be >= 0")
    if out is None:
        out = np.empty(max_packets, PACKET_DTYPE)
    rows = rows_pointer(out)
    cdef size_t cap = min(<size_t>max_packets, <size_t>len(out))
    with nogil:
        count = parse_into(data, n, rows, cap, verify)
    return out[:count]


def split_batch(const unsigned char[::1] buf, nbytes=None, Py_ssize_t max_packets=255):
    """(offsets, lengths) of the packets that frame cleanly, as uint32 arrays.

    Stops at the first framing error or after max_packets: if the lengths do
    not add up to nbytes, the rest could not be framed (parse_batch says why).
    """
    cdef size_t n = effective_nbytes(buf.shape[0], nbytes)
    cdef const unsigned char *data = &buf[0] if buf.shape[0] > 0 else NULL
    if max_packets < 0:
        raise ValueError("max_packets must be >= 0")
    offsets = np.empty(max_packets, np.uint32)
    lengths = np.empty(max_packets, np.uint32)
    cdef uint32_t[::1] offs = offsets
    cdef uint32_t[::1] lens = lengths
    cdef size_t off = 0, count = 0, total = 0
    with nogil:
        while off < n and count < <size_t>max_packets:
            if frame_one(data + off, n - off, &total) != ST_OK:
                break
            offs[count] = <uint32_t>off
            lens[count] = <uint32_t>total
            off += total
            count += 1
    return offsets[:count], lengths[:count]


def verify_checksums(const unsigned char[::1] buf, rows):
    """Fill ip_checksum_ok / l4_checksum_ok for every row (1, 0 or -1)."""
    cdef PacketRow *r = rows_pointer(rows)
    cdef size_t buflen = buf.shape[0], i, n = len(rows)
    cdef const unsigned char *data = &buf[0] if buf.shape[0] > 0 else NULL
    with nogil:
        for i in range(n):
            if row_is_sound(r + i, buflen) or (
                    r[i].status >= ST_BAD_EXTENSION_HEADER and r[i].ip_version == 4
                    and <size_t>r[i].offset + r[i].length <= buflen
                    and r[i].ip_header_len <= r[i].length):
                verify_row(data + r[i].offset, r + i)
            else:
                r[i].ip_checksum_ok = -1
                r[i].l4_checksum_ok = -1


def compute_checksums(unsigned char[::1] buf, rows, select=None):
    """Recompute the checksums of the selected valid rows in full, in place."""
    cdef PacketRow *r = rows_pointer(rows)
    cdef cnp.ndarray idx_arr = selection(rows, select)
    cdef Py_ssize_t[::1] idx = idx_arr
    cdef size_t buflen = buf.shape[0], k, i
    cdef unsigned char *data = &buf[0] if buf.shape[0] > 0 else NULL
    with nogil:
        for k in range(<size_t>idx.shape[0]):
            i = idx[k]
            if row_is_sound(r + i, buflen):
                compute_row(data + r[i].offset, r + i)


cdef bytes address_bytes(object addr):
    import ipaddress
    if isinstance(addr, (bytes, bytearray, memoryview)):
        packed = bytes(addr)
        if len(packed) not in (4, 16):
            raise ValueError(f"a packed address is 4 or 16 bytes, not {len(packed)}")
        return packed
    if isinstance(addr, str):
        addr = ipaddress.ip_address(addr)
    return addr.packed


cdef int check_port(object port, str name) except -2:
    port = int(port)
    if port < -1 or port > 0xFFFF:
        raise ValueError(f"{name}={port} is not a port (0..65535, or -1 to leave it)")
    return port


def rewrite(unsigned char[::1] buf, rows, select, *, bint swap_addresses=False,
            src_addr=None, dst_addr=None, src_port=-1, dst_port=-1):
    """Rewrite the selected valid rows in place; returns how many were rewritten.

    Order: swap the addresses, then set any given address (bytes, str or
    ipaddress; its family must match every selected valid row), then set
    ports (-1 = unchanged; TCP/UDP rows only). Checksums are updated
    incrementally (RFC 1624) and the rows' fields follow the packet.
    """
    cdef PacketRow *r = rows_pointer(rows)
    cdef cnp.ndarray idx_arr = selection(rows, select)
    cdef Py_ssize_t[::1] idx = idx_arr
    cdef Rewrite w
    cdef size_t buflen = buf.shape[0], k, i, done = 0
    cdef unsigned char *data = &buf[0] if buf.shape[0] > 0 else NULL
    memset(&w, 0, sizeof(Rewrite))
    w.swap_addresses = swap_addresses
    w.src_port = check_port(src_port, "src_port")
    w.dst_port = check_port(dst_port, "dst_port")
    for name, addr in (("src_addr", src_addr), ("dst_addr", dst_addr)):
        if addr is None:
            continue
        packed = address_bytes(addr)
        version = 4 if len(packed) == 4 else 6
        chosen = rows[idx_arr]
        if np.any((chosen["status"] == 0) & (chosen["ip_version"] != version)):
            raise ValueError(f"{name} is IPv{version} but some selected rows are not")
        if name == "src_addr":
            w.set_src = True
            memcpy(w.src_addr, <const unsigned char *>packed, len(packed))
        else:
            w.set_dst = True
            memcpy(w.dst_addr, <const unsigned char *>packed, len(packed))
    with nogil:
        for k in range(<size_t>idx.shape[0]):
            i = idx[k]
            if row_is_sound(r + i, buflen):
                rewrite_row(data + r[i].offset, r + i, &w)
                done += 1
    return done


def reflect(unsigned char[::1] buf, rows, select, *, src_port=-1, dst_port=-1):
    """Swap source and destination addresses and set ports (streamdump-style)."""
    return rewrite(buf, rows, select, swap_addresses=True, src_port=src_port, dst_port=dst_port)


def checksum_adjust(int checksum, old_bytes, new_bytes):
    """RFC 1624 eqn 3: the checksum after old_bytes (even length) became new_bytes."""
    cdef bytes old = bytes(old_bytes), new = bytes(new_bytes)
    if len(old) != len(new) or len(old) % 2:
        raise ValueError("old_bytes and new_bytes must have the same even length")
    if not 0 <= checksum <= 0xFFFF:
        raise ValueError("checksum must be 0..0xFFFF")
    return adjust(checksum, oisp_sum16(old, len(old)), oisp_sum16(new, len(new)))
