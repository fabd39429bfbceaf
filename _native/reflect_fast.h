/* The reflector's fast path, run by the receive thread without the GIL.
 *
 * Why: at interactive rates every packet of a redirected connection used to
 * wake Python (receive thread -> consumer -> verdict -> inject), twice per
 * round trip, plus every packet of the proxy's own upstream connection. Once
 * Python has opened a flow (it saw the SYN and applied the process filter),
 * the decision for the flow's other packets is mechanical, so it is made here:
 *
 *   to a server port, from one of the proxy's own ports   -> pass unchanged (any flags)
 *   to a server port, of a known flow                      -> reflect to the proxy
 *   to a server port, not an AI address (when targets_on)  -> pass unchanged (any flags)
 *                     (a plaintext port, `any_dst`, takes every address its divert
 *                      filter lets through: the filter names the local ranges)
 *   from a proxy port, of a known flow                     -> reflect to the client
 *
 * A client's SYN to an AI address opens its flow here too when `open_syns` is
 * on (no process filter: nothing to decide but the address), and is queued in
 * `opened` for Python to adopt into its flow table; so a new connection's
 * handshake never waits for Python. With a process filter, or with the queue
 * full, the SYN is "slow" like other packets of unknown flows to AI addresses,
 * fragments, IPv6 extension headers and anything malformed: the batch goes to
 * Python, which opens the flow itself.
 *
 * Flows live in an open-addressing hash table (linear probing, backward-shift
 * deletion) keyed like the Python flow table: (server address as 16 bytes,
 * IPv4 in the first 4; client port; proxy port). `touched` records that a
 * packet went by since Python last asked (for its idle expiry), `ends` the
 * FINs and RSTs among them (Python closes the flow from them; before it
 * decides on a client's SYN it collects that flow's `ends` first). `closed`
 * keeps the same bits for the flow's whole life (Python adds its own verdict), so
 * a SYN here can tell a new connection on a reused port (closed: re-open and
 * report) from a retransmitted one (open: reflect). The AI addresses live in the
 * same table with both ports 0 (no flow has port 0).
 * The caller serialises all access (the ring's mutex).
 */
#ifndef OISP_REFLECT_FAST_H
#define OISP_REFLECT_FAST_H

#include <stdint.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include "packet_bytes.h"
#ifndef _WIN32
#include <unistd.h>
#endif

enum { OISP_FAST_SLOW = 0, OISP_FAST_PASS = 1, OISP_FAST_TO_PROXY = 2, OISP_FAST_TO_CLIENT = 3,
       OISP_FAST_PASS_OTHER = 4 };

#define OISP_FAST_OUTBOUND_BIT (1u << 17)
#define OISP_FAST_FIN_CLIENT 1
#define OISP_FAST_FIN_PROXY 2
#define OISP_FAST_RST 4
#define OISP_FAST_CLOSED 8 /* Python saw it end (packets it decided itself) */
#define OISP_FAST_OPENED_MAX 1024
#define OISP_OWN_IPV4 1 /* own_port's bits: the proxy holds the port for IPv4, IPv6 (own_ports.py) */
#define OISP_OWN_IPV6 2

typedef struct {
    uint8_t addr[16];
    uint16_t client_port;
    uint16_t proxy_port;
    uint8_t used;
    uint8_t touched;
    uint8_t ends; /* OISP_FAST_FIN_CLIENT | OISP_FAST_FIN_PROXY | OISP_FAST_RST seen since Python asked */
    uint8_t closed; /* the same bits (and OISP_FAST_CLOSED) since the flow opened */
} oisp_fast_flow;

/* A flow the receiver opened on a client's SYN, for Python to adopt. */
typedef struct {
    uint8_t server[16]; /* the flow key's address */
    uint8_t client[16]; /* the SYN's source, IPv4 in the first 4 */
    uint16_t client_port;
    uint16_t proxy_port;
    uint16_t server_port;
    uint8_t v6;
    int64_t created_ns; /* wall clock */
} oisp_fast_opened;

/* What the receiver did with the batches it decided whole. */
typedef struct {
    uint64_t to_proxy, to_client;
    uint64_t passed;       /* the proxy's own upstream */
    uint64_t passed_other; /* not to an AI address */
    uint64_t batches;
    int send_error;        /* the last injection error (0: none) */
} oisp_fast_counts;

