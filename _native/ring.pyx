# cython: language_level=3
"""The receive ring: a thread that receives batches from a divert handle into
preallocated slots without holding the GIL, and hands them to one consumer.

Slots cycle FREE -> (receiver fills) -> READY -> (consumer takes) -> HELD ->
(consumer commits or releases) -> FREE. The receiver runs entirely in C
(`run()` drops the GIL for its whole life); Python only touches a slot while
the consumer holds it. One mutex + condition variable guard the two queues.

When no slot is free the policy decides: BLOCK waits (the kernel queue absorbs
the burst, then the kernel drops), DROP receives into a scratch slot and
counts what it throws away.
"""

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memmove

import os

import numpy as np

cdef extern from "divert_calls.h" nogil:
    int OISP_DIVERT_TIMEOUT
    int OISP_ADDRESS_SIZE
    int oisp_divert_recv(int kind, void *fn, void *handle, void *buf, uint32_t buf_len,
                         void *addrs, uint32_t max_addrs, int timeout_ms,
                         uint32_t *out_bytes, uint32_t *out_count)
    int oisp_divert_send(int kind, void *fn, void *handle, const void *buf, uint32_t buf_len,
                         const void *addrs, uint32_t count, uint32_t *out_bytes)

cdef extern from "tcp_segment.h" nogil:
    uint32_t oisp_segmented_size(const unsigned char *pkt, uint32_t len, uint32_t mtu, uint32_t *pieces)
    uint32_t oisp_tcp_segment(const unsigned char *pkt, uint32_t len, uint32_t mtu, unsigned char *out,
                              uint32_t *lengths)

cdef extern from "reflect_fast.h" nogil:
    enum:
        OISP_FAST_SLOW
        OISP_FAST_PASS
        OISP_FAST_TO_PROXY
        OISP_FAST_TO_CLIENT
        OISP_FAST_PASS_OTHER
    enum:
        OISP_FAST_OPENED_MAX
        OISP_FAST_CLOSED
        OISP_FAST_FIN_CLIENT
        OISP_FAST_FIN_PROXY
        OISP_FAST_RST
        OISP_OWN_IPV4
        OISP_OWN_IPV6
    uint32_t OISP_FAST_OUTBOUND_BIT
    ctypedef struct oisp_fast_flow:
        uint8_t addr[16]
        uint16_t client_port
        uint16_t proxy_port
        uint8_t used
        uint8_t touched
        uint8_t ends
        uint8_t closed
    ctypedef struct oisp_fast_opened:
        uint8_t server[16]
        uint8_t client[16]
        uint16_t client_port
        uint16_t proxy_port
        uint16_t server_port
        uint8_t v6
        int64_t created_ns
    ctypedef struct oisp_fast_counts:
        uint64_t to_proxy, to_client, passed, passed_other, batches
        int send_error
    ctypedef struct oisp_fast_table:
        const uint8_t *own_port
        uint16_t proxy_for[65536]
        uint16_t server_for[65536]
        uint8_t any_dst[65536]
        oisp_fast_flow *slots
        uint32_t mask
        uint32_t count
        uint8_t targets_on
        uint8_t open_syns
        oisp_fast_opened opened[OISP_FAST_OPENED_MAX]
        uint32_t opened_head
        uint32_t opened_len
        uint64_t opened_total
        int guard_fd
        oisp_fast_counts counts
        uint32_t targets
        uint8_t targets_failed
    oisp_fast_table *oisp_fast_new(uint32_t max_flows)
    void oisp_fast_free(oisp_fast_table *t)
    int oisp_fast_add(oisp_fast_table *t, const uint8_t *addr, uint16_t client_port, uint16_t proxy_port)
    int oisp_fast_remove(oisp_fast_table *t, const uint8_t *addr, uint16_t client_port, uint16_t proxy_port)
    oisp_fast_flow *oisp_fast_find(oisp_fast_table *t, const uint8_t *addr, uint16_t client_port,
                                   uint16_t proxy_port)
    int oisp_fast_classify(oisp_fast_table *t, const unsigned char *p, uint32_t len, const unsigned char *address,
                           uint16_t *port_out)
    void oisp_fast_reflect(unsigned char *p, uint32_t len, unsigned char *address, int action, uint16_t port)

cdef extern from "ring_sync.h" nogil:
    ctypedef struct oisp_sync:
        pass
    void oisp_sync_init(oisp_sync *s)
    void oisp_sync_destroy(oisp_sync *s)
    void oisp_lock(oisp_sync *s)
    void oisp_unlock(oisp_sync *s)
    void oisp_broadcast(oisp_sync *s)
    void oisp_wait(oisp_sync *s, int ms)

cdef enum:
    HOLD_FREE = 0  # free, being filled, or ready: the consumer has not taken it
    HOLD_TAKEN = 1
    HOLD_COMMITTING = 2  # commit() is injecting it
    C_POLICY_BLOCK = 0
    C_POLICY_DROP = 1
    C_VERDICT_PASS = 0
    C_VERDICT_DROP = 1
    C_VERDICT_MODIFIED = 2
    # How long one blocking receive may wait before the loop looks at its stop flag.
    POLL_MS = 100
    MAX_IFIDX = 1024

