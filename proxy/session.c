/*
 * session.c — the client-side state machine and the relay.
 *
 * Every state change goes through session_set_state(), which keeps the server's counts
 * right. A session is ended by session_close(), which closes every handle at once and
 * frees the memory later, in the close callback of the session's timer: code further up
 * the current call stack may still look at the session (and sees s->closed).
 */
#include "proxy/session.h"

#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "proxy/cancel.h"
#include "proxy/log.h"

#define PIPE_SIZE    (64 * 1024)
#define AUTH_MSG_MAX 65535u /* PostgreSQL's PG_MAX_AUTH_TOKEN_LENGTH */
#define LINGER_MS    1000   /* how long a closing session drains the client's input */

static void on_client(pd_transport_t *t, void *owner, bool readable, bool writable);
static void on_server(pd_transport_t *t, void *owner, bool readable, bool writable);
static void relay_from_client(pd_session_t *s);
static void relay_from_server(pd_session_t *s);
static void update_interest(pd_session_t *s);
static void closing_step(pd_session_t *s, bool readable, bool writable);
static void session_close_timer(uv_timer_t *t);

/* ---------------------------------------------------------------------------------------
 * State and lifetime
 */

#define PD__STATE_NAME(id, name) [PD_SESSION_##id] = name,
static const char *const state_names[] = {PD_SESSION_STATES(PD__STATE_NAME)};
#undef PD__STATE_NAME

const char *pd_session_state_name(pd_session_state_t st)
{
    return st < PD_SESSION_NSTATES ? state_names[st] : "?";
}

static void session_set_state(pd_session_t *s, pd_session_state_t st)
{
    if (s->state == st)
        return;
    s->srv->state_counts[s->state]--;
    s->srv->state_counts[st]++;
    pd_log_debug(s->tag, "state %s -> %s", state_names[s->state], state_names[st]);
    s->state = st;
}

static void free_session(uv_handle_t *h)
{
    pd_session_t *s = h->data;
    free(s->c2b.buf);
    free(s->b2c.buf);
    pd_buf_free(&s->out);
    for (unsigned i = 0; i < s->nparams; i++) {
        free(s->names[i]);
        free(s->values[i]);
    }
    free(s->names);
    free(s->values);
    free(s->user);
    free(s->database);
    free(s->conninfo);
    if (s->scram != NULL) {
        pd_scram_clear(s->scram);
        free(s->scram);
    }
    free(s);
}

static void session_close(pd_session_t *s)
{
    if (s->closed)
        return;
    s->closed = true;
    uint64_t ms = uv_now(s->srv->loop) - s->started_ms;
    pd_log_info(s->tag, "disconnected: session time %llu.%03llu s, %llu bytes in, %llu bytes out",
                (unsigned long long)(ms / 1000), (unsigned long long)(ms % 1000),
                (unsigned long long)s->bytes_c2b, (unsigned long long)s->bytes_b2c);
    pd_transport_close(&s->client);
    if (s->server_open)
        pd_transport_close(&s->server);
    s->server_open = false;
    pd_backend_close(&s->backend);
    pd_server_session_removed(s->srv, s);
    uv_close((uv_handle_t *)&s->timer, free_session);
}

pd_session_t *pd_session_find(pd_server_t *srv, uint32_t pid, uint32_t key)
{
    for (pd_session_t *s = srv->sessions; s != NULL; s = s->next)
        if (s->id == pid && s->cancel_key == key && !s->closed)
            return s;
    return NULL;
}

/* ---------------------------------------------------------------------------------------
 * Output: the relay's pipes and the proxy's own messages
 */

static bool pipe_pending(const pd_pipe_t *p)
{
    return p->scan > p->sent;
}

/* Writes [sent, scan) to dst: 1 all written, 0 would block, -1 broken. Once all is
 * written, whatever unparsed tail is left moves to the front of the buffer. */
static int pipe_flush(pd_pipe_t *p, pd_transport_t *dst)
{
    while (p->sent < p->scan) {
        ssize_t n = pd_transport_write(dst, p->buf + p->sent, p->scan - p->sent);
        if (n == PD_IO_AGAIN)
            return 0;
        if (n < 0)
            return -1;
        p->sent += (size_t)n;
    }
    if (p->scan == p->end) {
        p->sent = p->scan = p->end = 0;
    } else if (p->scan > 0) {
        memmove(p->buf, p->buf + p->scan, p->end - p->scan);
        p->end -= p->scan;
        p->sent = p->scan = 0;
    }
    return 1;
}

static bool out_pending(const pd_session_t *s)
{
    return s->out_sent < s->out.len;
}

