/*
 * metrics.c — the Prometheus endpoint of metrics.h: a minimal HTTP/1.1 server on the
 * event loop. It owns the listener and its connections; the exposition text comes from
 * the render callback at each request.
 *
 * Each connection gets one request and one response (Connection: close). Only the
 * request line is parsed; the headers are read up to their end and ignored. A request is
 * bounded in size (REQUEST_MAX) and in time (TIMEOUT_MS), so a slow or broken client
 * costs one small buffer for a few seconds and never holds up the loop.
 */
#include "admin/metrics.h"

#include <netdb.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "proxy/log.h"

#define REQUEST_MAX  8192 /* bytes of request line and headers */
#define TIMEOUT_MS   5000 /* per connection, from accept to the response written */
#define LINGER_MS    2000 /* after the response: how long unread input is drained */
#define CONNS_MAX    128  /* past this, new connections are closed at once */
#define CONTENT_TYPE "text/plain; version=0.0.4; charset=utf-8"

typedef struct mconn mconn_t;

struct pd_metrics {
    uv_tcp_t listener;
    pd_metrics_render_fn render;
    pd_metrics_ready_fn ready;
    void *ctx;
    mconn_t *conns; /* open connections, owned */
    unsigned nconns;
};

struct mconn {
    uv_tcp_t tcp; /* first: the handle's address is the connection's */
    uv_timer_t timer;
    pd_metrics_t *m; /* NULL once closing: the server may be gone by the close callbacks */
    mconn_t *prev, *next;
    int open_handles; /* close callbacks still to come; freed at zero */
    bool closing, responded;
    size_t len;
    char req[REQUEST_MAX];
    uv_write_t write;
    uv_shutdown_t shutdown;
    char head[512];
    pd_buf_t body; /* the response body; lives until the connection is freed */
};

/* ---------------------------------------------------------------------------------------
 * Connections
 */

static void on_timeout(uv_timer_t *t);

static void conn_closed(uv_handle_t *h)
{
    mconn_t *c = h->data;
    if (--c->open_handles > 0)
        return;
    pd_buf_free(&c->body);
    free(c);
}

static void conn_close(mconn_t *c)
{
    if (c->closing)
        return;
    c->closing = true;
    pd_metrics_t *m = c->m;
    if (c->prev != NULL)
        c->prev->next = c->next;
    else
        m->conns = c->next;
    if (c->next != NULL)
        c->next->prev = c->prev;
    m->nconns--;
    c->m = NULL;
    uv_close((uv_handle_t *)&c->tcp, conn_closed);
    uv_close((uv_handle_t *)&c->timer, conn_closed);
}

static void on_discard_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    mconn_t *c = h->data;
    (void)suggested;
    *buf = uv_buf_init(c->req, sizeof c->req);
}

static void on_discard(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
    (void)buf;
    if (n < 0)
        conn_close(s->data);
}

/* The response is out and our side is shut: input the client still sends is read and
 * dropped until it closes (or LINGER_MS pass), so that closing with unread input does
 * not reset the connection before the client has read the response. */
static void on_shutdown(uv_shutdown_t *req, int status)
{
    mconn_t *c = req->data;
    if (c->closing)
        return;
    if (status != 0 || uv_read_start((uv_stream_t *)&c->tcp, on_discard_alloc, on_discard) != 0)
        conn_close(c);
}

static void on_written(uv_write_t *req, int status)
{
    mconn_t *c = req->data;
    if (c->closing)
        return;
    c->shutdown.data = c;
    if (status != 0 || uv_shutdown(&c->shutdown, (uv_stream_t *)&c->tcp, on_shutdown) != 0) {
        conn_close(c);
        return;
    }
    uv_timer_start(&c->timer, on_timeout, LINGER_MS, 0);
}

