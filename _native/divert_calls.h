/* Batched receive and inject over either backend, from C, without the GIL.
 *
 * This is the one place that knows the batch address-length argument differs:
 * WinDivertRecvEx/SendEx take BYTES (count * 80), ebpfdivert_recv_ex/send_ex
 * take a COUNT of addresses (passing bytes overflowed an N-slot array). Every
 * caller here passes and gets counts. The argument is reset before each call.
 *
 * Returns 0 on success, OISP_DIVERT_TIMEOUT when nothing arrived in time, or
 * a positive error code (errno on Linux, GetLastError() on Windows).
 */
#ifndef OISP_DIVERT_CALLS_H
#define OISP_DIVERT_CALLS_H

#include <stdint.h>
#include <stddef.h>

#define OISP_ADDRESS_SIZE 80
#define OISP_DIVERT_TIMEOUT (-1)
#define OISP_KIND_EBPFDIVERT 0
#define OISP_KIND_WINDIVERT 1

typedef int (*ebpf_recv_ex_fn)(void *, void *, uint32_t, uint32_t *, void *, uint32_t *, int);
typedef int (*ebpf_send_ex_fn)(void *, const void *, uint32_t, uint32_t *, const void *, uint32_t);

#ifdef _WIN32
#include <windows.h>
typedef BOOL (WINAPI *win_recv_ex_fn)(HANDLE, void *, UINT, UINT *, UINT64, void *, UINT *, LPOVERLAPPED);
typedef BOOL (WINAPI *win_send_ex_fn)(HANDLE, const void *, UINT, UINT *, UINT64, const void *, UINT, LPOVERLAPPED);
#endif

static int oisp_divert_recv(int kind, void *fn, void *handle, void *buf, uint32_t buf_len,
                            void *addrs, uint32_t max_addrs, int timeout_ms,
                            uint32_t *out_bytes, uint32_t *out_count)
{
    *out_bytes = 0;
    *out_count = 0;
    if (kind == OISP_KIND_EBPFDIVERT) {
        uint32_t recv_len = 0, count = max_addrs;          /* a COUNT */
        int ret = ((ebpf_recv_ex_fn)fn)(handle, buf, buf_len, &recv_len, addrs, &count, timeout_ms);
        if (ret < 0)
            return (ret == -11 /* EAGAIN */ || ret == -110 /* ETIMEDOUT */) ? OISP_DIVERT_TIMEOUT : -ret;
        *out_bytes = recv_len;
        *out_count = count;
        return 0;
    }
#ifdef _WIN32
    {
        UINT recv_len = 0, addr_len = max_addrs * OISP_ADDRESS_SIZE;   /* BYTES */
        OVERLAPPED overlapped;
        DWORD done = 0, err;
        if (timeout_ms < 0) {
            if (!((win_recv_ex_fn)fn)((HANDLE)handle, buf, buf_len, &recv_len, 0, addrs, &addr_len, NULL))
                return (int)GetLastError();
            *out_bytes = recv_len;
            *out_count = addr_len / OISP_ADDRESS_SIZE;
            return 0;
        }
        ZeroMemory(&overlapped, sizeof overlapped);
        overlapped.hEvent = CreateEventW(NULL, TRUE, FALSE, NULL);
        if (overlapped.hEvent == NULL)
            return (int)GetLastError();
        if (((win_recv_ex_fn)fn)((HANDLE)handle, buf, buf_len, &recv_len, 0, addrs, &addr_len, &overlapped)) {
            done = recv_len;
        } else if ((err = GetLastError()) != ERROR_IO_PENDING) {
            CloseHandle(overlapped.hEvent);
            return (int)err;
        } else if (WaitForSingleObject(overlapped.hEvent, (DWORD)timeout_ms) == WAIT_TIMEOUT) {
            CancelIoEx((HANDLE)handle, &overlapped);
            GetOverlappedResult((HANDLE)handle, &overlapped, &done, TRUE);
            CloseHandle(overlapped.hEvent);
            return OISP_DIVERT_TIMEOUT;
        } else if (!GetOverlappedResult((HANDLE)handle, &overlapped, &done, TRUE)) {
            err = GetLastError();
            CloseHandle(overlapped.hEvent);
            return (int)err;
        }
        CloseHandle(overlapped.hEvent);
        *out_bytes = done;
        *out_count = addr_len / OISP_ADDRESS_SIZE;
        return 0;
    }
#else
    return 22; /* EINVAL: WinDivert exists only on Windows */
#endif
}

static int oisp_divert_send(int kind, void *fn, void *handle, const void *buf, uint32_t buf_len,
                            const void *addrs, uint32_t count, uint32_t *out_bytes)
{
    *out_bytes = 0;
    if (kind == OISP_KIND_EBPFDIVERT) {
        uint32_t send_len = 0;
        int ret = ((ebpf_send_ex_fn)fn)(handle, buf, buf_len, &send_len, addrs, count);   /* a COUNT */
        if (ret < 0)
            return -ret;
        *out_bytes = send_len;
        return 0;
    }
#ifdef _WIN32
    {
        UINT send_len = 0;
        if (!((win_send_ex_fn)fn)((HANDLE)handle, buf, buf_len, &send_len, 0, addrs,
                                  count * OISP_ADDRESS_SIZE /* BYTES */, NULL))
            return (int)GetLastError();
        *out_bytes = send_len;
        return 0;
    }
#else
    return 22;
#endif
}

#endif