POLICY_BLOCK = C_POLICY_BLOCK
POLICY_DROP = C_POLICY_DROP
VERDICT_PASS = C_VERDICT_PASS
VERDICT_DROP = C_VERDICT_DROP
VERDICT_MODIFIED = C_VERDICT_MODIFIED
TIMEOUT = OISP_DIVERT_TIMEOUT


cdef void split_packets(const unsigned char *buf, uint32_t nbytes, uint32_t count,
                        uint32_t *offsets, uint32_t *lengths) noexcept nogil:
    """Packet boundaries from each IP header's length. A packet whose length
    cannot be trusted takes the rest of the buffer; those after it are empty."""
    cdef uint32_t i, offset = 0, length, remaining
    for i in range(count):
        remaining = nbytes - offset if offset < nbytes else 0
        length = 0
        if remaining >= 20 and buf[offset] >> 4 == 4:
            length = (<uint32_t>buf[offset + 2] << 8) | buf[offset + 3]
        elif remaining >= 40 and buf[offset] >> 4 == 6:
            length = 40 + ((<uint32_t>buf[offset + 4] << 8) | buf[offset + 5])
        if length < 20 or length > remaining:
            length = remaining
        offsets[i] = offset
        lengths[i] = length
        offset += length


def recv_batch(int kind, uintptr_t fn, uintptr_t handle, unsigned char[::1] buf, unsigned char[::1] addrs,
               uint32_t max_addrs, int timeout_ms):
    """One batched receive, GIL released: (error, bytes, count). error is 0, TIMEOUT or a code."""
    if <size_t>max_addrs * OISP_ADDRESS_SIZE > <size_t>addrs.shape[0]:
        raise ValueError("the address array is smaller than the batch")
    cdef uint32_t nbytes = 0, count = 0
    cdef int err
    with nogil:
        err = oisp_divert_recv(kind, <void *>fn, <void *>handle, &buf[0], <uint32_t>buf.shape[0],
                               &addrs[0], max_addrs, timeout_ms, &nbytes, &count)
    return err, nbytes, count


def send_batch(int kind, uintptr_t fn, uintptr_t handle, const unsigned char[::1] buf, uint32_t nbytes,
               const unsigned char[::1] addrs, uint32_t count):
    """One batched inject, GIL released: (error, bytes sent)."""
    if nbytes > buf.shape[0] or <size_t>count * OISP_ADDRESS_SIZE > <size_t>addrs.shape[0]:
        raise ValueError("the batch is larger than its buffers")
    cdef uint32_t sent = 0
    cdef int err
    with nogil:
        err = oisp_divert_send(kind, <void *>fn, <void *>handle, &buf[0], nbytes, &addrs[0], count, &sent)
    return err, sent


