/* Byte-order helpers and TCP flag bits, one definition for every native module
 * (packet_core.pyx, tcp_segment.h, reflect_fast.h). Fields are read and written
 * a byte at a time: packets sit at any alignment in a batch buffer. */
#ifndef OISP_PACKET_BYTES_H
#define OISP_PACKET_BYTES_H

#include <stdint.h>

#define OISP_TCP_FIN 0x01
#define OISP_TCP_SYN 0x02
#define OISP_TCP_RST 0x04
#define OISP_TCP_PSH 0x08
#define OISP_TCP_ACK 0x10
#define OISP_TCP_URG 0x20
#define OISP_TCP_ECE 0x40
#define OISP_TCP_CWR 0x80

/* A big-endian 16-bit field. */
static inline uint32_t oisp_be16(const unsigned char *p) { return ((uint32_t)p[0] << 8) | p[1]; }

static inline void oisp_put16(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 8);
    p[1] = (unsigned char)v;
}

/* Fold a one's-complement sum to 16 bits (RFC 1071), carries and all. */
static inline uint32_t oisp_fold16(uint64_t s)
{
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    return (uint32_t)s;
}

#endif
