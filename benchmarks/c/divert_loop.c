/* The backend's own limit: a divert loop with no Python in it.
 *
 *   divert_loop LIBEBPFDIVERT FILTER MODE BATCH EXPECTED [IDLE_MS=1000] [QUEUE_LENGTH]
 *
 * MODE "pass": open a handle on FILTER, ebpfdivert_recv_ex up to BATCH packets,
 * ebpfdivert_send_ex them back unchanged. MODE "sniff": a SNIFF handle, receive
 * only. Stops after EXPECTED packets or IDLE_MS without one (after the first).
 * Prints one JSON object; the rate runs from the first to the last packet received,
 * so waiting for traffic or for the idle timeout is not counted.
 *
 * The library is dlopen'ed from pydivert's install, like oisp does. Signatures as
 * in pydivert/bpf/__init__.py; functions return a negative errno. The recv_ex
 * address-length argument is a COUNT of addresses (not bytes as on Windows),
 * in/out, so it is reset before every call.
 */
#include <dlfcn.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define ADDRESS_SIZE 80
#define FLAG_SNIFF 1
#define PARAM_QUEUE_LENGTH 0

struct open_opts {
    size_t sz;
    char **ifnames;
    uint32_t ring_bytes;
};

typedef void *(*open_fn)(const char *, int, int16_t, uint64_t, struct open_opts *);
typedef int (*recv_ex_fn)(void *, void *, uint32_t, uint32_t *, void *, uint32_t *, int);
typedef int (*send_ex_fn)(void *, const void *, uint32_t, uint32_t *, const void *, uint32_t);
typedef int (*handle_fn)(void *);
typedef int (*set_param_fn)(void *, int, uint64_t);

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *need(void *lib, const char *name)
{
    void *fn = dlsym(lib, name);
    if (!fn) {
        fprintf(stderr, "%s: %s\n", name, dlerror());
        exit(2);
    }
    return fn;
}

int main(int argc, char **argv)
{
    if (argc < 6) {
        fprintf(stderr, "usage: divert_loop LIB FILTER pass|sniff BATCH EXPECTED [IDLE_MS] [QUEUE_LENGTH]\n");
        return 2;
    }
    const char *filter = argv[2];
    int sniff = !strcmp(argv[3], "sniff");
    uint32_t batch = (uint32_t)atoi(argv[4]);
    long expected = atol(argv[5]);
    int idle_ms = argc > 6 ? atoi(argv[6]) : 1000;
    long queue_length = argc > 7 ? atol(argv[7]) : 0;
    if (batch < 1 || batch > 255) {
        fprintf(stderr, "BATCH must be 1..255\n");
        return 2;
    }

    void *lib = dlopen(argv[1], RTLD_NOW);
    if (!lib) {
        fprintf(stderr, "%s\n", dlerror());
        return 2;
    }
    open_fn divert_open = (open_fn)need(lib, "ebpfdivert_open");
    recv_ex_fn recv_ex = (recv_ex_fn)need(lib, "ebpfdivert_recv_ex");
    send_ex_fn send_ex = (send_ex_fn)need(lib, "ebpfdivert_send_ex");
    handle_fn divert_close = (handle_fn)need(lib, "ebpfdivert_close");
    set_param_fn set_param = (set_param_fn)need(lib, "ebpfdivert_set_param");

    struct open_opts opts = {.sz = sizeof opts};
    void *handle = divert_open(filter, 0, 0, sniff ? FLAG_SNIFF : 0, &opts);
    if (!handle) {
        fprintf(stderr, "ebpfdivert_open: %s\n", strerror(errno));
        return 1;
    }
    if (queue_length && set_param(handle, PARAM_QUEUE_LENGTH, (uint64_t)queue_length) < 0)
        fprintf(stderr, "set_param QUEUE_LENGTH %ld failed\n", queue_length);
    printf("{\"ready\": true}\n");
    fflush(stdout);

    uint32_t buf_len = batch * 65575u;
    unsigned char *buf = malloc(buf_len);
    unsigned char *addrs = calloc(batch, ADDRESS_SIZE);
    long packets = 0, batches = 0, send_errors = 0;
    double first = 0, last = 0;
    while (packets < expected) {
        uint32_t recv_len = 0, count = batch; /* a COUNT, reset every call */
        int ret = recv_ex(handle, buf, buf_len, &recv_len, addrs, &count, packets ? idle_ms : 30000);
        if (ret < 0) {
            if (ret == -EAGAIN || ret == -ETIMEDOUT)
                break;
            fprintf(stderr, "recv_ex: %s\n", strerror(-ret));
            break;
        }
        last = now();
        if (!packets)
            first = last;
        if (!sniff) {
            uint32_t sent_len = 0;
            if (send_ex(handle, buf, recv_len, &sent_len, addrs, count) < 0)
                send_errors += count;
        }
        packets += count;
        batches++;
    }
    divert_close(handle);
    double span = last - first;
    printf("{\"packets\": %ld, \"batches\": %ld, \"send_errors\": %ld, \"seconds\": %.6f, \"pps\": %.0f}\n",
           packets, batches, send_errors, span, span > 0 ? packets / span : 0.0);
    return 0;
}
