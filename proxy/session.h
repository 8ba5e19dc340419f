/*
 * session.h — one client connection and everything that serves it: the client-side
 * state machine (startup, TLS, auth, connecting, active, closing), its backend
 * connection, and the relay between them.
 *
 * The relay keeps protocol decisions apart from byte copying: per direction one buffer;
 * each message header is looked at, bodies the proxy does not need stream through from
 * that buffer straight to the other socket without being copied (a 100 MB DataRow goes
 * through a 64 kB buffer). When the destination cannot take more, the source is not read
 * until it drains (backpressure).
 */
#ifndef PD_PROXY_SESSION_H
#define PD_PROXY_SESSION_H

#include <stdint.h>
#include <uv.h>

#include "protocol/scram.h"
#include "protocol/wire.h"
#include "proxy/backend.h"
#include "proxy/server.h"
#include "proxy/transport.h"

/* One direction of the relay. Invariant: 0 <= sent <= scan <= end <= cap.
 * [sent, scan) is decided and waiting to be written; [scan, end) is not parsed yet. */
typedef struct {
    uint8_t *buf; /* owned */
    size_t cap;
    size_t sent, scan, end;
    uint64_t skip; /* body bytes of the current message still to stream through */
} pd_pipe_t;

struct pd_session {
    pd_server_t *srv;           /* not owned */
    pd_session_t *prev, *next;  /* server's list */
    uint32_t id;                /* also the pid in our BackendKeyData */
    uint32_t cancel_key;
    pd_session_state_t state;   /* changed only by session_set_state() */
    bool closed;                /* handles closed; memory freed by the timer's close cb */
    char tag[192];              /* log prefix "[S-17 app/alice@127.0.0.1:50312]" */
    char peer[64];

    pd_transport_t client;
    pd_backend_t backend;
    pd_transport_t server; /* the backend's socket once connected (fd and SSL are libpq's) */
    bool server_open;

    pd_pipe_t c2b, b2c;
    pd_buf_t out;      /* what the proxy itself says to the client */
    size_t out_sent;
    uv_timer_t timer;  /* startup deadline, then linger on close; its close cb frees us */

    /* Startup. Copies of the client's parameters, owned. */
    bool tls_done, gss_done;
    char *user, *database;
    unsigned nparams;
    char **names, **values;
    char *conninfo;              /* the database's old conninfo, copied: reload frees configs */
    pd_scram_t *scram;           /* owned during AUTH */
    bool auth_unknown_user;      /* SCRAM against a mock secret, fails at the end */

    uint8_t txn_status; /* from the last ReadyForQuery: 'I', 'T' or 'E' */
    bool busy;          /* messages went to the server since its last ReadyForQuery */
    bool client_terminated;
    uint64_t started_ms;
    uint64_t bytes_c2b, bytes_b2c;
};

/* Takes an accepted client socket (non-blocking) and starts its session. */
void pd_session_accept(pd_server_t *srv, int fd, const char *peer);

/* Ends a session: with a FATAL to the client when sqlstate is non-NULL and the stream is
 * at a message boundary; the backend is closed at once. */
void pd_session_terminate(pd_session_t *s, const char *sqlstate, const char *message,
                          const char *hint);

/* Finds the session that issued BackendKeyData (pid, key), or NULL. */
pd_session_t *pd_session_find(pd_server_t *srv, uint32_t pid, uint32_t key);

#endif /* PD_PROXY_SESSION_H */