/* Writes the proxy's own messages: 1 all written, 0 would block, -1 broken. */
static int out_flush(pd_session_t *s)
{
    while (s->out_sent < s->out.len) {
        ssize_t n = pd_transport_write(&s->client, s->out.data + s->out_sent,
                                       s->out.len - s->out_sent);
        if (n == PD_IO_AGAIN)
            return 0;
        if (n < 0)
            return -1;
        s->out_sent += (size_t)n;
    }
    pd_buf_reset(&s->out);
    s->out_sent = 0;
    return 1;
}

/*
 * Everything owed to the client. The proxy's own messages go first while the session is
 * starting (they precede anything the server says) and last when it is closing (the
 * FATAL follows the last whole message relayed).
 */
static int client_flush(pd_session_t *s)
{
    int r;
    if (s->state != PD_SESSION_CLOSING && (r = out_flush(s)) <= 0)
        return r;
    r = pipe_flush(&s->b2c, &s->client);
    if (r <= 0)
        return r;
    return out_flush(s);
}

/* ---------------------------------------------------------------------------------------
 * Ending a session
 */

void pd_session_terminate(pd_session_t *s, const char *sqlstate, const char *message,
                          const char *hint)
{
    if (s->closed || s->state == PD_SESSION_CLOSING)
        return;
    if (s->server_open)
        pd_transport_close(&s->server);
    s->server_open = false;
    pd_backend_close(&s->backend);

    /* An error can only be told between two messages; in the middle of one, the client
     * would read it as part of that message, so then the connection just closes. So
     * it does in the middle of a TLS handshake. */
    if (sqlstate == NULL || s->b2c.skip > 0 || s->state == PD_SESSION_TLS) {
        session_close(s);
        return;
    }
    s->b2c.end = s->b2c.scan; /* drop a partly received message */
    if (message != NULL)
        pd_log_info(s->tag, "closing: %s (SQLSTATE %s)", message, sqlstate);
    pd_be_error(&s->out, "FATAL", sqlstate, message, NULL, hint);
    session_set_state(s, PD_SESSION_CLOSING);
    uv_timer_start(&s->timer, session_close_timer, LINGER_MS, 0);
    closing_step(s, false, true);
}

static void session_close_timer(uv_timer_t *t)
{
    pd_session_t *s = t->data;
    if (s->state != PD_SESSION_CLOSING) {
        pd_session_terminate(s, "08P01", "timeout expired during startup",
                             "The client did not finish connecting within "
                             "limits.startup_timeout_ms.");
        return;
    }
    pd_log_debug(s->tag, "closing: linger time over");
    session_close(s);
}

/*
 * CLOSING: write what is owed (whole relayed messages, then the FATAL), then shut down
 * our side and read until the client closes or the linger time is over. Closing with
 * unread input would make the kernel send a reset, which can destroy the error message
 * before the client has read it.
 */
static void closing_step(pd_session_t *s, bool readable, bool writable)
{
    if (writable && (pipe_pending(&s->b2c) || out_pending(s))) {
        int r = client_flush(s);
        if (r < 0) {
            session_close(s);
            return;
        }
        if (r == 0) {
            update_interest(s);
            return;
        }
        shutdown(s->client.fd, SHUT_WR);
    }
    if (readable) {
        uint8_t sink[4096];
        for (;;) {
            ssize_t n = pd_transport_read(&s->client, sink, sizeof sink);
            if (n == PD_IO_AGAIN)
                break;
            if (n <= 0) {
                session_close(s);
                return;
            }
        }
    }
    update_interest(s);
}

/*
 * The client went away without Terminate. A query it left running would go on until the
 * server next writes to the closed connection, holding locks and a CPU meanwhile; so it
 * is cancelled first, as the client could no longer do.
 */
static void client_gone(pd_session_t *s)
{
    if (s->busy && s->backend.conn != NULL && s->backend.connected) {
        pd_log_info(s->tag, "client closed the connection during a query; cancelling it");
        if (pd_cancel_dispatch(s->srv->loop, s->backend.conn, s->tag) != 0)
            pd_log_warning(s->tag, "could not start cancelling the query");
    } else {
        pd_log_debug(s->tag, "client closed the connection");
    }
    session_close(s);
}

/* A protocol violation by the client: PostgreSQL's 08P01, then close. */
static void client_violation(pd_session_t *s, const char *message)
{
    pd_session_terminate(s, "08P01", message, NULL);
}

static void server_lost(pd_session_t *s, const char *why)
{
    pd_log_warning(s->tag, "lost the connection to the server: %s", why ? why : "closed");
    pd_session_terminate(s, "08006", "pgdual lost its connection to the database server",
                         "The server closed the connection or the network failed. "
                         "Reconnect to continue; the open transaction, if any, was rolled "
                         "back.");
}

