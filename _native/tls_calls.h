/* The few OpenSSL calls the relay makes on the SSL* of Python's own SSLObjects,
 * resolved at run time from the libssl/libcrypto that Python's `_ssl` module
 * already loaded, so the wheel builds without OpenSSL headers or import
 * libraries and always uses the very library that made the handshake.
 *
 * Linux/macOS: dlopen(<_ssl's path>, RTLD_NOLOAD) gives the already-loaded
 * module; dlsym on that handle searches it and its dependencies (libssl,
 * libcrypto), which RTLD_LOCAL would hide from RTLD_DEFAULT.
 * Windows: GetModuleHandle on the DLLs python.org's builds ship beside _ssl.pyd
 * (libssl-3 / libcrypto-3, or the 1.1 names of Python 3.10), then
 * GetProcAddress. Written to the documented API; never run here.
 *
 * The prototypes are OpenSSL's stable public API (1.1.0 to 3.x); opaque types
 * are void *. The constants are the values in ssl.h/bio.h, unchanged since
 * 1.0 (they are part of the ABI).
 */
#ifndef OISP_TLS_CALLS_H
#define OISP_TLS_CALLS_H

#include <stddef.h>

#define OISP_SSL_ERROR_NONE 0
#define OISP_SSL_ERROR_SSL 1
#define OISP_SSL_ERROR_WANT_READ 2
#define OISP_SSL_ERROR_WANT_WRITE 3
#define OISP_SSL_ERROR_SYSCALL 5
#define OISP_SSL_ERROR_ZERO_RETURN 6
#define OISP_BIO_CTRL_PENDING 10

typedef struct {
    int (*SSL_read)(void *ssl, void *buf, int num);
    int (*SSL_write)(void *ssl, const void *buf, int num);
    int (*SSL_get_error)(const void *ssl, int ret);
    void *(*SSL_get_rbio)(const void *ssl);
    void *(*SSL_get_wbio)(const void *ssl);
    void *(*SSL_get_ex_data)(const void *ssl, int idx);
    int (*SSL_is_server)(const void *ssl);
    int (*BIO_write)(void *bio, const void *data, int len);
    int (*BIO_read)(void *bio, void *data, int len);
    long (*BIO_ctrl)(void *bio, int cmd, long larg, void *parg);
    void (*ERR_clear_error)(void);
    unsigned long (*ERR_get_error)(void);
    void (*ERR_error_string_n)(unsigned long e, char *buf, size_t len);
} oisp_tls_api;

#ifdef _WIN32
#include <windows.h>

static void *oisp_tls_module(const char *const *names)
{
    for (; *names; names++) {
        HMODULE m = GetModuleHandleA(*names);
        if (m)
            return (void *)m;
    }
    return NULL;
}

#define OISP_TLS_SYM(mod, name) ((void *)GetProcAddress((HMODULE)(mod), name))
#else
#include <dlfcn.h>
#define OISP_TLS_SYM(mod, name) dlsym((mod), name)
#endif

/* Fill `api` from the loaded libraries; 0 when every symbol was found, else -1
 * with `missing` naming the first symbol not found. `ssl_module_path` is
 * `_ssl.__file__` (unused on Windows). */
static int oisp_tls_load(oisp_tls_api *api, const char *ssl_module_path, const char **missing)
{
    void *ssl_lib, *crypto_lib;
#ifdef _WIN32
    static const char *const ssl_names[] = {"libssl-3.dll", "libssl-3-x64.dll", "libssl-1_1.dll",
                                            "libssl-1_1-x64.dll", NULL};
    static const char *const crypto_names[] = {"libcrypto-3.dll", "libcrypto-3-x64.dll", "libcrypto-1_1.dll",
                                               "libcrypto-1_1-x64.dll", NULL};
    (void)ssl_module_path;
    ssl_lib = oisp_tls_module(ssl_names);
    crypto_lib = oisp_tls_module(crypto_names);
#else
    ssl_lib = dlopen(ssl_module_path, RTLD_NOW | RTLD_NOLOAD);
    crypto_lib = ssl_lib; /* the dependency search finds libcrypto's symbols too */
#endif
    *missing = "the OpenSSL library of Python's _ssl module";
    if (!ssl_lib || !crypto_lib)
        return -1;
#define OISP_LOAD(lib, field)                                      \
    do {                                                           \
        *(void **)&api->field = OISP_TLS_SYM(lib, #field);         \
        if (!api->field) {                                         \
            *missing = #field;                                     \
            return -1;                                             \
        }                                                          \
    } while (0)
    OISP_LOAD(ssl_lib, SSL_read);
    OISP_LOAD(ssl_lib, SSL_write);
    OISP_LOAD(ssl_lib, SSL_get_error);
    OISP_LOAD(ssl_lib, SSL_get_rbio);
    OISP_LOAD(ssl_lib, SSL_get_wbio);
    OISP_LOAD(ssl_lib, SSL_get_ex_data);
    OISP_LOAD(ssl_lib, SSL_is_server);
    OISP_LOAD(crypto_lib, BIO_write);
    OISP_LOAD(crypto_lib, BIO_read);
    OISP_LOAD(crypto_lib, BIO_ctrl);
    OISP_LOAD(crypto_lib, ERR_clear_error);
    OISP_LOAD(crypto_lib, ERR_get_error);
    OISP_LOAD(crypto_lib, ERR_error_string_n);
#undef OISP_LOAD
    *missing = NULL;
    return 0;
}

#endif
