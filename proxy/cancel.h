/*
 * cancel.h — forwarding a client's CancelRequest to its backend. libpq's PQcancel blocks,
 * so it runs on libuv's thread pool, never on the event loop thread.
 */
#ifndef PD_PROXY_CANCEL_H
#define PD_PROXY_CANCEL_H

#include <libpq-fe.h>
#include <uv.h>

/* Sends a cancel for conn's current query from a worker thread. The cancel object is
 * taken here, on the loop thread, so the session may end meanwhile. Returns 0 or -1. */
int pd_cancel_dispatch(uv_loop_t *loop, PGconn *conn, const char *tag);
/* ...and then, back on the loop thread, calls done(arg) once the request was delivered
 * (or failed to be); not called when this returns -1. */
int pd_cancel_dispatch_then(uv_loop_t *loop, PGconn *conn, const char *tag, void (*done)(void *arg),
                            void *arg);

#endif /* PD_PROXY_CANCEL_H */