/* ---------------------------------------------------------------------------------------
 * Interest: what each socket is polled for follows from the pipes and the state.
 */

static void update_interest(pd_session_t *s)
{
    if (s->closed)
        return;
    switch (s->state) {
    case PD_SESSION_STARTUP:
    case PD_SESSION_AUTH:
        pd_transport_want(&s->client, true, out_pending(s));
        break;
    case PD_SESSION_TLS:
        break; /* the handshake sets its own interest */
    case PD_SESSION_CONNECTING:
        /* Not reading: what the client sends now waits for the backend. */
        pd_transport_want(&s->client, false, out_pending(s));
        break;
    case PD_SESSION_ACTIVE:
        pd_transport_want(&s->client, !pipe_pending(&s->c2b) && !s->client_terminated,
                          pipe_pending(&s->b2c) || out_pending(s));
        pd_transport_want(&s->server, !pipe_pending(&s->b2c), pipe_pending(&s->c2b));
        break;
    case PD_SESSION_CLOSING: {
        bool owed = pipe_pending(&s->b2c) || out_pending(s);
        pd_transport_want(&s->client, !owed, owed);
        break;
    }
    default:
        break;
    }
}

/* ---------------------------------------------------------------------------------------
 * ACTIVE: the relay
 */

/* Decides every whole header in [scan, end). Returns 0, or -1 when the session ended. */
static int scan_client(pd_session_t *s)
{
    pd_pipe_t *p = &s->c2b;
    while (p->scan < p->end) {
        size_t avail = p->end - p->scan;
        if (p->skip > 0) {
            size_t take = p->skip < avail ? (size_t)p->skip : avail;
            p->scan += take;
            p->skip -= take;
            continue;
        }
        pd_msg_hdr_t h;
        const char *err = NULL;
        pd_decode_rc_t rc =
            pd_fe_header(p->buf + p->scan, avail, s->srv->cfg->max_message_size, &h, &err);
        if (rc == PD_DECODE_INCOMPLETE)
            break;
        if (rc == PD_DECODE_ERROR) {
            client_violation(s, err);
            return -1;
        }
        if (h.type == PD_FE_TERMINATE) {
            if (h.len != 4) {
                client_violation(s, "invalid message length");
                return -1;
            }
            /* Pass Terminate on, and nothing after it. */
            s->client_terminated = true;
            p->scan += PD_MSG_HEADER_LEN;
            p->end = p->scan;
            break;
        }
        s->busy = true;
        uint64_t total = (uint64_t)h.len + 1;
        if (total <= avail) {
            p->scan += (size_t)total;
        } else {
            p->skip = total - avail;
            p->scan = p->end;
        }
    }
    return 0;
}

static int scan_server(pd_session_t *s)
{
    pd_pipe_t *p = &s->b2c;
    while (p->scan < p->end) {
        size_t avail = p->end - p->scan;
        if (p->skip > 0) {
            size_t take = p->skip < avail ? (size_t)p->skip : avail;
            p->scan += take;
            p->skip -= take;
            continue;
        }
        pd_msg_hdr_t h;
        const char *err = NULL;
        pd_decode_rc_t rc = pd_be_header(p->buf + p->scan, avail, PD_MSG_MAX_LEN, &h, &err);
        if (rc == PD_DECODE_INCOMPLETE)
            break;
        if (rc != PD_DECODE_OK) {
            pd_log_error(s->tag, "protocol violation by the server: %s", err);
            pd_session_terminate(s, "08P01", "pgdual received an invalid message from the "
                                             "database server", NULL);
            return -1;
        }
        if (h.type == PD_BE_READY) {
            /* ReadyForQuery is looked at whole: it tells the transaction status. */
            if (h.len != 5) {
                server_lost(s, "invalid ReadyForQuery");
                return -1;
            }
            if (avail < 6)
                break;
            s->txn_status = p->buf[p->scan + 5];
            /* Idle again unless the client has already sent more (pipelining). */
            s->busy = pipe_pending(&s->c2b) || s->c2b.end > s->c2b.scan;
            p->scan += 6;
            continue;
        }
        uint64_t total = (uint64_t)h.len + 1;
        if (total <= avail) {
            p->scan += (size_t)total;
        } else {
            p->skip = total - avail;
            p->scan = p->end;
        }
    }
    return 0;
}

/*
 * Reads what the client sent, decides per message and writes it to the server at once.
 * One read per readiness callback (level-triggered polling calls again while data is
 * waiting), except with TLS, whose decrypted bytes the socket does not announce.
 */