/* Sends the status line, headers and (unless head_only) body, then closes. */
static void respond(mconn_t *c, const char *status, const char *extra, bool head_only)
{
    c->responded = true;
    uv_read_stop((uv_stream_t *)&c->tcp);
    int n = snprintf(c->head, sizeof c->head,
                     "HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                     "Connection: close\r\n%s\r\n",
                     status, CONTENT_TYPE, c->body.len, extra ? extra : "");
    uv_buf_t bufs[2] = {uv_buf_init(c->head, (unsigned)n),
                        uv_buf_init((char *)c->body.data, (unsigned)c->body.len)};
    unsigned nbufs = head_only || c->body.len == 0 ? 1 : 2;
    c->write.data = c;
    if (uv_write(&c->write, (uv_stream_t *)&c->tcp, bufs, nbufs, on_written) != 0)
        conn_close(c);
}

static void respond_text(mconn_t *c, const char *status, const char *text, const char *extra)
{
    pd_buf_reset(&c->body);
    pd_buf_put(&c->body, text, strlen(text));
    respond(c, status, extra, false);
}

/* Splits "METHOD TARGET HTTP/x.y"; false when the line does not look like that. */
static bool parse_request_line(char *line, char **method, char **target)
{
    char *save = NULL;
    *method = strtok_r(line, " ", &save);
    *target = strtok_r(NULL, " ", &save);
    char *version = strtok_r(NULL, " ", &save);
    return *method != NULL && *target != NULL && version != NULL &&
           strtok_r(NULL, " ", &save) == NULL && strncmp(version, "HTTP/1.", 7) == 0;
}

static bool path_is(const char *target, size_t len, const char *path)
{
    return len == strlen(path) && strncmp(target, path, len) == 0;
}

static void serve(mconn_t *c, pd_metrics_t *m)
{
    char *eol = memchr(c->req, '\n', c->len);
    *eol = '\0';
    if (eol > c->req && eol[-1] == '\r')
        eol[-1] = '\0';
    char *method, *target;
    if (!parse_request_line(c->req, &method, &target)) {
        respond_text(c, "400 Bad Request", "bad request\n", NULL);
        return;
    }
    bool head = strcmp(method, "HEAD") == 0;
    if (!head && strcmp(method, "GET") != 0) {
        respond_text(c, "405 Method Not Allowed", "only GET and HEAD\n", "Allow: GET, HEAD\r\n");
        return;
    }
    size_t plen = strcspn(target, "?");
    if (path_is(target, plen, "/ready")) {
        bool ready = m->ready(m->ctx);
        const char *text = ready ? "ready\n" : "not ready\n";
        pd_buf_reset(&c->body);
        pd_buf_put(&c->body, text, strlen(text));
        respond(c, ready ? "200 OK" : "503 Service Unavailable", NULL, head);
        return;
    }
    if (!path_is(target, plen, "/metrics")) {
        respond_text(c, "404 Not Found",
                     "not found; metrics are at /metrics, readiness at /ready\n", NULL);
        return;
    }
    pd_buf_reset(&c->body);
    m->render(m->ctx, &c->body);
    if (!pd_buf_ok(&c->body)) {
        respond_text(c, "500 Internal Server Error", "out of memory\n", NULL);
        return;
    }
    respond(c, "200 OK", NULL, head);
}

/* The request is complete at the blank line that ends the headers. */
static bool request_complete(const mconn_t *c)
{
    for (size_t i = 1; i < c->len; i++)
        if (c->req[i] == '\n' &&
            (c->req[i - 1] == '\n' || (i >= 2 && c->req[i - 1] == '\r' && c->req[i - 2] == '\n')))
            return true;
    return false;
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    mconn_t *c = h->data;
    (void)suggested;
    *buf = uv_buf_init(c->req + c->len, (unsigned)(sizeof c->req - c->len));
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
    mconn_t *c = s->data;
    (void)buf;
    if (c->responded || c->closing)
        return;
    if (n == UV_ENOBUFS || (n >= 0 && c->len + (size_t)n >= sizeof c->req)) {
        respond_text(c, "431 Request Header Fields Too Large", "request too large\n", NULL);
        return;
    }
    if (n < 0) {
        conn_close(c);
        return;
    }
    c->len += (size_t)n;
    if (request_complete(c))
        serve(c, c->m);
}

