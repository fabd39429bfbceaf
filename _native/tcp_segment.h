/* Software TCP segmentation for re-injection.
 *
 * Linux hands a TC-hook divert handle TCP packets before GSO splits them
 * (software GSO is always on), so a diverted segment can be far larger than
 * the interface MTU, and re-injecting it fails with EMSGSIZE. Such a packet
 * is split here the way GSO would: the same IP+TCP headers on every piece,
 * sequence numbers advanced, IPv4 ids incremented, FIN/PSH kept for the last
 * piece and CWR for the first, lengths and checksums recomputed.
 */
#ifndef OISP_TCP_SEGMENT_H
#define OISP_TCP_SEGMENT_H

#include <stdint.h>
#include <string.h>
#include "packet_bytes.h"
#include "packet_checksum.h"

/* Where the TCP header starts, or 0 when the packet is not a plain
 * (unfragmented, extension-free for IPv6) TCP packet we can segment. */
static uint32_t oisp_tcp_offset(const unsigned char *pkt, uint32_t len)
{
    if (len < 40)
        return 0;
    if (pkt[0] >> 4 == 4) {
        uint32_t ihl = (uint32_t)(pkt[0] & 0x0f) * 4;
        if (ihl < 20 || pkt[9] != 6 || (oisp_be16(pkt + 6) & 0x3fff) != 0 || len < ihl + 20)
            return 0;
        return ihl;
    }
    if (pkt[0] >> 4 == 6 && pkt[6] == 6 && len >= 60)
        return 40;
    return 0;
}

/* The number of bytes `pkt` takes once segmented for `mtu` (== len when it needs no split). */
static uint32_t oisp_segmented_size(const unsigned char *pkt, uint32_t len, uint32_t mtu, uint32_t *pieces)
{
    uint32_t l4 = oisp_tcp_offset(pkt, len), hdr, payload, mss, n;
    *pieces = 1;
    if (len <= mtu || l4 == 0)
        return len;
    hdr = l4 + (uint32_t)(pkt[l4 + 12] >> 4) * 4;
    if (hdr >= mtu || hdr > len)
        return len;
    payload = len - hdr;
    mss = mtu - hdr;
    n = (payload + mss - 1) / mss;
    *pieces = n;
    return payload + n * hdr;
}

/* Write the segments of `pkt` to `out` (room for oisp_segmented_size bytes);
 * lengths[i] receives each piece's size. Returns the number of pieces. */
static uint32_t oisp_tcp_segment(const unsigned char *pkt, uint32_t len, uint32_t mtu,
                                 unsigned char *out, uint32_t *lengths)
{
    uint32_t l4 = oisp_tcp_offset(pkt, len);
    uint32_t hdr = l4 + (uint32_t)(pkt[l4 + 12] >> 4) * 4;
    uint32_t payload = len - hdr, mss = mtu - hdr, done = 0, n = 0;
    int v4 = pkt[0] >> 4 == 4;
    uint32_t seq = ((uint32_t)pkt[l4 + 4] << 24) | ((uint32_t)pkt[l4 + 5] << 16) | ((uint32_t)pkt[l4 + 6] << 8) | pkt[l4 + 7];
    uint32_t ip_id = oisp_be16(pkt + 4);
    uint8_t flags = pkt[l4 + 13];
    uint64_t addr_sum = v4 ? (uint64_t)oisp_sum16(pkt + 12, 8) : (uint64_t)oisp_sum16(pkt + 8, 32);

    while (done < payload) {
        uint32_t chunk = payload - done < mss ? payload - done : mss;
        uint32_t size = hdr + chunk, s;
        unsigned char *p = out;
        uint64_t sum;
        memcpy(p, pkt, hdr);
        memcpy(p + hdr, pkt + hdr + done, chunk);
        if (v4) {
            oisp_put16(p + 2, size);
            oisp_put16(p + 4, (ip_id + n) & 0xffff);
            oisp_put16(p + 10, 0);
            oisp_put16(p + 10, ~oisp_fold16(oisp_sum16(p, l4)) & 0xffff);
        } else {
            oisp_put16(p + 4, size - 40);
        }
        s = seq + done;
        p[l4 + 4] = (unsigned char)(s >> 24);
        p[l4 + 5] = (unsigned char)(s >> 16);
        p[l4 + 6] = (unsigned char)(s >> 8);
        p[l4 + 7] = (unsigned char)s;
        p[l4 + 13] = flags;
        if (done + chunk < payload)
            p[l4 + 13] &= (uint8_t)~(OISP_TCP_FIN | OISP_TCP_PSH);
        if (done > 0)
            p[l4 + 13] &= (uint8_t)~OISP_TCP_CWR;
        oisp_put16(p + l4 + 16, 0);
        sum = addr_sum + 6 + (size - l4) + oisp_sum16(p + l4, size - l4);
        oisp_put16(p + l4 + 16, ~oisp_fold16(sum) & 0xffff);
        lengths[n++] = size;
        out += size;
        done += chunk;
    }
    return n;
}

#endif