static void relay_from_client(pd_session_t *s)
{
    pd_pipe_t *p = &s->c2b;
    while (!s->closed && s->state == PD_SESSION_ACTIVE && !pipe_pending(p) &&
           !s->client_terminated) {
        if (p->end == p->cap) {
            client_violation(s, "invalid message length");
            return;
        }
        ssize_t n = pd_transport_read(&s->client, p->buf + p->end, p->cap - p->end);
        if (n == PD_IO_AGAIN)
            return;
        if (n <= 0) {
            client_gone(s);
            return;
        }
        p->end += (size_t)n;
        s->bytes_c2b += (uint64_t)n;
        if (scan_client(s) < 0)
            return;
        if (pipe_flush(p, &s->server) < 0) {
            server_lost(s, s->server.error);
            return;
        }
        if (s->client_terminated && !pipe_pending(p)) {
            pd_log_debug(s->tag, "client sent Terminate");
            session_close(s);
            return;
        }
        if (!pd_transport_pending(&s->client))
            return;
    }
}

static void relay_from_server(pd_session_t *s)
{
    pd_pipe_t *p = &s->b2c;
    while (!s->closed && s->state == PD_SESSION_ACTIVE && !pipe_pending(p)) {
        if (p->end == p->cap) {
            server_lost(s, "message does not fit the buffer");
            return;
        }
        ssize_t n = pd_transport_read(&s->server, p->buf + p->end, p->cap - p->end);
        if (n == PD_IO_AGAIN)
            return;
        if (n <= 0) {
            server_lost(s, n == 0 ? "server closed the connection" : s->server.error);
            return;
        }
        p->end += (size_t)n;
        s->bytes_b2c += (uint64_t)n;
        if (scan_server(s) < 0)
            return;
        if (pipe_flush(p, &s->client) < 0) {
            client_gone(s);
            return;
        }
        if (!pd_transport_pending(&s->server))
            return;
    }
}

static void on_server(pd_transport_t *t, void *owner, bool readable, bool writable)
{
    pd_session_t *s = owner;
    (void)t;
    if (s->closed || s->state != PD_SESSION_ACTIVE)
        return;
    if (writable && pipe_pending(&s->c2b)) {
        int r = pipe_flush(&s->c2b, &s->server);
        if (r < 0) {
            server_lost(s, s->server.error);
            return;
        }
        if (r > 0 && s->client_terminated) {
            session_close(s);
            return;
        }
        /* Bytes TLS decrypted while we were blocked are not announced by the socket. */
        if (r > 0 && pd_transport_pending(&s->client))
            relay_from_client(s);
    }
    if (readable && !s->closed)
        relay_from_server(s);
    update_interest(s);
}

/* ---------------------------------------------------------------------------------------
 * CONNECTING: the backend
 */

