"""cffi declarations of the divert C API, compiled out-of-line in ABI mode into
`oisp._native._divert_cffi` (no C compiler involved: the library is dlopen'ed
at run time by absolute path, see oisp/divert/library.py).

One `ffi` declares both surfaces: WinDivert 2.2 (WinDivert64.dll) and
eBPFDivert 0.0.5 (libebpfdivert.so). ABI mode resolves a symbol only when it
is used, so each backend touches only its own names.
"""

from cffi import FFI

CDEF = r"""
/* ---- WINDIVERT_ADDRESS (80 bytes, shared by both backends) ---- */
typedef struct {
    uint32_t IfIdx;
    uint32_t SubIfIdx;
} WINDIVERT_DATA_NETWORK;

typedef struct {
    uint64_t EndpointId;
    uint64_t ParentEndpointId;
    uint32_t ProcessId;
    uint32_t LocalAddr[4];
    uint32_t RemoteAddr[4];
    uint16_t LocalPort;
    uint16_t RemotePort;
    uint8_t  Protocol;
} WINDIVERT_DATA_FLOW;

typedef WINDIVERT_DATA_FLOW WINDIVERT_DATA_SOCKET;  /* the same layout in windivert.h */

typedef struct {
    int64_t  Timestamp;
    uint32_t ProcessId;
    uint32_t Layer;
    uint64_t Flags;
    int16_t  Priority;
} WINDIVERT_DATA_REFLECT;

typedef struct {
    int64_t  Timestamp;
    uint32_t Layer:8;
    uint32_t Event:8;
    uint32_t Sniffed:1;
    uint32_t Outbound:1;
    uint32_t Loopback:1;
    uint32_t Impostor:1;
    uint32_t IPv6:1;
    uint32_t IPChecksum:1;
    uint32_t TCPChecksum:1;
    uint32_t UDPChecksum:1;
    uint32_t Reserved1:8;
    uint32_t Reserved2;
    union {
        WINDIVERT_DATA_NETWORK Network;
        WINDIVERT_DATA_FLOW    Flow;
        WINDIVERT_DATA_SOCKET  Socket;
        WINDIVERT_DATA_REFLECT Reflect;
        uint8_t Reserved3[64];
    };
} WINDIVERT_ADDRESS;

/* ---- WinDivert 2.2 (Windows) ---- */
void *WinDivertOpen(const char *filter, int layer, int16_t priority, uint64_t flags);
int WinDivertRecv(void *handle, void *pPacket, unsigned int packetLen, unsigned int *pRecvLen,
                  WINDIVERT_ADDRESS *pAddr);
int WinDivertRecvEx(void *handle, void *pPacket, unsigned int packetLen, unsigned int *pRecvLen,
                    uint64_t flags, WINDIVERT_ADDRESS *pAddr, unsigned int *pAddrLen, void *lpOverlapped);
int WinDivertSend(void *handle, const void *pPacket, unsigned int packetLen, unsigned int *pSendLen,
                  const WINDIVERT_ADDRESS *pAddr);
int WinDivertSendEx(void *handle, const void *pPacket, unsigned int packetLen, unsigned int *pSendLen,
                    uint64_t flags, const WINDIVERT_ADDRESS *pAddr, unsigned int addrLen, void *lpOverlapped);
int WinDivertShutdown(void *handle, int how);
int WinDivertClose(void *handle);
int WinDivertSetParam(void *handle, int param, uint64_t value);
int WinDivertGetParam(void *handle, int param, uint64_t *pValue);
uint64_t WinDivertHelperHashPacket(const void *pPacket, unsigned int packetLen, uint64_t seed);
int WinDivertHelperCalcChecksums(void *pPacket, unsigned int packetLen, WINDIVERT_ADDRESS *pAddr,
                                 uint64_t flags);
int WinDivertHelperCompileFilter(const char *filter, int layer, char *object, unsigned int objLen,
                                 const char **errorStr, unsigned int *errorPos);
int WinDivertHelperEvalFilter(const char *filter, const void *pPacket, unsigned int packetLen,
                              const WINDIVERT_ADDRESS *pAddr);
int WinDivertHelperFormatFilter(const char *filter, int layer, char *buffer, unsigned int bufLen);

/* ---- eBPFDivert 0.0.5 (Linux): the same API, negative errno returns ---- */
struct ebpfdivert_open_opts {
    size_t sz;
    const char **ifnames;
    uint32_t ring_bytes;
};
const char *ebpfdivert_version(void);
void *ebpfdivert_open(const char *filter, int layer, int16_t priority, uint64_t flags,
                      const struct ebpfdivert_open_opts *opts);
int ebpfdivert_recv(void *handle, void *buf, uint32_t len, uint32_t *recv_len,
                    WINDIVERT_ADDRESS *addr, int timeout_ms);
/* addr_len is a COUNT of addresses, in and out (WinDivertRecvEx: bytes). */
int ebpfdivert_recv_ex(void *handle, void *buf, uint32_t len, uint32_t *recv_len,
                       WINDIVERT_ADDRESS *addr, uint32_t *addr_len, int timeout_ms);
int ebpfdivert_send(void *handle, const void *buf, uint32_t len, uint32_t *send_len,
                    const WINDIVERT_ADDRESS *addr);
int ebpfdivert_send_ex(void *handle, const void *buf, uint32_t len, uint32_t *send_len,
                       const WINDIVERT_ADDRESS *addr, uint32_t addr_count);
int ebpfdivert_shutdown(void *handle, int how);
int ebpfdivert_close(void *handle);
int ebpfdivert_set_param(void *handle, int param, uint64_t value);
int ebpfdivert_get_param(void *handle, int param, uint64_t *value);
int ebpfdivert_get_event_fd(void *handle);
int ebpfdivert_get_handle_stats(void *handle, uint64_t *values, int n);
int ebpfdivert_unregister(void);
const char *ebpfdivert_strerror(int err);
int ebpfdivert_helper_compile_filter(const char *filter, int layer, const char **err_str, uint32_t *err_pos);
int ebpfdivert_helper_eval_filter(const char *filter, const void *pkt, uint32_t len,
                                  const WINDIVERT_ADDRESS *addr);
int ebpfdivert_helper_format_filter(const char *filter, int layer, char *buf, uint32_t buflen);
int ebpfdivert_helper_calc_checksums(void *pkt, uint32_t len, WINDIVERT_ADDRESS *addr, uint64_t flags);
uint64_t ebpfdivert_helper_hash_packet(const void *pkt, uint32_t len, uint64_t seed);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("oisp._native._divert_cffi", None)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
