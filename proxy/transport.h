/*
 * transport.h — one byte stream on a non-blocking socket, plain or TLS (OpenSSL), polled
 * by the event loop.
 *
 * The owner says what it wants (readable and/or writable events) and gets one callback
 * when the socket is ready; it then calls pd_transport_read/write, which never block.
 * Interest is handed to libuv only when it changes, since every change costs an
 * epoll_ctl. TLS's need to write while reading (and the reverse) is hidden here.
 */
#ifndef PD_PROXY_TRANSPORT_H
#define PD_PROXY_TRANSPORT_H

#include <openssl/ssl.h>
#include <stdbool.h>
#include <sys/types.h>
#include <uv.h>

#define PD_IO_AGAIN (-1) /* would block: wait for the next callback */
#define PD_IO_ERROR (-2) /* the connection is broken */

typedef struct pd_transport pd_transport_t;
/* Called when the socket is ready; `readable`/`writable` are in the logical sense (a TLS
 * read that needs the socket writable reports readable once it is). On a socket error
 * both are true, so that the next read or write reports the error. */
typedef void (*pd_transport_cb)(pd_transport_t *t, void *owner, bool readable, bool writable);

struct pd_transport {
    uv_loop_t *loop;
    uv_poll_t *poll; /* owned; freed by its own close callback */
    int fd;          /* owned when own_fd */
    bool own_fd;
    SSL *ssl; /* owned when own_ssl; else libpq's */
    bool own_ssl;
    int events; /* interest currently registered with libuv */
    bool want_read, want_write;
    bool ssl_read_wants_write; /* the last SSL_read asked for writability */
    bool ssl_write_wants_read; /* the last SSL_write asked for readability */
    pd_transport_cb on_ready;
    void *owner;
    const char *error; /* why the last call failed (static string) */
};

/* Starts polling fd (not yet interested in anything). Returns 0 or a libuv error. */
int pd_transport_open(pd_transport_t *t, uv_loop_t *loop, int fd, bool own_fd,
                      pd_transport_cb on_ready, void *owner);

/*
 * Moving a transport to another event loop (proxy/relay.c): detach stops polling on the
 * current loop (on its thread) and keeps the socket, the TLS state and the interest;
 * attach (on the new loop's thread) polls the socket there again with that interest.
 */
void pd_transport_detach(pd_transport_t *t);
int pd_transport_attach(pd_transport_t *t, uv_loop_t *loop);

/* Switches to TLS over the same socket with an SSL object. */
void pd_transport_set_ssl(pd_transport_t *t, SSL *ssl, bool own_ssl);

/* Declares interest; registers with libuv only on change. Returns 0 or a libuv error. */
int pd_transport_want(pd_transport_t *t, bool read, bool write);

/* Reads up to n bytes: > 0 bytes read, 0 on orderly EOF, PD_IO_AGAIN or PD_IO_ERROR. */
ssize_t pd_transport_read(pd_transport_t *t, void *buf, size_t n);

/* Whether decrypted bytes are waiting inside OpenSSL (the socket will not signal them). */
bool pd_transport_pending(const pd_transport_t *t);

/* Writes up to n bytes: >= 0 bytes written, PD_IO_AGAIN or PD_IO_ERROR. */
ssize_t pd_transport_write(pd_transport_t *t, const void *buf, size_t n);

/* Writes up to the total of n buffers, in order, in one system call when plain: >= 0
 * bytes written, PD_IO_AGAIN or PD_IO_ERROR. */
struct iovec;
ssize_t pd_transport_writev(pd_transport_t *t, const struct iovec *iov, int n);

/*
 * TLS server handshake step: 1 done, 0 in progress (interest updated), -1 failed
 * (t->error says why).
 */
int pd_transport_accept_tls(pd_transport_t *t);

/* Stops polling and releases everything the transport owns. Safe to call twice. */
void pd_transport_close(pd_transport_t *t);

#endif /* PD_PROXY_TRANSPORT_H */