typedef struct {
    const uint8_t *own_port;     /* 65536 bytes of OISP_OWN_IPV4 | OISP_OWN_IPV6: the proxy's upstream ports (owned by Python) */
    uint16_t proxy_for[65536];   /* server port -> proxy port, 0 = not redirected */
    uint16_t server_for[65536];  /* proxy port -> server port, 0 = not a proxy port */
    uint8_t any_dst[65536];      /* server port -> 1: every destination is taken (plaintext model servers) */
    oisp_fast_flow *slots;
    uint32_t mask;               /* capacity - 1, capacity a power of two */
    uint32_t count;
    uint8_t targets_on;          /* the AI addresses are all in the table: others may pass here */
    uint8_t open_syns;           /* clients' SYNs to AI addresses open flows here (needs targets_on) */
    oisp_fast_opened opened[OISP_FAST_OPENED_MAX]; /* a FIFO: head, len */
    uint32_t opened_head, opened_len;
    uint64_t opened_total;
    int guard_fd;                /* the guardian's pipe (Linux), -1: none; see oisp_fast_guard */
    oisp_fast_counts counts;
    uint32_t targets;            /* AI addresses in the table (kept by Python) */
    uint8_t targets_failed;      /* one did not fit: targets_on stays off */
} oisp_fast_table;

static inline oisp_fast_table *oisp_fast_new(uint32_t max_flows)
{
    uint32_t capacity = 16;
    oisp_fast_table *t;
    while (capacity < max_flows * 2u && capacity < (1u << 30))
        capacity <<= 1;
    t = (oisp_fast_table *)calloc(1, sizeof(oisp_fast_table));
    if (!t)
        return NULL;
    t->slots = (oisp_fast_flow *)calloc(capacity, sizeof(oisp_fast_flow));
    if (!t->slots) {
        free(t);
        return NULL;
    }
    t->mask = capacity - 1;
    t->guard_fd = -1;
    return t;
}

static inline void oisp_fast_free(oisp_fast_table *t)
{
    if (t) {
#ifndef _WIN32
        if (t->guard_fd >= 0)
            close(t->guard_fd);
#endif
        free(t->slots);
        free(t);
    }
}

static inline uint32_t oisp_fast_hash(const uint8_t *addr, uint16_t client_port, uint16_t proxy_port)
{
    uint32_t h = 2166136261u; /* FNV-1a */
    int i;
    for (i = 0; i < 16; i++)
        h = (h ^ addr[i]) * 16777619u;
    h = (h ^ client_port) * 16777619u;
    h = (h ^ proxy_port) * 16777619u;
    return h ^ (h >> 15);
}

static inline oisp_fast_flow *oisp_fast_find(oisp_fast_table *t, const uint8_t *addr, uint16_t client_port,
                                             uint16_t proxy_port)
{
    uint32_t i = oisp_fast_hash(addr, client_port, proxy_port) & t->mask;
    while (t->slots[i].used) {
        oisp_fast_flow *f = &t->slots[i];
        if (f->client_port == client_port && f->proxy_port == proxy_port && memcmp(f->addr, addr, 16) == 0)
            return f;
        i = (i + 1) & t->mask;
    }
    return NULL;
}

/* 1 added, 0 already there, -1 full (the table holds at most half its capacity). */
static inline int oisp_fast_add(oisp_fast_table *t, const uint8_t *addr, uint16_t client_port, uint16_t proxy_port)
{
    uint32_t i;
    if (oisp_fast_find(t, addr, client_port, proxy_port))
        return 0;
    if (t->count >= (t->mask + 1) / 2)
        return -1;
    i = oisp_fast_hash(addr, client_port, proxy_port) & t->mask;
    while (t->slots[i].used)
        i = (i + 1) & t->mask;
    memcpy(t->slots[i].addr, addr, 16);
    t->slots[i].client_port = client_port;
    t->slots[i].proxy_port = proxy_port;
    t->slots[i].touched = 0;
    t->slots[i].ends = 0;
    t->slots[i].closed = 0;
    t->slots[i].used = 1;
    t->count++;
    return 1;
}

static inline int oisp_fast_remove(oisp_fast_table *t, const uint8_t *addr, uint16_t client_port, uint16_t proxy_port)
{
    oisp_fast_flow *f = oisp_fast_find(t, addr, client_port, proxy_port);
    uint32_t hole, j, home;
    if (!f)
        return 0;
    hole = (uint32_t)(f - t->slots);
    t->slots[hole].used = 0;
    t->count--;
    /* Backward-shift deletion: move later members of the probe run into the hole
     * when their home slot does not lie (cyclically) between the hole and them. */
    j = hole;
    for (;;) {
        j = (j + 1) & t->mask;
        if (!t->slots[j].used)
            break;
        home = oisp_fast_hash(t->slots[j].addr, t->slots[j].client_port, t->slots[j].proxy_port) & t->mask;
        if (((j - home) & t->mask) >= ((j - hole) & t->mask)) {
            t->slots[hole] = t->slots[j];
            t->slots[j].used = 0;
            hole = j;
        }
    }
    return 1;
}

