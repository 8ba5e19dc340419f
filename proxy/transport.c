/*
 * transport.c — non-blocking socket I/O, plain or TLS, driven by a uv_poll_t.
 *
 * The poll handle is heap-allocated and freed in its own close callback, so the owner
 * may free the transport as soon as pd_transport_close returns ("close now, free later"
 * applies to the handle alone, which references nothing else once closed).
 */
#include "proxy/transport.h"

#include <errno.h>
#include <openssl/err.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

static void poll_cb(uv_poll_t *handle, int status, int events)
{
    pd_transport_t *t = handle->data;
    bool readable = (events & (t->ssl_read_wants_write ? UV_WRITABLE : UV_READABLE)) != 0;
    bool writable = (events & (t->ssl_write_wants_read ? UV_READABLE : UV_WRITABLE)) != 0;
    if (status < 0) {
        t->error = "socket error";
        readable = writable = true;
    }
    t->on_ready(t, t->owner, readable, writable);
}

static void free_handle(uv_handle_t *handle)
{
    free(handle);
}

/* A poll handle for t's socket on loop (not yet interested in anything). */
static int poll_new(pd_transport_t *t, uv_loop_t *loop)
{
    t->poll = malloc(sizeof *t->poll);
    if (t->poll == NULL)
        return UV_ENOMEM;
    int rc = uv_poll_init_socket(loop, t->poll, t->fd);
    if (rc != 0) {
        free(t->poll);
        t->poll = NULL;
        return rc;
    }
    t->poll->data = t;
    t->loop = loop;
    t->events = 0;
    return 0;
}

int pd_transport_open(pd_transport_t *t, uv_loop_t *loop, int fd, bool own_fd,
                      pd_transport_cb on_ready, void *owner)
{
    *t = (pd_transport_t){.fd = fd, .own_fd = own_fd, .on_ready = on_ready, .owner = owner};
    return poll_new(t, loop);
}

void pd_transport_detach(pd_transport_t *t)
{
    if (t->poll != NULL) {
        /* uv_close takes the socket out of the loop's epoll set at once; the handle's
           memory goes in its callback. */
        uv_close((uv_handle_t *)t->poll, free_handle);
        t->poll = NULL;
    }
    t->events = 0;
    t->loop = NULL;
}

int pd_transport_attach(pd_transport_t *t, uv_loop_t *loop)
{
    int rc = poll_new(t, loop);
    return rc != 0 ? rc : pd_transport_want(t, t->want_read, t->want_write);
}

void pd_transport_set_ssl(pd_transport_t *t, SSL *ssl, bool own_ssl)
{
    t->ssl = ssl;
    t->own_ssl = own_ssl;
}

int pd_transport_want(pd_transport_t *t, bool read, bool write)
{
    t->want_read = read;
    t->want_write = write;
    if (t->poll == NULL)
        return 0;
    int events = 0;
    if (read)
        events |= t->ssl_read_wants_write ? UV_WRITABLE : UV_READABLE;
    if (write)
        events |= t->ssl_write_wants_read ? UV_READABLE : UV_WRITABLE;
    if (events == t->events)
        return 0;
    t->events = events;
    if (events == 0)
        return uv_poll_stop(t->poll);
    return uv_poll_start(t->poll, events, poll_cb);
}

/* Maps an OpenSSL result to our convention, remembering which direction it waits on. */
static ssize_t ssl_result(pd_transport_t *t, int rc, bool reading)
{
    int err = SSL_get_error(t->ssl, rc);
    switch (err) {
    case SSL_ERROR_WANT_READ:
        if (!reading)
            t->ssl_write_wants_read = true;
        return PD_IO_AGAIN;
    case SSL_ERROR_WANT_WRITE:
        if (reading)
            t->ssl_read_wants_write = true;
        return PD_IO_AGAIN;
    case SSL_ERROR_ZERO_RETURN:
        return 0;
    case SSL_ERROR_SYSCALL:
        /* OpenSSL 3 reports an EOF without close_notify as SSL_ERROR_SSL with
         * SSL_R_UNEXPECTED_EOF_WHILE_READING; older ones as SYSCALL with errno 0. */
        ERR_clear_error();
        t->error = errno ? "TLS socket error" : "unexpected EOF on TLS connection";
        return reading && errno == 0 ? 0 : PD_IO_ERROR;
    default:
        ERR_clear_error();
        t->error = "TLS protocol error";
        return PD_IO_ERROR;
    }
}

