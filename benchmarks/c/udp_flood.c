/* A bounded flood of small UDP datagrams, and a sink that counts them.
 *
 *   udp_flood send HOST PORT COUNT [SIZE=64] [SECONDS=30]   sendmmsg, 64 datagrams a call
 *   udp_flood sink HOST PORT [IDLE_MS=1000] [SECONDS=60]     counts until IDLE_MS of silence
 *   udp_flood run HOST PORT COUNT WINDOW [SIZE=64] [IDLE_MS=1000] [SINK_PORT=PORT]
 *
 * `run` is both in one process: the sender keeps at most WINDOW datagrams in flight
 * (sent but not yet received by the sink), so a divert loop in the path is offered
 * as much as it can take and, with WINDOW below the handle's queue length, never
 * more: the rate it reaches is its lossless rate. SINK_PORT lets a rewriting loop
 * move the datagrams to another port (a wrong checksum there means a kernel drop). Each prints one JSON object. A Python sender tops out near 150-200k datagrams/s,
 * below what a sniff handle takes, hence C. The sink verifies delivery after
 * re-injection: every datagram carries its sequence number, duplicates are counted.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BURST 64

static _Atomic long sink_received; /* what the sink has counted, for the sender's window */

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int resolve(const char *host, const char *port, struct sockaddr_storage *out, socklen_t *len)
{
    struct addrinfo hints = {.ai_socktype = SOCK_DGRAM, .ai_flags = AI_NUMERICHOST}, *res;
    int err = getaddrinfo(host, port, &hints, &res);
    if (err) {
        fprintf(stderr, "%s: %s\n", host, gai_strerror(err));
        return -1;
    }
    memcpy(out, res->ai_addr, res->ai_addrlen);
    *len = res->ai_addrlen;
    freeaddrinfo(res);
    return 0;
}

static int do_send(const char *host, const char *port, long count, int size, double seconds, long window)
{
    struct sockaddr_storage dst;
    socklen_t dst_len;
    if (resolve(host, port, &dst, &dst_len) < 0)
        return 2;
    int fd = socket(dst.ss_family, SOCK_DGRAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&dst, dst_len) < 0) {
        perror("socket/connect");
        return 2;
    }
    static char payload[BURST][65536];
    struct mmsghdr msgs[BURST];
    struct iovec iov[BURST];
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < BURST; i++) {
        memset(payload[i], 'x', size);
        iov[i].iov_base = payload[i];
        iov[i].iov_len = size;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    long sent = 0, errors = 0;
    double start = now(), deadline = start + seconds;
    while (sent < count && now() < deadline) {
        if (window && sent - atomic_load(&sink_received) >= window)
            continue; /* enough in flight: wait for the sink to catch up */
        int burst = count - sent < BURST ? (int)(count - sent) : BURST;
        for (int i = 0; i < burst; i++)
            memcpy(payload[i], &(uint64_t){(uint64_t)(sent + i)}, sizeof(uint64_t));
        int n = sendmmsg(fd, msgs, burst, 0);
        if (n < 0) {
            /* ENOBUFS/ECONNREFUSED: the path is full or nobody listens yet; go on, count it */
            errors++;
            continue;
        }
        sent += n;
    }
    double elapsed = now() - start;
    printf("\"sent\": %ld, \"send_seconds\": %.6f, \"send_pps\": %.0f, \"send_errors\": %ld", sent, elapsed,
           sent / (elapsed > 0 ? elapsed : 1e-9), errors);
    return 0;
}


static int bound_socket(const char *host, const char *port)
{
    struct sockaddr_storage addr;
    socklen_t addr_len;
    if (resolve(host, port, &addr, &addr_len) < 0)
        return -1;
    int fd = socket(addr.ss_family, SOCK_DGRAM, 0);
    int rcvbuf = 64 << 20;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf);
    if (fd < 0 || bind(fd, (struct sockaddr *)&addr, addr_len) < 0) {
        perror("socket/bind");
        return -1;
    }
    return fd;
}

