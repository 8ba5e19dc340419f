/*
 * backend.c — libpq's non-blocking connect on the event loop, and the merging of the
 * client's startup parameters into the configured conninfo.
 *
 * libpq may close its socket and open another while connecting (multi-host, sslmode
 * prefer falling back to plain), so the poll handle follows PQsocket() after every
 * PQconnectPoll call. Name resolution of a `host` happens inside libpq and is blocking;
 * use `hostaddr` in conninfo to avoid it.
 */
#include "proxy/backend.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "protocol/wire.h"

const char *const pd_backend_reported_params[] = {
    "application_name",
    "client_encoding",
    "DateStyle",
    "default_transaction_read_only",
    "in_hot_standby",
    "integer_datetimes",
    "IntervalStyle",
    "is_superuser",
    "server_encoding",
    "server_version",
    "session_authorization",
    "standard_conforming_strings",
    "TimeZone",
    NULL,
};

/* The parameters libpq has keywords for; all others go into `options` as -c. */
static bool is_keyword_param(const char *name)
{
    return strcmp(name, "application_name") == 0 || strcmp(name, "client_encoding") == 0 ||
           strcmp(name, "options") == 0;
}

/* Appends `-c name=value` to options, escaping blanks and backslashes as libpq wants. */
static void append_guc(pd_buf_t *opts, const char *name, const char *value)
{
    if (opts->len > 0)
        pd_buf_put_u8(opts, ' ');
    pd_buf_put(opts, "-c ", 3);
    for (const char *p = name; *p; p++) {
        if (*p == ' ' || *p == '\\')
            pd_buf_put_u8(opts, '\\');
        pd_buf_put_u8(opts, (uint8_t)*p);
    }
    pd_buf_put_u8(opts, '=');
    for (const char *p = value; *p; p++) {
        if (*p == ' ' || *p == '\t' || *p == '\\')
            pd_buf_put_u8(opts, '\\');
        pd_buf_put_u8(opts, (uint8_t)*p);
    }
}

/* A keyword list under construction; values point into the parsed conninfo, the client's
 * parameters or `opts`, all of which outlive PQconnectStartParams. */
typedef struct {
    const char *keys[64];
    const char *vals[64];
    unsigned n;
} kwlist_t;

static void kw_set(kwlist_t *kw, const char *key, const char *val)
{
    for (unsigned i = 0; i < kw->n; i++) {
        if (strcmp(kw->keys[i], key) == 0) {
            kw->vals[i] = val;
            return;
        }
    }
    if (kw->n < 63) {
        kw->keys[kw->n] = key;
        kw->vals[kw->n] = val;
        kw->n++;
    }
}

static const char *kw_get(const kwlist_t *kw, const char *key)
{
    for (unsigned i = 0; i < kw->n; i++)
        if (strcmp(kw->keys[i], key) == 0)
            return kw->vals[i];
    return NULL;
}

/*
 * libpq reports a failed connect as text only; clients act on SQLSTATEs, so the common
 * server-side refusals are mapped back to theirs. Anything else is a connection failure.
 */
static const char *guess_sqlstate(const char *msg)
{
    static const struct {
        const char *needle;
        const char *sqlstate;
    } map[] = {
        {"password authentication failed", "28P01"},
        {"no password supplied", "28P01"},
        {"role \"", "28000"}, /* role "x" does not exist */
        {"no pg_hba.conf entry", "28000"},
        {"database \"", "3D000"}, /* database "x" does not exist */
        {"too many clients", "53300"},
        {"remaining connection slots are reserved", "53300"},
        {"the database system is starting up", "57P03"},
        {"the database system is shutting down", "57P03"},
        {"the database system is in recovery mode", "57P03"},
    };
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++)
        if (strstr(msg, map[i].needle) != NULL)
            return map[i].sqlstate;
    return "08006";
}

static void free_handle(uv_handle_t *h)
{
    free(h);
}

static void stop_poll(pd_backend_t *b)
{
    if (b->poll != NULL) {
        uv_close((uv_handle_t *)b->poll, free_handle);
        b->poll = NULL;
    }
}

static void connect_step(pd_backend_t *b, PostgresPollingStatusType st);

static void poll_cb(uv_poll_t *h, int status, int events)
{
    pd_backend_t *b = h->data;
    (void)status;
    (void)events;
    /* Errors surface through PQconnectPoll itself. */
    connect_step(b, PQconnectPoll(b->conn));
}

/* Watches libpq's current socket for what libpq asked for; follows socket changes. */
static int watch(pd_backend_t *b, int events)
{
    int fd = PQsocket(b->conn);
    if (fd < 0)
        return -1;
    if (b->poll != NULL && b->poll_fd != fd)
        stop_poll(b);
    if (b->poll == NULL) {
        b->poll = malloc(sizeof *b->poll);
        if (b->poll == NULL)
            return -1;
        if (uv_poll_init_socket(b->loop, b->poll, fd) != 0) {
            free(b->poll);
            b->poll = NULL;
            return -1;
        }
        b->poll->data = b;
        b->poll_fd = fd;
    }
    return uv_poll_start(b->poll, events, poll_cb) == 0 ? 0 : -1;
}