/* Maps a plain socket call's result (EINTR already retried) to our convention. */
static ssize_t plain_result(pd_transport_t *t, ssize_t r, const char *what)
{
    if (r >= 0)
        return r;
    if (errno == EAGAIN || errno == EWOULDBLOCK)
        return PD_IO_AGAIN;
    t->error = what;
    return PD_IO_ERROR;
}

ssize_t pd_transport_read(pd_transport_t *t, void *buf, size_t n)
{
    if (t->ssl != NULL) {
        bool was_waiting = t->ssl_read_wants_write;
        t->ssl_read_wants_write = false;
        ERR_clear_error();
        int rc = SSL_read(t->ssl, buf, n > INT32_MAX ? INT32_MAX : (int)n);
        ssize_t r = rc > 0 ? rc : ssl_result(t, rc, true);
        if (was_waiting != t->ssl_read_wants_write)
            pd_transport_want(t, t->want_read, t->want_write);
        return r;
    }
    ssize_t r;
    do /* recv, not read: a socket read through the VFS layer costs more per call */
        r = recv(t->fd, buf, n, 0);
    while (r < 0 && errno == EINTR);
    return plain_result(t, r, "could not receive data");
}

bool pd_transport_pending(const pd_transport_t *t)
{
    return t->ssl != NULL && SSL_pending(t->ssl) > 0;
}

ssize_t pd_transport_write(pd_transport_t *t, const void *buf, size_t n)
{
    if (n == 0)
        return 0;
    if (t->ssl != NULL) {
        bool was_waiting = t->ssl_write_wants_read;
        t->ssl_write_wants_read = false;
        ERR_clear_error();
        int rc = SSL_write(t->ssl, buf, n > INT32_MAX ? INT32_MAX : (int)n);
        ssize_t r = rc > 0 ? rc : ssl_result(t, rc, false);
        if (r == 0)
            r = PD_IO_ERROR; /* the peer closed while we were writing */
        if (was_waiting != t->ssl_write_wants_read)
            pd_transport_want(t, t->want_read, t->want_write);
        return r;
    }
    ssize_t r;
    do /* MSG_NOSIGNAL: a peer that went away is an error to handle, not a SIGPIPE */
        r = send(t->fd, buf, n, MSG_NOSIGNAL);
    while (r < 0 && errno == EINTR);
    return plain_result(t, r, "could not send data");
}

ssize_t pd_transport_writev(pd_transport_t *t, const struct iovec *iov, int n)
{
    if (t->ssl != NULL) {
        /* TLS records are cut per SSL_write anyway: write the pieces in turn. */
        ssize_t done = 0;
        for (int i = 0; i < n; i++) {
            ssize_t w = pd_transport_write(t, iov[i].iov_base, iov[i].iov_len);
            if (w < 0)
                return done > 0 ? done : w;
            done += w;
            if ((size_t)w < iov[i].iov_len)
                break;
        }
        return done;
    }
    if (n == 1) /* the common case: send is cheaper than sendmsg */
        return pd_transport_write(t, iov[0].iov_base, iov[0].iov_len);
    struct msghdr mh = {.msg_iov = (struct iovec *)iov, .msg_iovlen = (size_t)n};
    ssize_t r;
    do
        r = sendmsg(t->fd, &mh, MSG_NOSIGNAL);
    while (r < 0 && errno == EINTR);
    return plain_result(t, r, "could not send data");
}

int pd_transport_accept_tls(pd_transport_t *t)
{
    ERR_clear_error();
    int rc = SSL_accept(t->ssl);
    if (rc == 1) {
        pd_transport_want(t, false, false);
        return 1;
    }
    int err = SSL_get_error(t->ssl, rc);
    if (err == SSL_ERROR_WANT_READ) {
        pd_transport_want(t, true, false);
        return 0;
    }
    if (err == SSL_ERROR_WANT_WRITE) {
        pd_transport_want(t, false, true);
        return 0;
    }
    ERR_clear_error();
    t->error = "TLS handshake failed";
    return -1;
}

void pd_transport_close(pd_transport_t *t)
{
    pd_transport_detach(t);
    if (t->ssl != NULL && t->own_ssl) {
        SSL_shutdown(t->ssl); /* best effort close_notify; we do not wait for the peer's */
        SSL_free(t->ssl);
    }
    t->ssl = NULL;
    if (t->own_fd && t->fd >= 0)
        close(t->fd);
    t->fd = -1;
}