static void sink_loop(int fd, int idle_ms, double seconds)
{
    size_t seen_cap = 1 << 20;
    unsigned char *seen = calloc(seen_cap, 1);
    long received = 0, duplicates = 0;
    double first = 0, last = 0, deadline = now() + seconds;
    static char buf[BURST][2048];
    struct mmsghdr msgs[BURST];
    struct iovec iov[BURST];
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < BURST; i++) {
        iov[i].iov_base = buf[i];
        iov[i].iov_len = sizeof buf[i];
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    while (now() < deadline) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int wait = received ? idle_ms : (int)((deadline - now()) * 1000) + 1;
        if (poll(&p, 1, wait) <= 0)
            break;
        int n = recvmmsg(fd, msgs, BURST, MSG_DONTWAIT, NULL);
        if (n <= 0)
            continue;
        last = now();
        if (!received)
            first = last;
        for (int i = 0; i < n; i++) {
            uint64_t seq;
            memcpy(&seq, buf[i], sizeof seq);
            if (seq >= seen_cap) {
                size_t cap = seen_cap;
                while (seq >= cap)
                    cap *= 2;
                seen = realloc(seen, cap);
                memset(seen + seen_cap, 0, cap - seen_cap);
                seen_cap = cap;
            }
            duplicates += seen[seq];
            seen[seq] = 1;
        }
        received += n;
        atomic_store(&sink_received, received);
    }
    double span = last - first;
    printf("\"received\": %ld, \"duplicates\": %ld, \"seconds\": %.6f, \"pps\": %.0f", received, duplicates,
           span, span > 0 ? received / span : 0.0);
    free(seen);
}

static int do_sink(const char *host, const char *port, int idle_ms, double seconds)
{
    int fd = bound_socket(host, port);
    if (fd < 0)
        return 2;
    printf("{\"ready\": true}\n");
    fflush(stdout);
    printf("{");
    sink_loop(fd, idle_ms, seconds);
    printf("}\n");
    return 0;
}

struct sink_args {
    int fd, idle_ms;
};

static void *sink_thread(void *arg)
{
    struct sink_args *a = arg;
    sink_loop(a->fd, a->idle_ms, 120.0);
    return NULL;
}

static int do_run(const char *host, const char *port, long count, long window, int size, int idle_ms,
                  const char *sink_port)
{
    struct sink_args args = {bound_socket(host, sink_port), idle_ms};
    if (args.fd < 0)
        return 2;
    pthread_t sink;
    pthread_create(&sink, NULL, sink_thread, &args);
    printf("{");
    int rc = do_send(host, port, count, size, 60.0, window);
    printf(", ");
    pthread_join(sink, NULL);
    printf("}\n");
    return rc;
}

int main(int argc, char **argv)
{
    if (argc >= 5 && !strcmp(argv[1], "send")) {
        printf("{");
        int rc = do_send(argv[2], argv[3], atol(argv[4]), argc > 5 ? atoi(argv[5]) : 64,
                         argc > 6 ? atof(argv[6]) : 30.0, 0);
        printf("}\n");
        return rc;
    }
    if (argc >= 6 && !strcmp(argv[1], "run"))
        return do_run(argv[2], argv[3], atol(argv[4]), atol(argv[5]), argc > 6 ? atoi(argv[6]) : 64,
                      argc > 7 ? atoi(argv[7]) : 1000, argc > 8 ? argv[8] : argv[3]);
    if (argc >= 4 && !strcmp(argv[1], "sink"))
        return do_sink(argv[2], argv[3], argc > 4 ? atoi(argv[4]) : 1000, argc > 5 ? atof(argv[5]) : 60.0);
    fprintf(stderr, "usage: udp_flood send HOST PORT COUNT [SIZE] [SECONDS]\n"
                    "       udp_flood sink HOST PORT [IDLE_MS] [SECONDS]\n"
                    "       udp_flood run HOST PORT COUNT WINDOW [SIZE] [IDLE_MS] [SINK_PORT]\n");
    return 2;
}