/* Locate the TCP header of an IPv4/IPv6 packet without options that need
 * Python: returns the TCP offset, or 0 for "slow". */
static inline uint32_t oisp_fast_tcp_offset(const unsigned char *p, uint32_t len, int *v6)
{
    uint32_t ihl, total, tcp, doff;
    if (len < 20)
        return 0;
    if ((p[0] >> 4) == 4) {
        ihl = (uint32_t)(p[0] & 0x0f) * 4;
        total = oisp_be16(p + 2);
        if (ihl < 20 || total != len || p[9] != 6 || (oisp_be16(p + 6) & 0x3fff) != 0)
            return 0; /* wrong length, not TCP, or a fragment */
        tcp = ihl;
        *v6 = 0;
    } else if ((p[0] >> 4) == 6) {
        if (len < 40 || p[6] != 6 || (uint32_t)oisp_be16(p + 4) + 40 != len)
            return 0; /* not TCP right after the fixed header (extension headers), or wrong length */
        tcp = 40;
        *v6 = 1;
    } else {
        return 0;
    }
    if (len < tcp + 20)
        return 0;
    doff = (uint32_t)(p[tcp + 12] >> 4) * 4;
    if (doff < 20 || len < tcp + doff)
        return 0;
    return tcp;
}

static inline void oisp_fast_note(oisp_fast_flow *f, uint8_t flags, uint8_t fin_bit)
{
    uint8_t ends = (flags & OISP_TCP_FIN ? fin_bit : 0) | (flags & OISP_TCP_RST ? OISP_FAST_RST : 0);
    f->touched = 1;
    f->ends |= ends;
    f->closed |= ends;
}

static inline int oisp_fast_is_closed(const oisp_fast_flow *f)
{
    return (f->closed & (OISP_FAST_RST | OISP_FAST_CLOSED)) ||
           (f->closed & (OISP_FAST_FIN_CLIENT | OISP_FAST_FIN_PROXY)) == (OISP_FAST_FIN_CLIENT | OISP_FAST_FIN_PROXY);
}

/* Tell the guardian (guardian.py) to abort the client's socket on `port` should this
 * process die: one write of one line, so it never interleaves with Python's. A flow
 * the ring opens is protected before its SYN is reflected, as one Python opens is. */
static inline void oisp_fast_guard(const oisp_fast_table *t, uint16_t port)
{
#ifndef _WIN32
    char line[8];
    int n;
    ssize_t written;
    if (t->guard_fd < 0)
        return;
    n = snprintf(line, sizeof line, "+%u\n", (unsigned)port);
    written = write(t->guard_fd, line, (size_t)n);
    (void)written; /* the guardian gone: nothing to tell */
#else
    (void)t;
    (void)port;
#endif
}

/* A client's packet with SYN to a server port. Not an AI address: pass. A SYN of
 * an open flow (retransmitted): reflect. A new flow, or a new connection on the
 * port of a closed one, with `open_syns` on: open it, queue it for Python, reflect.
 * Otherwise Python decides. */
static inline int oisp_fast_syn(oisp_fast_table *t, const unsigned char *p, int v6, const uint8_t *key,
                                uint16_t sport, uint16_t dport, uint8_t flags, uint16_t *port_out)
{
    uint16_t proxy_port = t->proxy_for[dport];
    oisp_fast_flow *f;
    oisp_fast_opened *o;
    struct timespec now;
    if (t->targets_on && !t->any_dst[dport] && !oisp_fast_find(t, key, 0, 0))
        return OISP_FAST_PASS_OTHER;
    if (!t->open_syns || !(t->targets_on || t->any_dst[dport]) || (flags & OISP_TCP_ACK))
        return OISP_FAST_SLOW;
    f = oisp_fast_find(t, key, sport, proxy_port);
    if (!f || oisp_fast_is_closed(f)) {
        if (t->opened_len == OISP_FAST_OPENED_MAX)
            return OISP_FAST_SLOW;
        if (!f) {
            if (oisp_fast_add(t, key, sport, proxy_port) < 0)
                return OISP_FAST_SLOW;
            f = oisp_fast_find(t, key, sport, proxy_port);
        }
        f->ends = 0; /* the old connection's: its Python entry is replaced on adoption */
        f->closed = 0;
        o = &t->opened[(t->opened_head + t->opened_len) % OISP_FAST_OPENED_MAX];
        memcpy(o->server, key, 16);
        memset(o->client, 0, 16);
        memcpy(o->client, v6 ? p + 8 : p + 12, v6 ? 16 : 4);
        o->client_port = sport;
        o->proxy_port = proxy_port;
        o->server_port = dport;
        o->v6 = (uint8_t)v6;
        timespec_get(&now, TIME_UTC);
        o->created_ns = (int64_t)now.tv_sec * 1000000000 + now.tv_nsec;
        t->opened_len++;
        t->opened_total++;
        oisp_fast_guard(t, sport);
    }
    f->touched = 1;
    *port_out = proxy_port;
    return OISP_FAST_TO_PROXY;
}