static void fail(pd_backend_t *b, const char *msg)
{
    stop_poll(b);
    /* libpq's message ends in a newline and may span lines; keep its first line. */
    char first[512];
    snprintf(first, sizeof first, "%s", msg && *msg ? msg : "could not connect");
    first[strcspn(first, "\n")] = '\0';
    b->cb(b, b->owner, first, guess_sqlstate(msg ? msg : ""));
}

static void connect_step(pd_backend_t *b, PostgresPollingStatusType st)
{
    switch (st) {
    case PGRES_POLLING_READING:
        if (watch(b, UV_READABLE) != 0)
            fail(b, "could not watch the server socket");
        return;
    case PGRES_POLLING_WRITING:
        if (watch(b, UV_WRITABLE) != 0)
            fail(b, "could not watch the server socket");
        return;
    case PGRES_POLLING_OK:
        /* The relay takes over the socket: the connect-phase handle must be gone first
         * (one poll handle per socket). */
        stop_poll(b);
        if (PQsetnonblocking(b->conn, 1) != 0) {
            fail(b, "could not make the server connection non-blocking");
            return;
        }
        b->connected = true;
        b->cb(b, b->owner, NULL, NULL);
        return;
    default:
        fail(b, PQerrorMessage(b->conn));
        return;
    }
}

int pd_backend_connect(pd_backend_t *b, uv_loop_t *loop, const char *conninfo,
                       const pd_backend_params_t *params, pd_backend_cb cb, void *owner, char *err,
                       size_t errlen)
{
    *b = (pd_backend_t){.loop = loop, .cb = cb, .owner = owner, .poll_fd = -1};

    char *perr = NULL;
    PQconninfoOption *opts = PQconninfoParse(conninfo, &perr);
    if (opts == NULL) {
        /* Never echo the conninfo: it may hold a password. */
        snprintf(err, errlen, "invalid conninfo for this database: %s",
                 perr ? perr : "out of memory");
        PQfreemem(perr);
        return -1;
    }

    kwlist_t kw = {.n = 0};
    for (PQconninfoOption *o = opts; o->keyword != NULL; o++)
        if (o->val != NULL && o->val[0] != '\0')
            kw_set(&kw, o->keyword, o->val);

    if (kw_get(&kw, "user") == NULL && params->user != NULL) {
        kw_set(&kw, "user", params->user);
        if (kw_get(&kw, "password") == NULL && params->password != NULL)
            kw_set(&kw, "password", params->password);
    }
    kw_set(&kw, "fallback_application_name", "pgdual");

    pd_buf_t guc;
    pd_buf_init(&guc);
    const char *base_opts = kw_get(&kw, "options");
    if (base_opts != NULL)
        pd_buf_put(&guc, base_opts, strlen(base_opts));
    for (unsigned i = 0; i < params->nparams; i++) {
        const char *name = params->names[i], *value = params->values[i];
        if (strcmp(name, "options") == 0 && value[0] != '\0') {
            if (guc.len > 0)
                pd_buf_put_u8(&guc, ' ');
            pd_buf_put(&guc, value, strlen(value));
        } else if (is_keyword_param(name)) {
            kw_set(&kw, name, value);
        } else {
            append_guc(&guc, name, value);
        }
    }
    pd_buf_put_u8(&guc, 0);
    if (!pd_buf_ok(&guc)) {
        snprintf(err, errlen, "out of memory");
        pd_buf_free(&guc);
        PQconninfoFree(opts);
        return -1;
    }
    if (guc.len > 1)
        kw_set(&kw, "options", (const char *)guc.data);
    kw.keys[kw.n] = NULL;
    kw.vals[kw.n] = NULL;

    b->conn = PQconnectStartParams(kw.keys, kw.vals, 0);
    pd_buf_free(&guc);
    PQconninfoFree(opts);

    if (b->conn == NULL || PQstatus(b->conn) == CONNECTION_BAD) {
        const char *msg = b->conn ? PQerrorMessage(b->conn) : "out of memory";
        snprintf(err, errlen, "%s", msg);
        err[strcspn(err, "\n")] = '\0';
        PQfinish(b->conn);
        b->conn = NULL;
        return -1;
    }
    /* Before the first PQconnectPoll, libpq wants the socket writable. */
    if (watch(b, UV_WRITABLE) != 0) {
        snprintf(err, errlen, "could not watch the server socket");
        PQfinish(b->conn);
        b->conn = NULL;
        return -1;
    }
    return 0;
}

void pd_backend_close(pd_backend_t *b)
{
    stop_poll(b);
    if (b->conn != NULL) {
        PQfinish(b->conn);
        b->conn = NULL;
    }
    b->connected = false;
}
