/* Internet checksum (RFC 1071) primitives for packet_core.pyx.
 *
 * Why C and not Cython: the bulk sum is the one loop whose speed decides
 * parse+verify throughput on full-size packets, and it must stay a plain,
 * vectorisable loop. It sums native-endian 32-bit words into 64-bit
 * accumulators (no carry handling needed below 2^32 words) and folds at the
 * end; RFC 1071's byte-order independence lets us convert once, after
 * folding, to the network-order value every caller works with.
 */
#ifndef OISP_PACKET_CHECKSUM_H
#define OISP_PACKET_CHECKSUM_H

#include <stdint.h>
#include <string.h>

static inline uint32_t oisp_load32(const unsigned char *p)
{
    uint32_t w;
    memcpy(&w, p, 4); /* unaligned-safe; compiles to one load */
    return w;
}

static inline int oisp_is_little_endian(void)
{
    const uint16_t one = 1;
    return *(const unsigned char *)&one == 1;
}

/* Fold a wide one's-complement sum of native-endian data to 16 bits and
 * return it as the network-order (big-endian) numeric value. */
static inline uint32_t oisp_fold_native(uint64_t acc)
{
    acc = (acc & 0xffffffffu) + (acc >> 32);
    acc = (acc & 0xffffffffu) + (acc >> 32);
    acc = (acc & 0xffffu) + (acc >> 16);
    acc = (acc & 0xffffu) + (acc >> 16);
    acc = (acc & 0xffffu) + (acc >> 16);
    if (oisp_is_little_endian())
        acc = ((acc & 0xffu) << 8) | (acc >> 8);
    return (uint32_t)acc;
}

/* One's-complement sum of n bytes, native-endian, unfolded. Four
 * independent accumulators over 32-bit words let the compiler vectorise
 * and keep the adds from serialising on one register. */
static inline uint64_t oisp_sum_native(const unsigned char *p, size_t n)
{
    uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    while (n >= 32) {
        a0 += (uint64_t)oisp_load32(p) + oisp_load32(p + 16);
        a1 += (uint64_t)oisp_load32(p + 4) + oisp_load32(p + 20);
        a2 += (uint64_t)oisp_load32(p + 8) + oisp_load32(p + 24);
        a3 += (uint64_t)oisp_load32(p + 12) + oisp_load32(p + 28);
        p += 32;
        n -= 32;
    }
    while (n >= 4) {
        a0 += oisp_load32(p);
        p += 4;
        n -= 4;
    }
    if (n >= 2) {
        uint16_t h;
        memcpy(&h, p, 2);
        a1 += h;
        p += 2;
        n -= 2;
    }
    if (n) {
        /* A trailing odd byte is the high byte of a zero-padded word. */
        unsigned char pad[2] = {p[0], 0};
        uint16_t h;
        memcpy(&h, pad, 2);
        a2 += h;
    }
    return a0 + a1 + a2 + a3;
}

/* Network-order folded sum of n bytes (not complemented). */
static inline uint32_t oisp_sum16(const unsigned char *p, size_t n)
{
    return oisp_fold_native(oisp_sum_native(p, n));
}

#endif