cdef class ReceiveRing:
    cdef:
        int kind
        void *recv_fn
        void *send_fn
        void *handle
        readonly int nslots, batch, policy
        readonly uint32_t slot_bytes
        readonly object data, addresses, offsets, lengths, nbytes, counts, verdicts
        unsigned char *data_p
        unsigned char *addr_p
        uint32_t *offsets_p
        uint32_t *lengths_p
        uint32_t *nbytes_p
        uint32_t *counts_p
        uint8_t *verdicts_p
        unsigned char[::1] scratch
        unsigned char[::1] scratch_addresses
        unsigned char[::1] send_buf
        unsigned char[::1] send_addresses
        uint32_t[::1] piece_lengths
        uint32_t mtu_by_ifidx[MAX_IFIDX]
        oisp_sync sync
        oisp_sync send_sync  # one injection at a time: the receiver (fast path, drain) and commit() both send
        int *free_stack
        int free_top
        int *ready
        int ready_head, ready_len
        int held
        uint8_t *holding  # per slot: HOLD_* (only HOLD_TAKEN slots may be handed back)
        bint stopping, draining, running
        readonly int error
        readonly uint64_t segmented
        readonly uint64_t received, dropped_overflow, dropped_drain, drained, sent, dropped_verdict, \
            send_errors, consumed, high_water, batches, releases
        object _free_stack_arr, _ready_arr, _holding_arr
        oisp_fast_table *fast_table  # the fast path's (see FastPath), NULL until enable_fast()
        object _fast_own_ports

    def __cinit__(self, int kind, uintptr_t recv_fn, uintptr_t send_fn, uintptr_t handle, *, int nslots=16,
                  int batch=255, uint32_t slot_bytes=0, int policy=C_POLICY_BLOCK):
        if not 1 <= batch <= 255:
            raise ValueError("batch must be 1..255")
        if nslots < 2:
            raise ValueError("a ring needs at least 2 slots")
        if slot_bytes == 0:
            slot_bytes = 65575 * 4  # several full-size packets, or a full batch of small ones
        self.kind, self.recv_fn, self.send_fn, self.handle = kind, <void *>recv_fn, <void *>send_fn, <void *>handle
        self.nslots, self.batch, self.slot_bytes, self.policy = nslots, batch, slot_bytes, policy
        self.data = np.zeros((nslots, slot_bytes), dtype=np.uint8)
        self.addresses = np.zeros((nslots, batch * OISP_ADDRESS_SIZE), dtype=np.uint8)
        self.offsets = np.zeros((nslots, batch), dtype=np.uint32)
        self.lengths = np.zeros((nslots, batch), dtype=np.uint32)
        self.nbytes = np.zeros(nslots, dtype=np.uint32)
        self.counts = np.zeros(nslots, dtype=np.uint32)
        self.verdicts = np.zeros((nslots, batch), dtype=np.uint8)
        self.scratch = np.zeros(slot_bytes, dtype=np.uint8)
        self.scratch_addresses = np.zeros(batch * OISP_ADDRESS_SIZE, dtype=np.uint8)
        self.send_buf = np.zeros(65575 * 2, dtype=np.uint8)
        self.send_addresses = np.zeros(255 * OISP_ADDRESS_SIZE, dtype=np.uint8)
        self.piece_lengths = np.zeros(65536, dtype=np.uint32)
        cdef int k
        for k in range(MAX_IFIDX):
            self.mtu_by_ifidx[k] = 0
        self._free_stack_arr = np.arange(nslots, dtype=np.intc)[::-1].copy()
        self._ready_arr = np.zeros(nslots, dtype=np.intc)
        self._holding_arr = np.zeros(nslots, dtype=np.uint8)
        cdef unsigned char[:, ::1] d = self.data
        cdef unsigned char[:, ::1] a = self.addresses
        cdef uint32_t[:, ::1] o = self.offsets
        cdef uint32_t[:, ::1] l = self.lengths
        cdef uint32_t[::1] nb = self.nbytes
        cdef uint32_t[::1] c = self.counts
        cdef uint8_t[:, ::1] v = self.verdicts
        cdef int[::1] fs = self._free_stack_arr
        cdef int[::1] rq = self._ready_arr
        cdef uint8_t[::1] hold = self._holding_arr
        self.data_p, self.addr_p, self.offsets_p, self.lengths_p = &d[0, 0], &a[0, 0], &o[0, 0], &l[0, 0]
        self.nbytes_p, self.counts_p, self.verdicts_p = &nb[0], &c[0], &v[0, 0]
        self.free_stack, self.ready, self.holding = &fs[0], &rq[0], &hold[0]
        self.free_top = nslots
        # Running from birth: a consumer that asks before the receiver thread is scheduled
        # must wait for it, not conclude the ring has already stopped.
        self.running = True
        oisp_sync_init(&self.sync)
        oisp_sync_init(&self.send_sync)

    def __dealloc__(self):
        oisp_fast_free(self.fast_table)  # closes the guardian's pipe too
        oisp_sync_destroy(&self.sync)
        oisp_sync_destroy(&self.send_sync)

    # -- the reflector's fast path (see reflect_fast.h) -----------------------------
    def enable_fast(self, ports, own_ports, uint32_t max_flows, any_address=()):
        """Let the receiver reflect packets of known flows itself; returns the FastPath
        (then also `fast`). `ports` maps server port -> proxy port; `own_ports` is a
        65536-byte array (uint8) of the proxy's upstream ports, FastPath.OWN_IPV4 | OWN_IPV6
        each (OwnPorts.mask), read live (kept alive here). The server ports in
        `any_address` take every destination (the divert filter scopes them), not only
        the AI addresses."""
        own = np.ascontiguousarray(own_ports).view(np.uint8)
        if own.shape != (65536,):
            raise ValueError("own_ports must hold 65536 entries")
        if self.fast_table != NULL:
            raise ValueError("the fast path is already enabled")
        cdef oisp_fast_table *t = oisp_fast_new(max_flows)
        if t == NULL:
            raise MemoryError()
        cdef const uint8_t[::1] own_view = own
        t.own_port = &own_view[0]
        for server, proxy in ports.items():
            if not (0 < server < 65536 and 0 < proxy < 65536):
                oisp_fast_free(t)
                raise ValueError(f"bad port pair {server} -> {proxy}")
            t.proxy_for[server] = proxy
            t.server_for[proxy] = server
        for server in any_address:
            if not (0 < server < 65536 and t.proxy_for[server]):
                oisp_fast_free(t)
                raise ValueError(f"port {server} takes any address but is not redirected")
            t.any_dst[server] = 1
        self._fast_own_ports = own
        with nogil:
            oisp_lock(&self.sync)
            self.fast_table = t
            oisp_unlock(&self.sync)
        return FastPath(self)

    @property
    def fast(self):
        """The fast path (a FastPath), None until enable_fast()."""
        return None if self.fast_table == NULL else FastPath(self)

    cdef bint _fast_batch(self, int slot, uint32_t nbytes, uint32_t count) noexcept nogil:
        """With the lock held: if every packet of the slot is decided here, rewrite and
        inject them (the lock is released meanwhile), free the slot and return True."""
        cdef uint32_t *offsets = self.offsets_p + <size_t>slot * self.batch
        cdef uint32_t *lengths = self.lengths_p + <size_t>slot * self.batch
        cdef unsigned char *buf = self.data_p + <size_t>slot * self.slot_bytes
        cdef unsigned char *addrs = self.addr_p + <size_t>slot * self.batch * OISP_ADDRESS_SIZE
        cdef uint8_t actions[255]
        cdef uint16_t ports[255]
        cdef uint32_t i, to_proxy = 0, to_client = 0, passed = 0, passed_other = 0, mtu
        cdef bint oversize = False
        cdef int err
        cdef uint64_t opened_before = self.fast_table.opened_total
        for i in range(count):
            actions[i] = oisp_fast_classify(self.fast_table, buf + offsets[i], lengths[i],
                                            addrs + i * OISP_ADDRESS_SIZE, &ports[i])
            if actions[i] == OISP_FAST_SLOW:
                return False
        oisp_unlock(&self.sync)
        for i in range(count):
            if actions[i] == OISP_FAST_PASS:
                passed += 1
            elif actions[i] == OISP_FAST_PASS_OTHER:
                passed_other += 1
            else:
                oisp_fast_reflect(buf + offsets[i], lengths[i], addrs + i * OISP_ADDRESS_SIZE, actions[i], ports[i])
                if actions[i] == OISP_FAST_TO_PROXY:
                    to_proxy += 1
                else:
                    to_client += 1
            mtu = self._mtu_of(addrs + i * OISP_ADDRESS_SIZE)
            if mtu and lengths[i] > mtu:
                oversize = True
        err = self._inject(buf, nbytes, offsets, lengths, addrs, count, oversize)
        oisp_lock(&self.sync)
        if err == 0:
            self.sent += count
        else:
            self.send_errors += count
            self.fast_table.counts.send_error = err
        self.fast_table.counts.to_proxy += to_proxy
        self.fast_table.counts.to_client += to_client
        self.fast_table.counts.passed += passed
        self.fast_table.counts.passed_other += passed_other
        self.fast_table.counts.batches += 1
        # Only this thread waits for free slots, and waking the consumer (blocked in take())
        # for a batch it never sees would cost it the GIL each time: it is woken only to
        # adopt flows opened here.
        self.free_stack[self.free_top] = slot
        self.free_top += 1
        if self.fast_table.opened_total != opened_before:
            oisp_broadcast(&self.sync)
        return True

    # -- receiver side (its own thread) ------------------------------------------
    def run(self):
        """The receive loop. Returns when stopped, or on a backend error (see `error`)."""
        cdef int slot, err
        cdef uint32_t nbytes, count
        cdef unsigned char *buf
        cdef unsigned char *addrs
        with nogil:
            while True:
                oisp_lock(&self.sync)
                if self.stopping:
                    oisp_unlock(&self.sync)
                    break
                while self.free_top == 0 and self.policy == C_POLICY_BLOCK and not self.stopping \
                        and not self.draining:
                    oisp_wait(&self.sync, POLL_MS)
                if self.stopping:
                    oisp_unlock(&self.sync)
                    break
                slot = -1
                if self.free_top > 0 and not self.draining:
                    self.free_top -= 1
                    slot = self.free_stack[self.free_top]
                oisp_unlock(&self.sync)

                if slot >= 0:
                    buf = self.data_p + <size_t>slot * self.slot_bytes
                    addrs = self.addr_p + <size_t>slot * self.batch * OISP_ADDRESS_SIZE
                else:  # ring full under DROP, or draining: receive into the scratch slot
                    buf = &self.scratch[0]
                    addrs = &self.scratch_addresses[0]
                err = oisp_divert_recv(self.kind, self.recv_fn, self.handle, buf, self.slot_bytes,
                                       addrs, self.batch, POLL_MS, &nbytes, &count)

                oisp_lock(&self.sync)
                if err != 0 or count == 0:
                    if slot >= 0:
                        self.free_stack[self.free_top] = slot
                        self.free_top += 1
                    if err != 0 and err != OISP_DIVERT_TIMEOUT:
                        self.error = err
                        oisp_broadcast(&self.sync)
                        oisp_unlock(&self.sync)
                        break
                    if err == OISP_DIVERT_TIMEOUT and self.draining:
                        oisp_broadcast(&self.sync)
                        oisp_unlock(&self.sync)
                        break  # drained: the kernel queue is empty
                    oisp_unlock(&self.sync)
                    continue
                self.received += count
                self.batches += 1
                if slot < 0:
                    if self.draining and self.send_fn != NULL:
                        # Stopping: pass what was still queued straight through.
                        oisp_unlock(&self.sync)
                        err = self._inject(buf, nbytes, NULL, NULL, addrs, count, False)
                        oisp_lock(&self.sync)
                        if err == 0:
                            self.drained += count
                        else:
                            self.dropped_drain += count
                    elif self.draining:
                        self.dropped_drain += count
                    else:
                        self.dropped_overflow += count
                    oisp_unlock(&self.sync)
                    continue
                split_packets(buf, nbytes, count, self.offsets_p + <size_t>slot * self.batch,
                              self.lengths_p + <size_t>slot * self.batch)
                if self.fast_table != NULL and self._fast_batch(slot, nbytes, count):
                    oisp_unlock(&self.sync)
                    continue
                self.nbytes_p[slot] = nbytes
                self.counts_p[slot] = count
                self.ready[(self.ready_head + self.ready_len) % self.nslots] = slot
                self.ready_len += 1
                if <uint64_t>(self.ready_len + self.held) > self.high_water:
                    self.high_water = self.ready_len + self.held
                oisp_broadcast(&self.sync)
                oisp_unlock(&self.sync)
            oisp_lock(&self.sync)
            self.running = False
            oisp_broadcast(&self.sync)
            oisp_unlock(&self.sync)

    # -- consumer side ----------------------------------------------------------
    def take(self, int timeout_ms=-1):
        """The next ready slot, or -1 on timeout or when the ring has stopped and is empty.
        A take with a timeout also returns -1 when woken: by wake(), or by flows the fast
        path opened (FastPath.take_opened)."""
        cdef int slot = -1
        with nogil:
            oisp_lock(&self.sync)
            while self.ready_len == 0 and self.running and not self.stopping and timeout_ms != 0:
                oisp_wait(&self.sync, timeout_ms if timeout_ms > 0 else POLL_MS)
                if timeout_ms > 0:
                    break
            if self.ready_len > 0:
                slot = self.ready[self.ready_head]
                self.ready_head = (self.ready_head + 1) % self.nslots
                self.ready_len -= 1
                self.held += 1
                self.holding[slot] = HOLD_TAKEN
                memset_verdicts(self.verdicts_p + <size_t>slot * self.batch, self.batch)
            oisp_unlock(&self.sync)
        return slot

    def release_consumed(self, int slot):
        """A sniffed batch the consumer is done with."""
        self._check_slot(slot)
        cdef bint held
        with nogil:
            oisp_lock(&self.sync)
            held = self.holding[slot] == HOLD_TAKEN
            if held:
                self.consumed += self.counts_p[slot]
                self._give_back(slot)
            oisp_unlock(&self.sync)
        if not held:
            self._not_held(slot)

    def release_dropped(self, int slot):
        """A diverted batch the consumer decided not to re-inject."""
        self._check_slot(slot)
        cdef bint held
        with nogil:
            oisp_lock(&self.sync)
            held = self.holding[slot] == HOLD_TAKEN
            if held:
                self.dropped_verdict += self.counts_p[slot]
                self._give_back(slot)
            oisp_unlock(&self.sync)
        if not held:
            self._not_held(slot)

    def set_mtu(self, uint32_t ifidx, uint32_t mtu):
        """Packets leaving through `ifidx` larger than `mtu` are TCP-segmented before injection.
        An interface with no MTU set is never segmented."""
        if ifidx >= MAX_IFIDX:
            raise ValueError(f"interface index {ifidx} is beyond {MAX_IFIDX - 1}")
        self.mtu_by_ifidx[ifidx] = mtu

    cdef inline uint32_t _mtu_of(self, const unsigned char *address) noexcept nogil:
        cdef uint32_t ifidx = (<const uint32_t *>(address + 16))[0]  # Network.IfIdx
        return self.mtu_by_ifidx[ifidx] if ifidx < MAX_IFIDX else 0

    def commit(self, int slot):
        """Inject the slot's packets whose verdict is not DROP (in order), then free the slot.
        Returns the number of packets injected, or -error; a failed inject is counted in
        send_errors."""
        self._check_slot(slot)
        cdef uint32_t count = self.counts_p[slot], i, kept = 0, write = 0, length, mtu
        cdef uint32_t *offsets = self.offsets_p + <size_t>slot * self.batch
        cdef uint32_t *lengths = self.lengths_p + <size_t>slot * self.batch
        cdef uint8_t *verdicts = self.verdicts_p + <size_t>slot * self.batch
        cdef unsigned char *buf = self.data_p + <size_t>slot * self.slot_bytes
        cdef unsigned char *addrs = self.addr_p + <size_t>slot * self.batch * OISP_ADDRESS_SIZE
        cdef int err = 0
        cdef bint oversize = False, held
        with nogil:  # the slot is ours alone from here: a second commit or release is refused
            oisp_lock(&self.sync)
            held = self.holding[slot] == HOLD_TAKEN
            if held:
                self.holding[slot] = HOLD_COMMITTING
            oisp_unlock(&self.sync)
        if not held:
            self._not_held(slot)
        with nogil:
            for i in range(count):
                if verdicts[i] == C_VERDICT_DROP:
                    continue
                mtu = self._mtu_of(addrs + i * OISP_ADDRESS_SIZE)
                if mtu and lengths[i] > mtu:
                    oversize = True
                length = lengths[i]
                if offsets[i] != write:  # compact the kept packets to the front, in place
                    memmove(buf + write, buf + offsets[i], length)
                    offsets[kept] = write
                if kept != i:
                    memmove(addrs + kept * OISP_ADDRESS_SIZE, addrs + i * OISP_ADDRESS_SIZE, OISP_ADDRESS_SIZE)
                lengths[kept] = length
                write += length
                kept += 1
            if kept > 0:
                err = self._inject(buf, write, offsets, lengths, addrs, kept, oversize)
            oisp_lock(&self.sync)
            if err == 0:
                self.sent += kept
            else:
                self.send_errors += kept
            self.dropped_verdict += count - kept
            self._give_back(slot)
            oisp_unlock(&self.sync)
        if err != 0:
            return -err
        return kept

    cdef int _inject(self, unsigned char *buf, uint32_t nbytes, uint32_t *offsets, uint32_t *lengths,
                     unsigned char *addrs, uint32_t count, bint oversize) noexcept nogil:
        """Inject `count` contiguous packets (segmenting oversize ones). Serialised: the
        segmenting path shares one send buffer, and the backend's send is not promised to
        be thread-safe."""
        cdef uint32_t sent = 0
        cdef int err
        oisp_lock(&self.send_sync)
        if oversize:
            err = self._send_segmented(buf, offsets, lengths, addrs, count)
        else:
            err = oisp_divert_send(self.kind, self.send_fn, self.handle, buf, nbytes, addrs, count, &sent)
        oisp_unlock(&self.send_sync)
        return err

    cdef int _send_segmented(self, unsigned char *buf, uint32_t *offsets, uint32_t *lengths,
                             unsigned char *addrs, uint32_t count) noexcept nogil:
        """Inject `count` packets, splitting those larger than their interface's MTU;
        pieces are gathered in the send buffer and injected up to 255 at a time."""
        cdef uint32_t i, j, mtu, pieces, size, used = 0, naddr = 0, sent
        cdef uint32_t capacity = <uint32_t>self.send_buf.shape[0]
        cdef unsigned char *out = &self.send_buf[0]
        cdef unsigned char *out_addrs = &self.send_addresses[0]
        cdef const unsigned char *pkt
        cdef int err = 0, first_err = 0
        for i in range(count):
            pkt = buf + offsets[i]
            mtu = self._mtu_of(addrs + i * OISP_ADDRESS_SIZE)
            size = lengths[i]
            pieces = 1
            if mtu and size > mtu:
                size = oisp_segmented_size(pkt, lengths[i], mtu, &pieces)
                if pieces > 255:  # an absurdly small MTU: inject whole and let the backend say no
                    size, pieces = lengths[i], 1
            if naddr + pieces > 255 or used + size > capacity:
                if naddr > 0:
                    err = oisp_divert_send(self.kind, self.send_fn, self.handle, out, used, out_addrs, naddr, &sent)
                    if err and not first_err:
                        first_err = err
                used, naddr = 0, 0
            if pieces > 1:
                pieces = oisp_tcp_segment(pkt, lengths[i], mtu, out + used, &self.piece_lengths[0])
                self.segmented += 1
                for j in range(pieces):
                    memmove(out_addrs + (naddr + j) * OISP_ADDRESS_SIZE, addrs + i * OISP_ADDRESS_SIZE,
                            OISP_ADDRESS_SIZE)
            else:
                memmove(out + used, pkt, size)
                memmove(out_addrs + naddr * OISP_ADDRESS_SIZE, addrs + i * OISP_ADDRESS_SIZE, OISP_ADDRESS_SIZE)
            used += size
            naddr += pieces
        if naddr > 0:
            err = oisp_divert_send(self.kind, self.send_fn, self.handle, out, used, out_addrs, naddr, &sent)
            if err and not first_err:
                first_err = err
        return first_err

    cdef void _give_back(self, int slot) noexcept nogil:
        self.holding[slot] = HOLD_FREE
        self.free_stack[self.free_top] = slot
        self.free_top += 1
        self.held -= 1
        self.releases += 1
        oisp_broadcast(&self.sync)

    cdef int _check_slot(self, int slot) except -1:
        if not 0 <= slot < self.nslots:
            raise ValueError(f"no slot {slot}")
        return 0

    cdef int _not_held(self, int slot) except -1:
        # Handing back a slot the consumer does not hold would push it on the free stack
        # twice: the stack would run past its array and two batches would share a slot.
        raise ValueError(f"slot {slot} is not held by the consumer (never taken, or already handed back)")

    # -- control -----------------------------------------------------------------
    def drain(self):
        """Stop filling slots: pass what is still queued in the kernel straight
        through (divert) until a receive times out, then stop."""
        with nogil:
            oisp_lock(&self.sync)
            self.draining = True
            oisp_broadcast(&self.sync)
            oisp_unlock(&self.sync)

    def wake(self):
        """Return a consumer waiting in take() with a timeout at once (it gets -1), so it
        can attend to something else (the reflector's handle swap)."""
        with nogil:
            oisp_lock(&self.sync)
            oisp_broadcast(&self.sync)
            oisp_unlock(&self.sync)

    def stop(self):
        with nogil:
            oisp_lock(&self.sync)
            self.stopping = True
            oisp_broadcast(&self.sync)
            oisp_unlock(&self.sync)

    def wait_stopped(self, int timeout_ms):
        """Wait for the receive loop to exit; True if it has."""
        cdef bint running
        with nogil:
            oisp_lock(&self.sync)
            if self.running:
                oisp_wait(&self.sync, timeout_ms)
            running = self.running
            oisp_unlock(&self.sync)
        return not running

    def occupancy(self):
        """(ready, held) slot counts."""
        cdef int ready, held
        with nogil:
            oisp_lock(&self.sync)
            ready, held = self.ready_len, self.held
            oisp_unlock(&self.sync)
        return ready, held

    def held_packets(self):
        """Packets in READY or HELD slots."""
        cdef uint64_t total = 0
        with nogil:
            oisp_lock(&self.sync)
            total = self.received - self.sent - self.send_errors - self.dropped_verdict - self.consumed \
                - self.dropped_overflow - self.dropped_drain - self.drained
            oisp_unlock(&self.sync)
        return total