/* Decide one packet (marks its flow touched); *port_out gets the port to write. */
static inline int oisp_fast_classify(oisp_fast_table *t, const unsigned char *p, uint32_t len,
                                     const unsigned char *address, uint16_t *port_out)
{
    int v6 = 0;
    uint32_t bits, tcp = oisp_fast_tcp_offset(p, len, &v6);
    uint16_t sport, dport;
    uint8_t key[16], flags;
    oisp_fast_flow *f;
    if (!tcp)
        return OISP_FAST_SLOW;
    memcpy(&bits, address + 8, 4);
    if (!(bits & OISP_FAST_OUTBOUND_BIT))
        return OISP_FAST_SLOW;
    sport = oisp_be16(p + tcp);
    dport = oisp_be16(p + tcp + 2);
    /* The proxy's own upstream, whatever its flags: no flow state. Per family, since
     * holding a port in IPv4 does not keep IPv6-only sockets off it (own_ports.py). */
    if (t->proxy_for[dport] && t->own_port && (t->own_port[sport] & (v6 ? OISP_OWN_IPV6 : OISP_OWN_IPV4)))
        return OISP_FAST_PASS;
    flags = p[tcp + 13];
    memset(key, 0, sizeof key);
    memcpy(key, v6 ? p + 24 : p + 16, v6 ? 16 : 4); /* the destination address */
    if (t->proxy_for[dport]) {
        if (flags & OISP_TCP_SYN)
            return oisp_fast_syn(t, p, v6, key, sport, dport, flags, port_out);
        f = oisp_fast_find(t, key, sport, t->proxy_for[dport]);
        if (!f)
            return t->targets_on && !t->any_dst[dport] && !oisp_fast_find(t, key, 0, 0) ? OISP_FAST_PASS_OTHER
                                                                                         : OISP_FAST_SLOW;
        oisp_fast_note(f, flags, OISP_FAST_FIN_CLIENT);
        *port_out = t->proxy_for[dport];
        return OISP_FAST_TO_PROXY;
    }
    if (t->server_for[sport]) {
        f = oisp_fast_find(t, key, dport, sport);
        if (!f)
            return OISP_FAST_SLOW;
        oisp_fast_note(f, flags, OISP_FAST_FIN_PROXY);
        *port_out = t->server_for[sport];
        return OISP_FAST_TO_CLIENT;
    }
    return OISP_FAST_SLOW;
}

/* Swap the addresses, set one port, fix the TCP checksum (RFC 1624: swapping
 * addresses leaves both checksums' sums unchanged), and mark it inbound. */
static inline void oisp_fast_reflect(unsigned char *p, uint32_t len, unsigned char *address, int action,
                                     uint16_t port)
{
    int v6 = 0;
    uint32_t tcp = oisp_fast_tcp_offset(p, len, &v6), bits, sum;
    unsigned char tmp[16];
    unsigned char *at, *ck;
    uint16_t old;
    if (!tcp)
        return;
    if (v6) {
        memcpy(tmp, p + 8, 16);
        memmove(p + 8, p + 24, 16);
        memcpy(p + 24, tmp, 16);
    } else {
        memcpy(tmp, p + 12, 4);
        memmove(p + 12, p + 16, 4);
        memcpy(p + 16, tmp, 4);
    }
    at = p + tcp + (action == OISP_FAST_TO_PROXY ? 2 : 0);
    old = oisp_be16(at);
    oisp_put16(at, port);
    ck = p + tcp + 16;
    /* HC' = ~(~HC + ~m + m') */
    sum = (uint32_t)(~oisp_be16(ck) & 0xffff) + (uint32_t)(~old & 0xffff) + port;
    oisp_put16(ck, (uint16_t)~oisp_fold16(sum));
    memcpy(&bits, address + 8, 4);
    bits &= ~OISP_FAST_OUTBOUND_BIT;
    memcpy(address + 8, &bits, 4);
}

#endif