static void on_timeout(uv_timer_t *t)
{
    mconn_t *c = t->data;
    if (c->responded)
        conn_close(c); /* the client does not read its response, or does not close */
    else
        respond_text(c, "408 Request Timeout", "request timeout\n", NULL);
}

static void on_connection(uv_stream_t *server, int status)
{
    pd_metrics_t *m = server->data;
    if (status < 0)
        return;
    mconn_t *c = calloc(1, sizeof *c);
    if (c == NULL)
        return;
    pd_buf_init(&c->body);
    uv_tcp_init(server->loop, &c->tcp);
    uv_timer_init(server->loop, &c->timer);
    c->tcp.data = c->timer.data = c;
    c->open_handles = 2;
    c->m = m;
    c->next = m->conns;
    if (m->conns != NULL)
        m->conns->prev = c;
    m->conns = c;
    m->nconns++;
    if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0 || m->nconns > CONNS_MAX) {
        conn_close(c);
        return;
    }
    uv_timer_start(&c->timer, on_timeout, TIMEOUT_MS, 0);
    if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) != 0)
        conn_close(c);
}

/* ---------------------------------------------------------------------------------------
 * The listener
 */

/* "host:port", "[v6]:port" or ":port" (every address); false when malformed. */
static bool split_address(const char *address, char *host, size_t hsize, const char **port)
{
    const char *colon = strrchr(address, ':');
    if (colon == NULL || colon[1] == '\0')
        return false;
    const char *h = address;
    size_t hlen = (size_t)(colon - address);
    if (hlen >= 2 && h[0] == '[' && h[hlen - 1] == ']') {
        h++;
        hlen -= 2;
    }
    if (hlen >= hsize)
        return false;
    memcpy(host, h, hlen);
    host[hlen] = '\0';
    *port = colon + 1;
    return true;
}

static int bind_listener(pd_metrics_t *m, const char *address)
{
    char host[256];
    const char *port;
    if (!split_address(address, host, sizeof host, &port)) {
        pd_log_error(NULL, "admin.metrics \"%s\" is not host:port; write e.g. 127.0.0.1:9187",
                     address);
        return -1;
    }
    struct addrinfo hints = {.ai_flags = AI_PASSIVE | AI_NUMERICSERV,
                             .ai_family = AF_UNSPEC,
                             .ai_socktype = SOCK_STREAM};
    struct addrinfo *res = NULL;
    bool any = host[0] == '\0' || strcmp(host, "*") == 0;
    int rc = getaddrinfo(any ? NULL : host, port, &hints, &res);
    if (rc != 0) {
        pd_log_error(NULL, "could not resolve admin.metrics address \"%s\": %s", address,
                     gai_strerror(rc));
        return -1;
    }
    rc = uv_tcp_bind(&m->listener, res->ai_addr, 0);
    freeaddrinfo(res);
    if (rc == 0)
        rc = uv_listen((uv_stream_t *)&m->listener, 64, on_connection);
    if (rc != 0) {
        pd_log_error(NULL, "could not listen for metrics on %s: %s", address, uv_strerror(rc));
        pd_log_error(NULL, "HINT:  Is another process using the port? Change admin.metrics in "
                           "the config.");
        return -1;
    }
    return 0;
}

pd_metrics_t *pd_metrics_start(uv_loop_t *loop, const char *address, pd_metrics_render_fn render,
                               pd_metrics_ready_fn ready, void *ctx)
{
    pd_metrics_t *m = calloc(1, sizeof *m);
    if (m == NULL)
        return NULL;
    m->render = render;
    m->ready = ready;
    m->ctx = ctx;
    uv_tcp_init(loop, &m->listener);
    m->listener.data = m;
    if (bind_listener(m, address) != 0) {
        pd_metrics_stop(m);
        return NULL;
    }
    pd_log_info(NULL, "metrics at http://%s/metrics, readiness at /ready", address);
    return m;
}

static void listener_closed(uv_handle_t *h)
{
    free(h->data);
}

void pd_metrics_stop(pd_metrics_t *m)
{
    if (m == NULL)
        return;
    while (m->conns != NULL)
        conn_close(m->conns);
    uv_close((uv_handle_t *)&m->listener, listener_closed);
}