cdef inline void memset_verdicts(uint8_t *v, int n) noexcept nogil:
    cdef int i
    for i in range(n):
        v[i] = C_VERDICT_PASS


cdef class FastPath:
    """The reflector's fast path (reflect_fast.h): the flow and AI-address table the ring's
    receiver consults to reflect or pass a batch itself, without the GIL, and what it
    counted. A ring has at most one (ReceiveRing.enable_fast, then ReceiveRing.fast); the
    ring owns the table, this object keeps the ring alive, and every call takes the
    ring's lock, the one its receiver holds while it decides.

    The class attributes name the C constants, for Python and the tests to use rather
    than copy: the decisions of `decide`, the `ends` bits of `take_touched` and
    `take_ends`, the bits of the own-ports mask, the length of the opened queue, and
    the address bit it reads as "outbound"."""

    SLOW, PASS, TO_PROXY = OISP_FAST_SLOW, OISP_FAST_PASS, OISP_FAST_TO_PROXY
    TO_CLIENT, PASS_OTHER = OISP_FAST_TO_CLIENT, OISP_FAST_PASS_OTHER
    FIN_CLIENT, FIN_PROXY, RST = OISP_FAST_FIN_CLIENT, OISP_FAST_FIN_PROXY, OISP_FAST_RST
    OWN_IPV4, OWN_IPV6 = OISP_OWN_IPV4, OISP_OWN_IPV6
    OPENED_MAX = OISP_FAST_OPENED_MAX
    OUTBOUND = OISP_FAST_OUTBOUND_BIT  # the WINDIVERT_ADDRESS bit it reads (oisp.divert.address.OUTBOUND)

    cdef:
        readonly ReceiveRing ring
        oisp_fast_table *table
        oisp_sync *sync

    def __cinit__(self, ReceiveRing ring not None):
        if ring.fast_table == NULL:
            raise ValueError("the fast path is not enabled")
        self.ring, self.table, self.sync = ring, ring.fast_table, &ring.sync

    cdef int _key(self, const uint8_t[::1] key) except -1:
        if key.shape[0] != 16:
            raise ValueError("a flow key or target address is 16 bytes")
        return 0

    def add(self, const uint8_t[::1] key, uint16_t client_port, uint16_t proxy_port, bint reopen=False):
        """Known flow: (server address as 16 bytes, client port, proxy port). False if full.
        A flow already there keeps its state, unless `reopen` (Python opened a new
        connection on its port): then what the old one saw is forgotten."""
        self._key(key)
        cdef int added
        cdef oisp_fast_flow *f
        with nogil:
            oisp_lock(self.sync)
            added = oisp_fast_add(self.table, &key[0], client_port, proxy_port)
            if added == 0 and reopen:
                f = oisp_fast_find(self.table, &key[0], client_port, proxy_port)
                f.ends = 0
                f.closed = 0
            oisp_unlock(self.sync)
        return added >= 0

    def remove(self, const uint8_t[::1] key, uint16_t client_port, uint16_t proxy_port):
        self._key(key)
        cdef int removed
        with nogil:
            oisp_lock(self.sync)
            removed = oisp_fast_remove(self.table, &key[0], client_port, proxy_port)
            oisp_unlock(self.sync)
        return bool(removed)

    def add_targets(self, keys, bint enable=False):
        """AI addresses (16-byte keys). With `enable`, and while every target given so far
        fit, packets to any other address pass in C; once one did not fit (a full table),
        they never do again (Python decides, as without targets)."""
        cdef const uint8_t[::1] key
        cdef int added
        for k in keys:
            key = k
            self._key(key)
            with nogil:
                oisp_lock(self.sync)
                added = oisp_fast_add(self.table, &key[0], 0, 0)
                if added < 0:
                    self.table.targets_failed = 1
                    self.table.targets_on = 0
                elif added > 0:
                    self.table.targets += 1
                oisp_unlock(self.sync)
        if enable:
            with nogil:
                oisp_lock(self.sync)
                self.table.targets_on = not self.table.targets_failed
                oisp_unlock(self.sync)

    def take_touched(self):
        """[(key, ends)] of the flows that had packets through the fast path since the last
        call; `ends` holds FIN_CLIENT, FIN_PROXY and RST (a FIN from either side, a RST)."""
        touched = []
        cdef uint32_t i
        oisp_lock(self.sync)
        try:
            for i in range(self.table.mask + 1):
                if self.table.slots[i].used and self.table.slots[i].touched:
                    touched.append(((bytes(self.table.slots[i].addr[:16]), self.table.slots[i].client_port,
                                     self.table.slots[i].proxy_port), self.table.slots[i].ends))
                    self.table.slots[i].touched = 0
                    self.table.slots[i].ends = 0
        finally:
            oisp_unlock(self.sync)
        return touched

    def take_ends(self, const uint8_t[::1] key, uint16_t client_port, uint16_t proxy_port):
        """One flow's FIN/RST bits seen since they were last taken (0 if none, or unknown)."""
        self._key(key)
        cdef oisp_fast_flow *f
        cdef uint8_t ends = 0
        with nogil:
            oisp_lock(self.sync)
            f = oisp_fast_find(self.table, &key[0], client_port, proxy_port)
            if f != NULL:
                ends = f.ends
                f.ends = 0
            oisp_unlock(self.sync)
        return ends

    def open_syns(self, bint on=True):
        """Let the receiver open a flow itself on a client's SYN to an AI address (it
        needs the targets: add_targets(..., enable=True)); Python adopts them with
        take_opened(). Only without a process filter: a packet names no process."""
        with nogil:
            oisp_lock(self.sync)
            self.table.open_syns = on
            oisp_unlock(self.sync)

    def guard(self, fd):
        """The guardian's pipe (a descriptor the fast path now owns and closes; None: none):
        a flow opened on a SYN here is announced to it at once (see guardian.py)."""
        cdef int new_fd = -1 if fd is None else fd
        cdef int old_fd
        with nogil:
            oisp_lock(self.sync)
            old_fd = self.table.guard_fd
            self.table.guard_fd = new_fd
            oisp_unlock(self.sync)
        if old_fd >= 0:
            os.close(old_fd)

    @property
    def opened(self):
        """Flows the receiver has opened (all time), and those not yet taken: (total, pending)."""
        return self.table.opened_total, self.table.opened_len

    def take_opened(self):
        """The flows the receiver opened since the last call, oldest first: [(server key,
        client key, client port, proxy port, server port, IP version, created)], keys as
        16 bytes (IPv4 in the first 4), `created` in seconds since the epoch."""
        opened = []
        cdef oisp_fast_opened *o
        oisp_lock(self.sync)
        try:
            while self.table.opened_len:
                o = &self.table.opened[self.table.opened_head]
                opened.append((bytes(o.server[:16]), bytes(o.client[:16]), o.client_port, o.proxy_port,
                               o.server_port, 6 if o.v6 else 4, o.created_ns / 1e9))
                self.table.opened_head = (self.table.opened_head + 1) % OISP_FAST_OPENED_MAX
                self.table.opened_len -= 1
        finally:
            oisp_unlock(self.sync)
        return opened

    def mark_closed(self, const uint8_t[::1] key, uint16_t client_port, uint16_t proxy_port):
        """Python saw this flow end (in packets it decided): a SYN on its port is a new
        connection. Unknown flows are ignored."""
        self._key(key)
        cdef oisp_fast_flow *f
        with nogil:
            oisp_lock(self.sync)
            f = oisp_fast_find(self.table, &key[0], client_port, proxy_port)
            if f != NULL:
                f.closed |= OISP_FAST_CLOSED
            oisp_unlock(self.sync)

    def decide(self, packet, address):
        """What the receiver does with one packet: (action, packet after, address after),
        the action one of SLOW (to Python), PASS (our upstream), TO_PROXY, TO_CLIENT
        (reflected) and PASS_OTHER (not an AI address)."""
        cdef bytearray p = bytearray(packet), a = bytearray(address)
        if len(a) != OISP_ADDRESS_SIZE:
            raise ValueError(f"an address is {OISP_ADDRESS_SIZE} bytes")
        cdef unsigned char *pp = p
        cdef unsigned char *ap = a
        cdef uint16_t port = 0
        cdef int action
        oisp_lock(self.sync)
        action = oisp_fast_classify(self.table, pp, <uint32_t>len(p), ap, &port)
        oisp_unlock(self.sync)
        if action == OISP_FAST_TO_PROXY or action == OISP_FAST_TO_CLIENT:
            oisp_fast_reflect(pp, <uint32_t>len(p), ap, action, port)
        return action, bytes(p), bytes(a)

    def flows(self):
        """Flows in the table (the AI addresses not counted)."""
        return self.table.count - self.table.targets

    # What the receiver did with the batches it decided whole (all time).
    @property
    def targets(self):
        """AI addresses in the table."""
        return self.table.targets

    @property
    def targets_failed(self):
        """An AI address did not fit: packets to other addresses never pass in C again."""
        return bool(self.table.targets_failed)

    @property
    def to_proxy(self):
        return self.table.counts.to_proxy

    @property
    def to_client(self):
        return self.table.counts.to_client

    @property
    def passed(self):
        """The proxy's own upstream packets passed."""
        return self.table.counts.passed

    @property
    def passed_other(self):
        """Packets to addresses that are not AI endpoints passed."""
        return self.table.counts.passed_other

    @property
    def batches(self):
        return self.table.counts.batches

    @property
    def send_error(self):
        """The last injection error of a batch decided here (0: none)."""
        return self.table.counts.send_error