static void on_backend_connected(pd_backend_t *b, void *owner, const char *err,
                                 const char *sqlstate)
{
    pd_session_t *s = owner;
    if (s->closed)
        return;
    if (err != NULL) {
        char msg[768];
        snprintf(msg, sizeof msg, "pgdual could not connect to database \"%s\": %s",
                 s->database, err);
        pd_session_terminate(s, sqlstate, msg,
                             "Check this database's entry under `databases` in the pgdual "
                             "config and that its server is up.");
        return;
    }
    int fd = PQsocket(b->conn);
    if (pd_transport_open(&s->server, s->srv->loop, fd, false, on_server, s) != 0) {
        server_lost(s, "could not watch the server socket");
        return;
    }
    s->server_open = true;
    if (PQsslInUse(b->conn)) {
        SSL *ssl = PQsslStruct(b->conn, "OpenSSL");
        SSL_set_mode(ssl, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
        pd_transport_set_ssl(&s->server, ssl, false);
    }

    /* The client hears what PostgreSQL would say after authentication, with our own
     * BackendKeyData so that its CancelRequest comes to us. */
    for (const char *const *name = pd_backend_reported_params; *name != NULL; name++) {
        const char *value = PQparameterStatus(b->conn, *name);
        if (value != NULL)
            pd_be_param_status(&s->out, *name, value);
    }
    pd_be_backend_key(&s->out, s->id, s->cancel_key);
    pd_be_ready(&s->out, 'I');
    s->txn_status = 'I';
    uv_timer_stop(&s->timer);
    session_set_state(s, PD_SESSION_ACTIVE);
    pd_log_info(s->tag, "connected to the server (backend pid %d)", PQbackendPID(b->conn));

    if (out_flush(s) < 0) {
        session_close(s);
        return;
    }
    /* Messages the client pipelined behind its startup packet wait in c2b. */
    if (s->c2b.end > 0) {
        if (scan_client(s) < 0)
            return;
        if (pipe_flush(&s->c2b, &s->server) < 0) {
            server_lost(s, s->server.error);
            return;
        }
    }
    update_interest(s);
}

static void begin_connect(pd_session_t *s)
{
    const pd_auth_entry_t *entry = pd_server_auth_entry(s->srv, s->user);
    const char *password = NULL;
    if (entry != NULL && !entry->user->is_scram)
        password = entry->user->secret;

    pd_backend_params_t params = {
        .user = s->user,
        .password = password,
        .nparams = s->nparams,
        .names = (const char *const *)s->names,
        .values = (const char *const *)s->values,
    };
    session_set_state(s, PD_SESSION_CONNECTING);
    char err[512];
    if (pd_backend_connect(&s->backend, s->srv->loop, s->conninfo, &params,
                           on_backend_connected, s, err, sizeof err) != 0) {
        char msg[768];
        snprintf(msg, sizeof msg, "pgdual could not connect to database \"%s\": %s",
                 s->database, err);
        pd_session_terminate(s, "08006", msg,
                             "Check this database's entry under `databases` in the pgdual "
                             "config.");
        return;
    }
    update_interest(s);
}

/* ---------------------------------------------------------------------------------------
 * AUTH: SCRAM-SHA-256 with the client
 */

static void auth_failed(pd_session_t *s)
{
    char msg[256];
    snprintf(msg, sizeof msg, "password authentication failed for user \"%s\"", s->user);
    pd_session_terminate(s, "28P01", msg, NULL);
}

/* Authenticated: the database must exist (told only now, as PostgreSQL does). */
static void auth_done(pd_session_t *s)
{
    if (s->conninfo == NULL) {
        char msg[256];
        snprintf(msg, sizeof msg, "database \"%s\" does not exist", s->database);
        pd_session_terminate(s, "3D000", msg,
                             "pgdual serves the databases listed under `databases` in its "
                             "config.");
        return;
    }
    begin_connect(s);
}

static void begin_scram(pd_session_t *s)
{
    s->scram = calloc(1, sizeof *s->scram);
    if (s->scram == NULL) {
        pd_session_terminate(s, "53200", "out of memory", NULL);
        return;
    }
    static const char *const mechanisms[] = {PD_SCRAM_MECHANISM};
    pd_be_auth_sasl(&s->out, mechanisms, 1);
    session_set_state(s, PD_SESSION_AUTH);
}

/* A printable random nonce for server-first-message. */
static bool make_nonce(char *out, size_t size)
{
    static const char alphabet[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    uint8_t raw[24];
    if (size < sizeof raw + 1 || RAND_bytes(raw, sizeof raw) != 1)
        return false;
    for (size_t i = 0; i < sizeof raw; i++)
        out[i] = alphabet[raw[i] & 63];
    out[sizeof raw] = '\0';
    return true;
}

/* One SASL message from the client. Returns 0, or -1 when the session ended. */
static int auth_message(pd_session_t *s, const uint8_t *body, size_t n)
{
    const char *err = NULL;
    pd_buf_t reply;
    pd_buf_init(&reply);
    pd_scram_rc_t rc;

    if (s->scram->step == 0) {
        pd_fe_sasl_initial_t init;
        if (pd_fe_sasl_initial_decode(body, n, &init, &err) != PD_DECODE_OK || init.len < 0) {
            client_violation(s, err ? err : "malformed SASL initial response");
            return -1;
        }
        if (strcmp(init.mechanism, PD_SCRAM_MECHANISM) != 0) {
            pd_session_terminate(s, "28000",
                                 "client selected an invalid SASL authentication mechanism",
                                 NULL);
            return -1;
        }
        pd_scram_secret_t secret;
        const pd_auth_entry_t *entry = pd_server_auth_entry(s->srv, s->user);
        if (entry != NULL) {
            secret = entry->secret;
        } else {
            /* Unknown user: go through the motions with a random secret, so that the
             * reply does not tell which user names exist. */
            uint8_t salt[16];
            RAND_bytes(salt, sizeof salt);
            s->auth_unknown_user = true;
            if (!pd_scram_secret_from_password("", salt, sizeof salt, 16, &secret)) {
                auth_failed(s);
                return -1;
            }
            RAND_bytes(secret.stored_key, sizeof secret.stored_key);
        }
        char nonce[32];
        if (!make_nonce(nonce, sizeof nonce)) {
            pd_session_terminate(s, "XX000", "could not generate random nonce", NULL);
            return -1;
        }
        rc = pd_scram_server_first(s->scram, &secret, init.data, (size_t)init.len, nonce,
                                   &reply, &err);
        if (rc == PD_SCRAM_CONTINUE)
            pd_be_auth_sasl_continue(&s->out, reply.data, reply.len);
    } else {
        rc = pd_scram_server_final(s->scram, body, n, &reply, &err);
        if (rc == PD_SCRAM_SUCCESS && !s->auth_unknown_user) {
            pd_be_auth_sasl_final(&s->out, reply.data, reply.len);
            pd_be_auth_ok(&s->out);
        }
    }
    pd_buf_free(&reply);

    if (rc == PD_SCRAM_PROTOCOL) {
        client_violation(s, err ? err : "malformed SCRAM message");
        return -1;
    }
    if (rc == PD_SCRAM_FAIL || (rc == PD_SCRAM_SUCCESS && s->auth_unknown_user)) {
        auth_failed(s);
        return -1;
    }
    if (rc == PD_SCRAM_SUCCESS) {
        pd_scram_clear(s->scram);
        free(s->scram);
        s->scram = NULL;
        pd_log_info(s->tag, "authenticated with SCRAM-SHA-256");
        auth_done(s);
        return s->closed || s->state == PD_SESSION_CLOSING ? -1 : 0;
    }
    return 0;
}

/* Consumes whole SASL messages in c2b. */
static void process_auth(pd_session_t *s)
{
    pd_pipe_t *p = &s->c2b;
    while (s->state == PD_SESSION_AUTH && p->scan < p->end) {
        size_t avail = p->end - p->scan;
        pd_msg_hdr_t h;
        const char *err = NULL;
        pd_decode_rc_t rc = pd_fe_header(p->buf + p->scan, avail, AUTH_MSG_MAX + 4, &h, &err);
        if (rc == PD_DECODE_INCOMPLETE)
            break;
        if (rc == PD_DECODE_ERROR) {
            client_violation(s, err);
            return;
        }
        if (h.type != PD_FE_PASSWORD) {
            char msg[96];
            snprintf(msg, sizeof msg, "expected SASL response, got message type %d", h.type);
            client_violation(s, msg);
            return;
        }
        if (avail < (size_t)h.len + 1)
            break;
        const uint8_t *body = p->buf + p->scan + PD_MSG_HEADER_LEN;
        p->scan += (size_t)h.len + 1;
        if (auth_message(s, body, h.len - 4) < 0)
            return;
    }
    /* Keep whatever follows (a pipelining client) for the relay. */
    memmove(p->buf, p->buf + p->scan, p->end - p->scan);
    p->end -= p->scan;
    p->scan = 0;
}

/* ---------------------------------------------------------------------------------------
 * STARTUP: SSLRequest, GSSENCRequest, CancelRequest, StartupMessage
 */

static char *dup_or_null(const char *v)
{
    return v ? strdup(v) : NULL;
}

static bool is_false(const char *v)
{
    return strcmp(v, "false") == 0 || strcmp(v, "off") == 0 || strcmp(v, "no") == 0 ||
           strcmp(v, "0") == 0;
}

/* Copies the parameters to pass on; answers NegotiateProtocolVersion when the client
 * asked for a newer minor version or for protocol options. Returns false on a refusal. */
static bool take_params(pd_session_t *s, const pd_startup_t *st)
{
    const char *unrecognized[PD_STARTUP_MAX_PARAMS];
    unsigned nunrec = 0;
    s->names = calloc(st->nparams + 1, sizeof *s->names);
    s->values = calloc(st->nparams + 1, sizeof *s->values);
    s->user = dup_or_null(st->user);
    s->database = dup_or_null(st->database);
    if (s->names == NULL || s->values == NULL || s->user == NULL || s->database == NULL) {
        pd_session_terminate(s, "53200", "out of memory", NULL);
        return false;
    }
    for (unsigned i = 0; i < st->nparams; i++) {
        const char *name = st->names[i], *value = st->values[i];
        if (strcmp(name, "user") == 0 || strcmp(name, "database") == 0)
            continue;
        if (strncmp(name, "_pq_.", 5) == 0) {
            unrecognized[nunrec++] = name;
            continue;
        }
        if (strcmp(name, "replication") == 0) {
            if (is_false(value))
                continue;
            pd_session_terminate(s, "0A000", "pgdual does not proxy replication connections",
                                 "Connect to the database server directly for replication.");
            return false;
        }
        s->names[s->nparams] = strdup(name);
        s->values[s->nparams] = strdup(value);
        s->nparams++;
        if (s->names[s->nparams - 1] == NULL || s->values[s->nparams - 1] == NULL) {
            pd_session_terminate(s, "53200", "out of memory", NULL);
            return false;
        }
    }
    if ((st->version & 0xffff) > 0 || nunrec > 0)
        pd_be_negotiate_version(&s->out, 0, nunrec, unrecognized);
    return true;
}

static void startup_message(pd_session_t *s, const pd_startup_t *st)
{
    if (!take_params(s, st))
        return;
    snprintf(s->tag, sizeof s->tag, "[S-%u %s/%s@%s]", s->id, s->database, s->user, s->peer);
    const pd_config_t *cfg = s->srv->cfg;
    const pd_database_cfg_t *db = pd_config_database(cfg, s->database);
    if (db != NULL && (s->conninfo = strdup(db->old)) == NULL) {
        pd_session_terminate(s, "53200", "out of memory", NULL);
        return;
    }
    pd_log_info(s->tag, "connection received%s", s->tls_done ? " (TLS)" : "");

    if (cfg->tls_mode == PD_TLS_REQUIRE && !s->tls_done) {
        pd_session_terminate(s, "28000", "pgdual accepts only TLS connections",
                             "Connect with sslmode=require.");
        return;
    }
    if (s->srv->stopping) {
        pd_session_terminate(s, "57P03", "the database system is shutting down", NULL);
        return;
    }
    if (s->srv->nsessions > cfg->max_clients) {
        pd_session_terminate(s, "53300", "sorry, too many clients already",
                             "Raise limits.max_clients in the pgdual config, or use fewer "
                             "connections.");
        return;
    }
    if (cfg->auth_mode == PD_AUTH_SCRAM) {
        begin_scram(s);
        return;
    }
    if (s->conninfo != NULL)
        pd_be_auth_ok(&s->out);
    auth_done(s);
}

static void cancel_request(pd_session_t *s, const pd_startup_t *st)
{
    pd_session_t *target = pd_session_find(s->srv, st->cancel_pid, st->cancel_key);
    if (target == NULL || target->state != PD_SESSION_ACTIVE || target->backend.conn == NULL) {
        pd_log_info(s->tag, "cancel request for unknown or idle session ignored");
    } else if (pd_cancel_dispatch(s->srv->loop, target->backend.conn, target->tag) != 0) {
        pd_log_warning(target->tag, "could not start forwarding a cancel request");
    }
    /* PostgreSQL answers a CancelRequest by closing the connection. */
    session_close(s);
}

static void begin_tls(pd_session_t *s)
{
    SSL *ssl = SSL_new(s->srv->ssl_ctx);
    if (ssl == NULL || SSL_set_fd(ssl, s->client.fd) != 1) {
        SSL_free(ssl);
        pd_log_error(s->tag, "could not start TLS");
        session_close(s);
        return;
    }
    SSL_set_mode(ssl, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    pd_transport_set_ssl(&s->client, ssl, true);
}

static void tls_step(pd_session_t *s)
{
    if (out_pending(s)) {
        /* The 'S' answer goes out in plain text before the handshake. */
        int r = out_flush(s);
        if (r < 0) {
            session_close(s);
            return;
        }
        if (r == 0) {
            pd_transport_want(&s->client, false, true);
            return;
        }
    }
    if (s->client.ssl == NULL) {
        begin_tls(s);
        if (s->closed)
            return;
    }
    int rc = pd_transport_accept_tls(&s->client);
    if (rc < 0) {
        pd_log_info(s->tag, "TLS handshake failed");
        session_close(s);
        return;
    }
    if (rc == 1) {
        s->tls_done = true;
        session_set_state(s, PD_SESSION_STARTUP);
        update_interest(s);
    }
}

static void process_startup(pd_session_t *s)
{
    pd_pipe_t *p = &s->c2b;
    while (s->state == PD_SESSION_STARTUP && p->scan < p->end) {
        pd_startup_t st;
        const char *err = NULL, *sqlstate = NULL;
        long used = pd_startup_decode(p->buf + p->scan, p->end - p->scan, &st, &err, &sqlstate);
        if (used == 0)
            break;
        if (used < 0) {
            pd_session_terminate(s, sqlstate ? sqlstate : "08P01", err, NULL);
            return;
        }
        p->scan += (size_t)used;
        switch (st.kind) {
        case PD_STARTUP_SSL: {
            bool yes = s->srv->ssl_ctx != NULL && s->srv->cfg->tls_mode != PD_TLS_DISABLE;
            if (s->tls_done) {
                client_violation(s, "SSLRequest after TLS was established");
                return;
            }
            if (yes && p->scan != p->end) {
                /* The client must wait for our answer; bytes behind the request were
                 * sent in the clear and must not be taken as if they were encrypted. */
                client_violation(s, "received unencrypted data after SSL request");
                return;
            }
            pd_buf_put_u8(&s->out, yes ? 'S' : 'N');
            if (yes) {
                session_set_state(s, PD_SESSION_TLS);
                tls_step(s);
                return;
            }
            break;
        }
        case PD_STARTUP_GSSENC:
            if (s->gss_done || s->tls_done) {
                client_violation(s, "unexpected GSSENCRequest");
                return;
            }
            s->gss_done = true;
            pd_buf_put_u8(&s->out, 'N');
            break;
        case PD_STARTUP_CANCEL:
            cancel_request(s, &st);
            return;
        case PD_STARTUP_MESSAGE:
            startup_message(s, &st);
            break;
        }
    }
    if (s->closed)
        return;
    memmove(p->buf, p->buf + p->scan, p->end - p->scan);
    p->end -= p->scan;
    p->scan = 0;
    if (out_flush(s) < 0)
        session_close(s);
}

/* STARTUP and AUTH read the client the same way and differ in what they decode. */
static void startup_read(pd_session_t *s)
{
    pd_pipe_t *p = &s->c2b;
    do {
        if (p->end == p->cap) {
            client_violation(s, "invalid length of startup packet");
            return;
        }
        ssize_t n = pd_transport_read(&s->client, p->buf + p->end, p->cap - p->end);
        if (n == PD_IO_AGAIN)
            return;
        if (n <= 0) {
            /* A client that goes away mid-startup, as PostgreSQL's log would say. */
            pd_log_info(s->tag, p->end > 0 ? "incomplete startup packet"
                                           : "client closed the connection during startup");
            session_close(s);
            return;
        }
        p->end += (size_t)n;
        if (s->state == PD_SESSION_STARTUP)
            process_startup(s);
        else
            process_auth(s);
        if (!s->closed && s->state == PD_SESSION_AUTH && out_flush(s) < 0)
            session_close(s);
    } while (!s->closed &&
             (s->state == PD_SESSION_STARTUP || s->state == PD_SESSION_AUTH) &&
             pd_transport_pending(&s->client));
}

static void on_client(pd_transport_t *t, void *owner, bool readable, bool writable)
{
    pd_session_t *s = owner;
    (void)t;
    if (s->closed)
        return;
    switch (s->state) {
    case PD_SESSION_STARTUP:
    case PD_SESSION_AUTH:
    case PD_SESSION_CONNECTING:
        if (writable && out_flush(s) < 0) {
            session_close(s);
            return;
        }
        if (readable && s->state != PD_SESSION_CONNECTING)
            startup_read(s);
        break;
    case PD_SESSION_TLS:
        tls_step(s);
        return;
    case PD_SESSION_ACTIVE:
        if (writable) {
            int r = client_flush(s);
            if (r < 0) {
                client_gone(s);
                return;
            }
            if (r > 0 && s->server_open && pd_transport_pending(&s->server))
                relay_from_server(s);
        }
        if (readable && !s->closed)
            relay_from_client(s);
        break;
    case PD_SESSION_CLOSING:
        closing_step(s, readable, writable);
        return;
    default:
        break;
    }
    update_interest(s);
}

void pd_session_accept(pd_server_t *srv, int fd, const char *peer)
{
    pd_session_t *s = calloc(1, sizeof *s);
    if (s != NULL) {
        s->c2b.buf = malloc(PIPE_SIZE);
        s->b2c.buf = malloc(PIPE_SIZE);
    }
    if (s == NULL || s->c2b.buf == NULL || s->b2c.buf == NULL ||
        pd_transport_open(&s->client, srv->loop, fd, true, on_client, s) != 0) {
        pd_log_error(NULL, "out of memory accepting a connection from %s", peer);
        if (s != NULL) {
            free(s->c2b.buf);
            free(s->b2c.buf);
        }
        free(s);
        close(fd);
        return;
    }
    s->srv = srv;
    s->c2b.cap = s->b2c.cap = PIPE_SIZE;
    s->id = ++srv->next_session_id;
    if (RAND_bytes((uint8_t *)&s->cancel_key, sizeof s->cancel_key) != 1)
        s->cancel_key = (uint32_t)random();
    s->started_ms = uv_now(srv->loop);
    snprintf(s->peer, sizeof s->peer, "%s", peer);
    snprintf(s->tag, sizeof s->tag, "[S-%u @%s]", s->id, peer);
    pd_buf_init(&s->out);
    uv_timer_init(srv->loop, &s->timer);
    s->timer.data = s;
    s->state = PD_SESSION_STARTUP;
    pd_server_session_added(srv, s);
    uv_timer_start(&s->timer, session_close_timer, srv->cfg->startup_timeout_ms, 0);
    update_interest(s);
}
