/*
 * server.c — the listener, signals, configuration (re)loading and the session list.
 */
#include "proxy/server.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "admin/cutover.h"
#include "admin/fleet.h"
#include "admin/jobs.h"
#include "admin/metrics.h"
#include "admin/render.h"
#include "admin/socket.h"
#include "proxy/compare.h"
#include "proxy/log.h"
#include "proxy/mirror.h"
#include "proxy/notify.h"
#include "proxy/relay.h"
#include "proxy/seqsync.h"
#include "proxy/session.h"
#include "rules/catalog.h"
#include "rules/sql.h"
#include "rules/state.h"

#define ACCEPT_BURST   64 /* connections accepted per readiness callback */
#define MIRROR_POLL_MS 50 /* stopping: how often the mirrors' queues are looked at */

static void errors_add(pd_config_errors_t *errs, const char *msg)
{
    char **msgs = realloc(errs->msgs, (errs->count + 1) * sizeof *msgs);
    if (msgs == NULL)
        return;
    errs->msgs = msgs;
    if ((msgs[errs->count] = strdup(msg)) != NULL)
        errs->count++;
}

static void print_errors(pd_config_errors_t *errs)
{
    for (size_t i = 0; i < errs->count; i++)
        pd_log_error(NULL, "%s", errs->msgs[i]);
}

/* ---------------------------------------------------------------------------------------
 * Users and TLS material: built from a config, swapped in whole.
 */

/* Everything derived from one config file; built off the loop, swapped in whole. */
typedef struct {
    pd_config_t *cfg;
    pd_users_t *users;
    pd_auth_entry_t *auth;
    SSL_CTX *ssl_ctx;
    pd_rule_facts_t *facts;
    pd_sql_t *sql;
} material_t;

static void material_free(material_t *m)
{
    if (m->auth != NULL && m->users != NULL)
        OPENSSL_cleanse(m->auth, m->users->count * sizeof *m->auth);
    free(m->auth);
    pd_users_free(m->users);
    SSL_CTX_free(m->ssl_ctx);
    pd_sql_free(m->sql);
    if (m->cfg != NULL)
        pd_catalog_free(m->facts, m->cfg->rule_count);
    pd_config_free(m->cfg);
    *m = (material_t){0};
}

static material_t material_take(pd_server_t *srv)
{
    material_t m = {srv->cfg, srv->users, srv->auth, srv->ssl_ctx, srv->facts, srv->sql};
    srv->cfg = NULL;
    srv->users = NULL;
    srv->auth = NULL;
    srv->ssl_ctx = NULL;
    srv->facts = NULL;
    srv->sql = NULL;
    return m;
}

static void material_give(pd_server_t *srv, material_t *m)
{
    srv->cfg = m->cfg;
    if (m->cfg != NULL)
        PD_SET(srv->max_message, m->cfg->max_message_size);
    srv->users = m->users;
    srv->auth = m->auth;
    srv->ssl_ctx = m->ssl_ctx;
    srv->facts = m->facts;
    srv->sql = m->sql;
    *m = (material_t){0};
}

static int load_users(const pd_config_t *cfg, material_t *m)
{
    if (cfg->users_file == NULL)
        return 0;
    pd_config_errors_t errs = {0};
    m->users = pd_users_load(cfg->users_file, &errs);
    print_errors(&errs);
    pd_config_errors_free(&errs);
    if (m->users == NULL)
        return -1;
    m->auth = calloc(m->users->count + 1, sizeof *m->auth);
    if (m->auth == NULL)
        return -1;
    for (size_t i = 0; i < m->users->count; i++) {
        const pd_user_t *u = &m->users->users[i];
        m->auth[i].user = u;
        bool ok;
        if (u->is_scram) {
            ok = pd_scram_secret_parse(u->secret, &m->auth[i].secret);
        } else {
            /* Derived once here: PBKDF2 is too slow to run per login on the loop. */
            uint8_t salt[16];
            ok = RAND_bytes(salt, sizeof salt) == 1 &&
                 pd_scram_secret_from_password(u->secret, salt, sizeof salt, PD_SCRAM_DEFAULT_ITER,
                                               &m->auth[i].secret);
        }
        if (!ok) {
            pd_log_error(NULL,
                         "%s: the entry for user \"%s\" is not a valid SCRAM-SHA-256 verifier",
                         cfg->users_file, u->name);
            return -1;
        }
    }
    return 0;
}

static int load_tls(const pd_config_t *cfg, material_t *m)
{
    if (cfg->tls_mode == PD_TLS_DISABLE || cfg->tls_cert == NULL || cfg->tls_key == NULL)
        return 0;
    m->ssl_ctx = SSL_CTX_new(TLS_server_method());
    if (m->ssl_ctx == NULL)
        return -1;
    SSL_CTX_set_min_proto_version(m->ssl_ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(m->ssl_ctx, SSL_OP_NO_RENEGOTIATION);
    const char *what = NULL, *file = NULL;
    if (SSL_CTX_use_certificate_chain_file(m->ssl_ctx, cfg->tls_cert) != 1)
        what = "certificate", file = cfg->tls_cert;
    else if (SSL_CTX_use_PrivateKey_file(m->ssl_ctx, cfg->tls_key, SSL_FILETYPE_PEM) != 1)
        what = "private key", file = cfg->tls_key;
    else if (SSL_CTX_check_private_key(m->ssl_ctx) != 1)
        what = "private key (it does not match the certificate)", file = cfg->tls_key;
    if (what != NULL) {
        char buf[256];
        ERR_error_string_n(ERR_get_error(), buf, sizeof buf);
        pd_log_error(NULL, "could not load TLS %s \"%s\": %s", what, file, buf);
        ERR_clear_error();
        return -1;
    }
    return 0;
}

#define SQL_CACHE_ENTRIES 4096

/*
 * Loads what the config names (users file, TLS material) and the catalog facts of its
 * rules. Blocking (files, PBKDF2, libpq): at start, or on a worker thread for reloads.
 * Takes ownership of cfg in m->cfg. A rule whose facts fail to load is logged and then
 * refused when a statement concerns it; it does not stop the server.
 */
static int material_load(pd_config_t *cfg, material_t *m)
{
    *m = (material_t){.cfg = cfg};
    if (load_users(cfg, m) != 0 || load_tls(cfg, m) != 0) {
        material_free(m);
        return -1;
    }
    m->facts = pd_catalog_load(cfg);
    if (m->facts == NULL) {
        material_free(m);
        return -1;
    }
    for (unsigned i = 0; i < cfg->rule_count; i++)
        if (m->facts[i].error != NULL)
            pd_log_error(NULL, "%s", m->facts[i].error);
    return 0;
}

/* The rewriter needs the facts; cheap, so it is built on the loop thread. */
static int material_finish(material_t *m)
{
    const pd_table_facts_t *facts[m->cfg->rule_count + 1];
    for (unsigned i = 0; i < m->cfg->rule_count; i++)
        facts[i] = &m->facts[i].table;
    m->sql = pd_sql_new(m->cfg, facts, SQL_CACHE_ENTRIES);
    return m->sql != NULL ? 0 : -1;
}

/* A paused database (pgdualctl pause, switchover). */
struct pd_pause {
    struct pd_pause *next;
    uint64_t since_ms;
    char database[];
};

static bool new_authoritative(pd_writes_t w)
{
    return w == PD_WRITES_DUAL_NEW || w == PD_WRITES_NEW;
}

/* The checks are pure and shared with `pgdual --check` (rules/flags.c). */
static const char *database_refusal(const pd_config_t *cfg, const pd_rule_flags_t *flags,
                                    unsigned rule, pd_writes_t writes, const pd_reads_t *reads)
{
    return pd_flags_database_refusal(cfg, flags, rule, writes, reads, NULL);
}

bool pd_server_new_authoritative(const pd_server_t *srv, const char *database)
{
    for (unsigned i = 0; i < srv->cfg->rule_count; i++)
        if (srv->cfg->rules[i].kind == PD_RULE_TABLES &&
            strcmp(srv->cfg->rules[i].database, database) == 0)
            return new_authoritative(srv->flags[i].writes);
    return false;
}

static const char *flags_refusal(const pd_rule_cfg_t *r, pd_writes_t writes,
                                 const pd_reads_t *reads)
{
    return pd_flags_refusal(r, writes, reads, NULL);
}

const char *pd_server_check_flags(const pd_server_t *srv, unsigned rule, pd_writes_t writes,
                                  const pd_reads_t *reads)
{
    const char *why = flags_refusal(&srv->cfg->rules[rule], writes, reads);
    return why != NULL ? why : database_refusal(srv->cfg, srv->flags, rule, writes, reads);
}

/* Flags in force: the state's (operators' changes) or else the config's initial ones. */
static pd_rule_flags_t *flags_compute(pd_state_t *state, const pd_config_t *cfg)
{
    pd_rule_flags_t *flags = calloc(cfg->rule_count + 1, sizeof *flags);
    if (flags == NULL)
        return NULL;
    for (unsigned i = 0; i < cfg->rule_count; i++) {
        const pd_rule_cfg_t *r = &cfg->rules[i];
        if (!pd_state_flags(state, r->name, &flags[i].writes, &flags[i].reads)) {
            flags[i].writes = r->writes;
            flags[i].reads = r->reads;
        }
        const char *refusal = flags_refusal(r, flags[i].writes, &flags[i].reads);
        if (refusal != NULL) {
            pd_log_error(NULL, "rule \"%s\": %s", r->name, refusal);
            pd_log_error(NULL, "HINT:  Change the rule's flags in the config (or, when they "
                               "come from the state file, with pgdualctl flag before).");
            free(flags);
            return NULL;
        }
    }
    for (unsigned i = 0; i < cfg->rule_count; i++) {
        const char *refusal = database_refusal(cfg, flags, i, flags[i].writes, &flags[i].reads);
        if (refusal != NULL) {
            pd_log_error(NULL, "rule \"%s\": %s", cfg->rules[i].name, refusal);
            free(flags);
            return NULL;
        }
    }
    return flags;
}

static void stats_names_free(pd_server_t *srv)
{
    for (unsigned j = 0; j < srv->stats_count; j++)
        free(srv->stats_names[j]);
    free(srv->stats_names);
    srv->stats_names = NULL;
    srv->stats_count = 0;
}

/* Installs flags (taken over) for srv->cfg, carrying counters over by rule name. */
static int flags_build(pd_server_t *srv, pd_rule_flags_t *flags)
{
    /* Counters follow their rule by name across reloads. */
    pd_rule_stats_t *stats = calloc(srv->cfg->rule_count + 1, sizeof *stats);
    if (stats == NULL) {
        free(flags);
        return -1;
    }
    for (unsigned i = 0; i < srv->cfg->rule_count && srv->stats != NULL; i++)
        for (unsigned j = 0; j < srv->stats_count; j++)
            if (strcmp(srv->stats_names[j], srv->cfg->rules[i].name) == 0)
                stats[i] = srv->stats[j];
    free(srv->flags);
    srv->flags = flags;
    free(srv->stats);
    srv->stats = stats;
    stats_names_free(srv);
    srv->stats_names = calloc(srv->cfg->rule_count + 1, sizeof *srv->stats_names);
    for (unsigned i = 0; srv->stats_names != NULL && i < srv->cfg->rule_count; i++)
        if ((srv->stats_names[i] = strdup(srv->cfg->rules[i].name)) != NULL)
            srv->stats_count = i + 1;
    return 0;
}

const pd_auth_entry_t *pd_server_auth_entry(const pd_server_t *srv, const char *user)
{
    if (srv->users == NULL || user == NULL)
        return NULL;
    for (size_t i = 0; i < srv->users->count; i++)
        if (strcmp(srv->auth[i].user->name, user) == 0)
            return &srv->auth[i];
    return NULL;
}

/* ---------------------------------------------------------------------------------------
 * Listener
 */

static void free_handle(uv_handle_t *h)
{
    free(h);
}

static void peer_name(const struct sockaddr_storage *ss, char *out, size_t size)
{
    char host[INET6_ADDRSTRLEN] = "?";
    unsigned port = 0;
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
        port = ntohs(in->sin_port);
    } else if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)ss;
        inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
        port = ntohs(in6->sin6_port);
    }
    snprintf(out, size, "%s:%u", host, port);
}

static void on_listen(uv_poll_t *h, int status, int events)
{
    pd_server_t *srv = h->data;
    (void)events;
    if (status < 0)
        return;
    for (int i = 0; i < ACCEPT_BURST; i++) {
        struct sockaddr_storage ss;
        socklen_t len = sizeof ss;
        int fd =
            accept4(srv->listen_fd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE)
                pd_log_warning(NULL,
                               "could not accept a connection: %s (raise the open "
                               "files limit, ulimit -n)",
                               strerror(errno));
            return;
        }
        /* Past the configured limit, sessions are still started so that they can be
         * told "too many clients" properly; far past it, the socket is just closed. */
        if (srv->nsessions >= srv->cfg->max_clients + 64u) {
            close(fd);
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        char peer[64];
        peer_name(&ss, peer, sizeof peer);
        pd_session_accept(srv, fd, peer);
    }
}

static int open_listener(pd_server_t *srv)
{
    const pd_config_t *cfg = srv->cfg;
    char port[16];
    snprintf(port, sizeof port, "%u", cfg->listen_port);
    struct addrinfo hints = {
        .ai_flags = AI_PASSIVE, .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    struct addrinfo *res = NULL;
    const char *host =
        cfg->listen_host && strcmp(cfg->listen_host, "*") != 0 ? cfg->listen_host : NULL;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0) {
        pd_log_error(NULL, "could not resolve listen address \"%s\": %s", cfg->listen_host,
                     gai_strerror(rc));
        return -1;
    }
    int fd = -1, err = 0;
    for (struct addrinfo *ai = res; ai != NULL && fd < 0; ai = ai->ai_next) {
        fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            err = errno;
            continue;
        }
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) != 0 || listen(fd, 1024) != 0) {
            err = errno;
            close(fd);
            fd = -1;
        }
    }
    freeaddrinfo(res);
    if (fd < 0) {
        pd_log_error(NULL, "could not listen on %s:%u: %s", cfg->listen_host, cfg->listen_port,
                     strerror(err));
        pd_log_error(NULL, "HINT:  Is another pgdual or PostgreSQL using the port? Change "
                           "listen.port in the config.");
        return -1;
    }
    srv->listen_fd = fd;
    srv->listen_poll = malloc(sizeof *srv->listen_poll);
    if (srv->listen_poll == NULL || uv_poll_init_socket(srv->loop, srv->listen_poll, fd) != 0) {
        free(srv->listen_poll);
        srv->listen_poll = NULL;
        return -1;
    }
    srv->listen_poll->data = srv;
    uv_poll_start(srv->listen_poll, UV_READABLE, on_listen);
    pd_log_info(NULL, "pgdual listening on %s:%u", cfg->listen_host, cfg->listen_port);
    return 0;
}

static void close_listener(pd_server_t *srv)
{
    if (srv->listen_poll != NULL) {
        uv_close((uv_handle_t *)srv->listen_poll, free_handle);
        srv->listen_poll = NULL;
    }
    if (srv->listen_fd >= 0)
        close(srv->listen_fd);
    srv->listen_fd = -1;
}

/* ---------------------------------------------------------------------------------------
 * Sessions and shutdown
 */

/* Closes the server's own handles; uv_run returns once the last session is gone. */
static void finish(pd_server_t *srv)
{
    close_listener(srv);
    pd_mirror_close_all(srv);
    pd_seqsync_stop(srv);
    pd_cutover_stop_all(srv);
    pd_fleet_stop(srv->fleet);
    srv->fleet = NULL;
    pd_admin_stop(srv->admin);
    srv->admin = NULL;
    pd_metrics_stop(srv->metrics);
    srv->metrics = NULL;
    pd_relay_stop(srv); /* no session is left on them */
    uv_handle_t *handles[] = {(uv_handle_t *)&srv->sig_int,      (uv_handle_t *)&srv->sig_term,
                              (uv_handle_t *)&srv->sig_hup,      (uv_handle_t *)&srv->drain_timer,
                              (uv_handle_t *)&srv->mirror_timer, (uv_handle_t *)&srv->recheck_timer,
                              (uv_handle_t *)&srv->shadow_timer};
    for (size_t i = 0; i < sizeof handles / sizeof handles[0]; i++)
        if (!uv_is_closing(handles[i]))
            uv_close(handles[i], NULL);
}

static void on_mirror_poll(uv_timer_t *t);

/*
 * Stopping, and the last session is gone. A graceful stop also waits for the mirrors
 * whose sessions ended (commit: async) to apply what they have queued, so that a restart
 * leaves green no write behind; the grace period bounds the wait (then stop_fast, and
 * what is left is recorded as mirror_unapplied).
 */
static void maybe_finish(pd_server_t *srv)
{
    if (!srv->stopping || srv->nsessions > 0)
        return;
    pd_mirror_totals_t t;
    pd_mirror_totals(srv, &t);
    if (!srv->stop_fast && t.busy > 0) {
        if (!uv_is_active((uv_handle_t *)&srv->mirror_timer)) {
            pd_log_info(NULL,
                        "waiting for the mirrors to apply what their sessions left (%u "
                        "connections, %llu statements queued)",
                        t.busy, t.queued);
            uv_timer_start(&srv->mirror_timer, on_mirror_poll, MIRROR_POLL_MS, MIRROR_POLL_MS);
        }
        return;
    }
    finish(srv);
}

static void on_mirror_poll(uv_timer_t *t)
{
    maybe_finish(t->data);
}

void pd_server_session_added(pd_server_t *srv, pd_session_t *s)
{
    s->prev = NULL;
    s->next = srv->sessions;
    if (srv->sessions != NULL)
        srv->sessions->prev = s;
    srv->sessions = s;
    srv->nsessions++;
    srv->total_sessions++;
    PD_ADD(srv->state_counts[s->state], 1u);
}

void pd_server_session_removed(pd_server_t *srv, pd_session_t *s)
{
    if (s->prev != NULL)
        s->prev->next = s->next;
    else
        srv->sessions = s->next;
    if (s->next != NULL)
        s->next->prev = s->prev;
    s->prev = s->next = NULL;
    srv->nsessions--;
    PD_ADD(srv->state_counts[s->state], -1u);
    maybe_finish(srv);
}

static void shutdown_all(pd_server_t *srv, bool fast)
{
    pd_session_t *next;
    for (pd_session_t *s = srv->sessions; s != NULL; s = next) {
        next = s->next;
        pd_session_shutdown(s, fast);
    }
}

/*
 * SIGTERM is PostgreSQL's smart shutdown made fit for a proxy behind a load balancer: the
 * listener closes at once, so that new connections are refused and the balancer moves on;
 * sessions between transactions end at once and the others when their transaction ends
 * (pd_session_shutdown), each with FATAL 57P01, since a client of a proxy that is going away
 * would otherwise hold it up for as long as it keeps its connection. What is left after
 * limits.shutdown_grace_ms is ended as by SIGINT, PostgreSQL's fast shutdown: every
 * session now, with FATAL 57P01, a statement in flight cancelled and an open transaction
 * rolled back by the server.
 */
static void stop(pd_server_t *srv, bool now)
{
    if (!srv->stopping) {
        PD_SET(srv->stopping, true);
        close_listener(srv);
        pd_notify_send(srv->notify, "STOPPING=1\nSTATUS=%s shutdown: %u sessions to end",
                       now ? "fast" : "smart", srv->nsessions);
    }
    if (now) {
        srv->stop_fast = true;
        pd_log_info(NULL, "fast shutdown: ending %u sessions", srv->nsessions);
        shutdown_all(srv, true);
    } else {
        pd_log_info(NULL,
                    "smart shutdown: no new connections; %u sessions end at their next "
                    "transaction boundary, or in %u ms (limits.shutdown_grace_ms)",
                    srv->nsessions, srv->cfg->shutdown_grace_ms);
        shutdown_all(srv, false);
    }
    maybe_finish(srv);
}

static void on_drain_timeout(uv_timer_t *t)
{
    pd_server_t *srv = t->data;
    pd_log_info(NULL, "shutdown grace period of %u ms is over", srv->cfg->shutdown_grace_ms);
    stop(srv, true);
}

/* GET /ready of the metrics endpoint: listening and not stopping. */
static bool server_ready(void *ctx)
{
    const pd_server_t *srv = ctx;
    return !srv->stopping && srv->listen_fd >= 0;
}

/* ---------------------------------------------------------------------------------------
 * Reload
 */

typedef struct {
    uv_work_t work;
    pd_server_t *srv;
    material_t m;
    int rc;
    pd_server_reload_cb cb;
    void *ctx;
} reload_job_t;

static void reload_work(uv_work_t *w)
{
    reload_job_t *job = w->data;
    pd_config_t *cfg = job->m.cfg;
    job->m.cfg = NULL;
    job->rc = material_load(cfg, &job->m);
}

static bool same_string(const char *a, const char *b)
{
    return a == NULL || b == NULL ? a == b : strcmp(a, b) == 0;
}

/* Swaps *a and *b when they differ; says whether they did. */
static bool keep_string(char **next, char **running)
{
    if (same_string(*next, *running))
        return false;
    char *t = *next;
    *next = *running;
    *running = t;
    return true;
}

/*
 * What a reload cannot apply: the listener, the admin socket, the metrics endpoint and the
 * state are opened once, at start. The new config keeps the values in force (the file's
 * go away with the previous config), so that srv->cfg says what runs and the next reload
 * compares with that; the keys the file changed are logged and kept in
 * srv->restart_needed for the reload's reply.
 */
static const char *state_conninfo(const pd_config_t *cfg);

static void keep_restart_keys(pd_server_t *srv, pd_config_t *next)
{
    pd_config_t *run = srv->cfg;
    unsigned n = 0;
    if (next->listen_port != run->listen_port ||
        !same_string(next->listen_host, run->listen_host)) {
        next->listen_port = run->listen_port;
        keep_string(&next->listen_host, &run->listen_host);
        srv->restart_needed[n++] = "listen";
    }
    if (!same_string(next->state, run->state) ||
        !same_string(state_conninfo(next), state_conninfo(run))) {
        keep_string(&next->state, &run->state);
        keep_string(&next->state_conninfo, &run->state_conninfo);
        /* `state: postgres` lives on the first database's old side, which changed: pinned */
        if (!same_string(state_conninfo(next), state_conninfo(run)))
            next->state_conninfo = strdup(state_conninfo(run));
        srv->restart_needed[n++] = "state";
    }
    if (keep_string(&next->admin_socket, &run->admin_socket))
        srv->restart_needed[n++] = "admin.socket";
    if (keep_string(&next->admin_metrics, &run->admin_metrics))
        srv->restart_needed[n++] = "admin.metrics";
    if (next->relay_threads != run->relay_threads) {
        next->relay_threads = run->relay_threads;
        srv->restart_needed[n++] = "limits.relay_threads";
    }
    srv->restart_needed[n] = NULL;
    char list[128] = "";
    for (unsigned i = 0; i < n; i++)
        snprintf(list + strlen(list), sizeof list - strlen(list), "%s%s", i > 0 ? ", " : "",
                 srv->restart_needed[i]);
    if (n > 0)
        pd_log_warning(NULL,
                       "the config file changes %s, which take effect only after a restart of "
                       "pgdual; the values in force are kept until then",
                       list);
}

/* divergence.log is applied by opening the new file (before anything is swapped in). */
static int reopen_divergence(pd_server_t *srv, const pd_config_t *next, pd_divergence_log_t **out)
{
    *out = NULL;
    if (same_string(next->divergence_log, srv->cfg->divergence_log))
        return 0;
    char *err = NULL;
    *out = pd_divergence_open(next->divergence_log, &err);
    if (*out == NULL)
        pd_log_error(NULL, "%s", err ? err : "out of memory");
    free(err);
    return *out != NULL ? 0 : -1;
}

static void reload_done(uv_work_t *w, int status)
{
    reload_job_t *job = w->data;
    pd_server_t *srv = job->srv;
    srv->reloading = false;
    const char *error = NULL;
    if (status != 0 || job->rc != 0)
        error = "the users file, TLS material or catalog could not be loaded (see the log)";
    else if (material_finish(&job->m) != 0)
        error = "out of memory";
    pd_rule_flags_t *flags = NULL;
    if (error == NULL && (flags = flags_compute(srv->state, job->m.cfg)) == NULL)
        error = "a rule's flags cannot be served (see the log)";
    pd_divergence_log_t *divergence = NULL;
    if (error == NULL && reopen_divergence(srv, job->m.cfg, &divergence) != 0)
        error = "the divergence log could not be opened (see the log)";
    if (error != NULL) {
        pd_log_error(NULL, "reload failed: %s; still running with the previous configuration",
                     error);
        pd_notify_send(srv->notify, "READY=1\nSTATUS=reload failed; running with the previous "
                                    "configuration");
        free(flags);
        material_free(&job->m);
    } else {
        keep_restart_keys(srv, job->m.cfg);
        if (divergence != NULL) {
            pd_divergence_close(srv->divergence);
            srv->divergence = divergence;
            pd_log_info(NULL, "divergence events now go to %s%s%s",
                        job->m.cfg->divergence_log ? "\"" : "",
                        job->m.cfg->divergence_log ? job->m.cfg->divergence_log
                                                   : "no file (divergence.log removed)",
                        job->m.cfg->divergence_log ? "\"" : "");
        }
        material_t prev = material_take(srv);
        material_give(srv, &job->m);
        material_free(&prev);
        flags_build(srv, flags);
        srv->config_generation++;
        srv->rules_generation++;
        pd_sessions_recall(srv);
        pd_log_set_level(srv->cfg->log_level);
        pd_log_info(NULL, "configuration reloaded: %u databases, %u rules",
                    srv->cfg->database_count, srv->cfg->rule_count);
        pd_notify_send(srv->notify,
                       "READY=1\nSTATUS=configuration reloaded: %u databases, %u rules",
                       srv->cfg->database_count, srv->cfg->rule_count);
    }
    if (job->cb != NULL)
        job->cb(srv, error, job->ctx);
    free(job);
}

int pd_server_reload(pd_server_t *srv, pd_config_errors_t *errs, pd_server_reload_cb cb, void *ctx)
{
    if (srv->reloading) {
        errors_add(errs, "a reload is already in progress; try again in a moment");
        return -1;
    }
    pd_config_t *cfg = pd_config_load(srv->cfg->path, errs);
    if (cfg == NULL) {
        print_errors(errs);
        pd_log_error(NULL, "reload failed: the configuration above has errors; still running "
                           "with the previous one");
        return -1;
    }
    reload_job_t *job = calloc(1, sizeof *job);
    if (job == NULL) {
        pd_config_free(cfg);
        return -1;
    }
    *job = (reload_job_t){.srv = srv, .m = {.cfg = cfg}, .cb = cb, .ctx = ctx};
    job->work.data = job;
    if (uv_queue_work(srv->loop, &job->work, reload_work, reload_done) != 0) {
        pd_config_free(cfg);
        free(job);
        return -1;
    }
    srv->reloading = true;
    pd_notify_reloading(srv->notify);
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * Catalog rechecks: a rule whose catalog check failed because its database could not be
 * reached (not because a table or column is missing) is checked again every
 * PD_CATALOG_RECHECK_MS on a worker thread, libpq being blocking, until the check gets
 * through: the rule is then served again (or refused for what the check found), without
 * waiting for a reload.
 */

#define RECHECK_CONNECT_TIMEOUT_S 5 /* a recheck must not hold a worker thread long */

typedef struct {
    uv_work_t work;
    pd_server_t *srv;
    pd_config_t *cfg;       /* a reference: a reload may replace srv->cfg meanwhile */
    unsigned generation;    /* srv->config_generation when started; other: discarded */
    bool *which;            /* the rules checked again */
    pd_rule_facts_t *facts; /* owned; their new facts, the others zeroed */
} recheck_job_t;

static void recheck_work(uv_work_t *w)
{
    recheck_job_t *job = w->data;
    for (unsigned i = 0; i < job->cfg->rule_count; i++)
        if (job->which[i])
            pd_catalog_load_rule(job->cfg, i, &job->facts[i], RECHECK_CONNECT_TIMEOUT_S);
}

static void recheck_log(const pd_config_t *cfg, unsigned i, const pd_rule_facts_t *f)
{
    const pd_rule_cfg_t *r = &cfg->rules[i];
    if (f->error == NULL)
        pd_log_info(NULL,
                    "rule \"%s\": database \"%s\" can be reached again and its catalog check "
                    "passed: the rule is in force again",
                    r->name, r->database);
    else
        pd_log_error(NULL, "%s (checked again once database \"%s\" could be reached)", f->error,
                     r->database);
}

/*
 * Takes the new facts of the rules whose check got past connecting, with a rewriter built
 * for them, as a reload does; the facts they replace go to the job, to be freed with it.
 */
static void recheck_install(pd_server_t *srv, recheck_job_t *job)
{
    unsigned n = srv->cfg->rule_count;
    bool take[n + 1], any = false;
    for (unsigned i = 0; i < n; i++) {
        take[i] = job->which[i] && !job->facts[i].unreachable;
        any |= take[i];
        if (job->which[i] && !take[i])
            pd_log_debug(NULL,
                         "rule \"%s\": database \"%s\" still cannot be reached; checking "
                         "again in %u s",
                         srv->cfg->rules[i].name, srv->cfg->rules[i].database,
                         PD_CATALOG_RECHECK_MS / 1000);
    }
    if (!any)
        return;
    pd_rule_facts_t *next = calloc(n + 1, sizeof *next);
    if (next == NULL)
        return;
    const pd_table_facts_t *tables[n + 1];
    for (unsigned i = 0; i < n; i++) {
        next[i] = take[i] ? job->facts[i] : srv->facts[i];
        tables[i] = &next[i].table;
    }
    pd_sql_t *sql = pd_sql_new(srv->cfg, tables, SQL_CACHE_ENTRIES);
    if (sql == NULL) {
        free(next); /* nothing moved yet: tried again at the next tick */
        return;
    }
    for (unsigned i = 0; i < n; i++) {
        if (!take[i])
            continue;
        recheck_log(srv->cfg, i, &next[i]);
        job->facts[i] = srv->facts[i];
    }
    free(srv->facts);
    srv->facts = next;
    pd_sql_free(srv->sql);
    srv->sql = sql;
    srv->rules_generation++; /* prepared statements are decided again at their next Bind */
}

static void recheck_done(uv_work_t *w, int status)
{
    recheck_job_t *job = w->data;
    pd_server_t *srv = job->srv;
    srv->rechecking = false;
    if (status == 0 && !srv->stopping && job->generation == srv->config_generation)
        recheck_install(srv, job);
    pd_catalog_free(job->facts, job->cfg->rule_count);
    pd_config_free(job->cfg);
    free(job->which);
    free(job);
}

static void on_recheck(uv_timer_t *t)
{
    pd_server_t *srv = t->data;
    if (srv->stopping || srv->reloading || srv->rechecking || srv->facts == NULL)
        return;
    unsigned n = srv->cfg->rule_count;
    bool any = false;
    for (unsigned i = 0; i < n; i++)
        any |= srv->facts[i].unreachable;
    if (!any)
        return;
    recheck_job_t *job = calloc(1, sizeof *job);
    if (job == NULL)
        return;
    job->which = calloc(n + 1, sizeof *job->which);
    job->facts = calloc(n + 1, sizeof *job->facts);
    if (job->which == NULL || job->facts == NULL) {
        free(job->which);
        free(job->facts);
        free(job);
        return;
    }
    for (unsigned i = 0; i < n; i++)
        job->which[i] = srv->facts[i].unreachable;
    job->srv = srv;
    job->generation = srv->config_generation;
    job->cfg = pd_config_ref(srv->cfg);
    job->work.data = job;
    if (uv_queue_work(srv->loop, &job->work, recheck_work, recheck_done) != 0) {
        pd_catalog_free(job->facts, n);
        pd_config_free(job->cfg);
        free(job->which);
        free(job);
        return;
    }
    srv->rechecking = true;
}

static void on_signal(uv_signal_t *h, int signum)
{
    pd_server_t *srv = h->data;
    switch (signum) {
    case SIGHUP: {
        pd_log_info(NULL, "received SIGHUP, reloading configuration");
        pd_config_errors_t errs = {0};
        pd_server_reload(srv, &errs, NULL, NULL);
        pd_config_errors_free(&errs);
        break;
    }
    case SIGTERM:
        pd_log_info(NULL, "received SIGTERM");
        if (!srv->stopping)
            uv_timer_start(&srv->drain_timer, on_drain_timeout, srv->cfg->shutdown_grace_ms, 0);
        stop(srv, false);
        break;
    default:
        pd_log_info(NULL, "received SIGINT");
        stop(srv, true);
        break;
    }
}

/* `state: postgres` keeps it on the old side of the first database; `{postgres: C}` at C. */
static const char *state_conninfo(const pd_config_t *cfg)
{
    if (cfg->state_conninfo != NULL)
        return cfg->state_conninfo;
    if (cfg->state != NULL && strcmp(cfg->state, "postgres") == 0 && cfg->database_count > 0)
        return cfg->databases[0].old;
    return NULL;
}

static int open_state(pd_server_t *srv)
{
    const pd_config_t *cfg = srv->cfg;
    const char *conninfo = state_conninfo(cfg);
    char *err = NULL;
    srv->state =
        conninfo != NULL ? pd_state_open_postgres(conninfo, &err) : pd_state_open(cfg->state, &err);
    if (srv->state == NULL) {
        pd_log_error(NULL, "%s", err ? err : "out of memory");
        pd_log_error(NULL, conninfo != NULL
                               ? "HINT:  The state lives in schema pgdual of that database: its "
                                 "conninfo must name a user that may create the schema (or "
                                 "use `state: { postgres: CONNINFO }`)."
                               : "HINT:  Move the file away to start with the config's initial "
                                 "flags, or fix it.");
        free(err);
        return -1;
    }
    if (cfg->state == NULL)
        pd_log_warning(NULL, "no `state` file configured: flag changes are lost on restart");
    return 0;
}

int pd_server_init(pd_server_t *srv, uv_loop_t *loop, pd_config_t *cfg)
{
    *srv = (pd_server_t){.loop = loop, .listen_fd = -1};
    if (RAND_bytes(srv->mock_key, sizeof srv->mock_key) != 1) {
        pd_log_error(NULL, "could not draw random bytes from OpenSSL");
        return -1;
    }
    pd_log_set_level(cfg->log_level);
    material_t m;
    if (material_load(cfg, &m) != 0)
        return -1;
    if (material_finish(&m) != 0) {
        material_free(&m);
        return -1;
    }
    material_give(srv, &m);
    if (cfg->tls_mode != PD_TLS_DISABLE && srv->ssl_ctx == NULL) {
        pd_log_error(NULL, "tls.mode %s needs tls.cert and tls.key",
                     cfg->tls_mode == PD_TLS_REQUIRE ? "require" : "allow");
        return -1;
    }
    srv->pass_result = calloc(1, sizeof *srv->pass_result);
    if (srv->pass_result == NULL)
        return -1;
    *srv->pass_result = (pd_sql_result_t){.refs = 1, .action = PD_SQL_PASS, .rule = -1};
    if (open_state(srv) != 0)
        return -1;
    pd_rule_flags_t *flags = flags_compute(srv->state, srv->cfg);
    if (flags == NULL || flags_build(srv, flags) != 0)
        return -1;
    char *err = NULL;
    srv->divergence = pd_divergence_open(cfg->divergence_log, &err);
    if (srv->divergence == NULL) {
        pd_log_error(NULL, "%s", err ? err : "out of memory");
        free(err);
        return -1;
    }
    srv->started_ms = uv_now(loop);
    if (open_listener(srv) != 0)
        return -1;
    if ((srv->jobs = pd_jobs_new(srv->state)) == NULL)
        return -1;
    if (cfg->admin_socket != NULL && (srv->admin = pd_admin_start(srv, cfg->admin_socket)) == NULL)
        return -1;
    if (cfg->admin_metrics != NULL &&
        (srv->metrics = pd_metrics_start(loop, cfg->admin_metrics, pd_render_metrics, server_ready,
                                         srv)) == NULL)
        return -1;
    if (pd_seqsync_start(srv) != 0)
        return -1;
    const char *conninfo = state_conninfo(cfg);
    if (conninfo != NULL && (srv->fleet = pd_fleet_start(srv, conninfo)) == NULL)
        return -1;
    uv_signal_init(loop, &srv->sig_int);
    uv_signal_init(loop, &srv->sig_term);
    uv_signal_init(loop, &srv->sig_hup);
    uv_timer_init(loop, &srv->drain_timer);
    uv_timer_init(loop, &srv->mirror_timer);
    uv_timer_init(loop, &srv->shadow_timer);
    uv_timer_init(loop, &srv->recheck_timer);
    srv->recheck_timer.data = srv;
    uv_timer_start(&srv->recheck_timer, on_recheck, PD_CATALOG_RECHECK_MS, PD_CATALOG_RECHECK_MS);
    srv->sig_int.data = srv->sig_term.data = srv->sig_hup.data = srv->drain_timer.data = srv;
    srv->mirror_timer.data = srv;
    srv->shadow_timer.data = srv;
    uv_signal_start(&srv->sig_int, on_signal, SIGINT);
    uv_signal_start(&srv->sig_term, on_signal, SIGTERM);
    uv_signal_start(&srv->sig_hup, on_signal, SIGHUP);
    return pd_relay_start(srv);
}

int pd_server_run(pd_server_t *srv)
{
    pd_notify_send(srv->notify, "READY=1\nSTATUS=accepting connections on %s:%u",
                   srv->cfg->listen_host, srv->cfg->listen_port);
    uv_run(srv->loop, UV_RUN_DEFAULT);
    return srv->exit_code;
}

void pd_server_free(pd_server_t *srv)
{
    pd_relay_stop(srv);
    free(srv->relays);
    srv->relays = NULL;
    srv->nrelays = 0;
    material_t m = material_take(srv);
    material_free(&m);
    /* Jobs first: their threads write checkpoints into the state. */
    pd_jobs_free(srv->jobs);
    srv->jobs = NULL;
    pd_state_free(srv->state);
    while (srv->pauses != NULL) {
        struct pd_pause *p = srv->pauses;
        srv->pauses = p->next;
        free(p);
    }
    while (srv->traffic != NULL) {
        pd_traffic_t *t = srv->traffic;
        srv->traffic = t->next;
        free(t);
    }
    srv->state = NULL;
    free(srv->flags);
    srv->flags = NULL;
    free(srv->stats);
    srv->stats = NULL;
    stats_names_free(srv);
    pd_divergence_close(srv->divergence);
    srv->divergence = NULL;
    pd_sql_result_release(srv->pass_result);
    srv->pass_result = NULL;
}

int pd_server_set_flags(pd_server_t *srv, unsigned rule, pd_writes_t writes,
                        const pd_reads_t *reads, const char *who, char **err)
{
    if (pd_state_set_flags(srv->state, srv->cfg->rules[rule].name, writes, reads, who, err) != 0)
        return -1;
    pd_server_flags_saved(srv, rule, writes, reads, who);
    return 0;
}

void pd_server_flags_saved(pd_server_t *srv, unsigned rule, pd_writes_t writes,
                           const pd_reads_t *reads, const char *who)
{
    const char *name = srv->cfg->rules[rule].name;
    srv->flags[rule].writes = writes;
    srv->flags[rule].reads = *reads;
    srv->rules_generation++; /* prepared statements are decided again at their next Bind */
    char rtext[32];
    pd_log_info(NULL, "rule \"%s\": flags set to writes=%s reads=%s by %s", name,
                pd_writes_name(writes), pd_reads_format(reads, rtext, sizeof rtext), who);
}

void pd_server_apply_state(pd_server_t *srv)
{
    const pd_config_t *cfg = srv->cfg;
    pd_rule_flags_t *next = malloc((cfg->rule_count + 1) * sizeof *next);
    if (next == NULL)
        return;
    memcpy(next, srv->flags, cfg->rule_count * sizeof *next);
    bool changed = false;
    for (unsigned i = 0; i < cfg->rule_count; i++) {
        pd_rule_flags_t f;
        if (!pd_state_flags(srv->state, cfg->rules[i].name, &f.writes, &f.reads))
            continue;
        changed |= f.writes != next[i].writes || f.reads.mode != next[i].reads.mode ||
                   f.reads.percent != next[i].reads.percent;
        next[i] = f;
    }
    /* Checked together: a database's tables rules flip at once. */
    for (unsigned i = 0; changed && i < cfg->rule_count; i++) {
        const char *why = flags_refusal(&cfg->rules[i], next[i].writes, &next[i].reads);
        if (why == NULL)
            why = database_refusal(cfg, next, i, next[i].writes, &next[i].reads);
        if (why != NULL) {
            pd_log_error(NULL,
                         "rule \"%s\": the shared state (version %lld) holds flags this "
                         "instance refuses: %s; the flags in force stay",
                         cfg->rules[i].name, (long long)pd_state_version(srv->state), why);
            changed = false;
        }
    }
    for (unsigned i = 0; changed && i < cfg->rule_count; i++) {
        if (next[i].writes == srv->flags[i].writes &&
            next[i].reads.mode == srv->flags[i].reads.mode &&
            next[i].reads.percent == srv->flags[i].reads.percent)
            continue;
        char rtext[32];
        pd_log_info(NULL,
                    "rule \"%s\": flags set to writes=%s reads=%s from the shared state "
                    "(version %lld)",
                    cfg->rules[i].name, pd_writes_name(next[i].writes),
                    pd_reads_format(&next[i].reads, rtext, sizeof rtext),
                    (long long)pd_state_version(srv->state));
    }
    if (changed) {
        memcpy(srv->flags, next, cfg->rule_count * sizeof *next);
        srv->rules_generation++;
    }
    free(next);
}

/* ---------------------------------------------------------------------------------------
 * Pauses
 */

static struct pd_pause **pause_find(pd_server_t *srv, const char *database)
{
    struct pd_pause **pp = &srv->pauses;
    while (*pp != NULL && strcmp((*pp)->database, database) != 0)
        pp = &(*pp)->next;
    return pp;
}

int pd_server_pause(pd_server_t *srv, const char *database)
{
    if (*pause_find(srv, database) != NULL)
        return -1;
    size_t n = strlen(database) + 1;
    struct pd_pause *p = malloc(sizeof *p + n);
    if (p == NULL)
        return -1;
    memcpy(p->database, database, n);
    p->since_ms = uv_now(srv->loop);
    p->next = srv->pauses;
    srv->pauses = p;
    srv->npauses++;
    return 0;
}

void pd_server_resume(pd_server_t *srv, const char *database)
{
    struct pd_pause **pp = pause_find(srv, database);
    struct pd_pause *p = *pp;
    if (p == NULL)
        return;
    *pp = p->next;
    free(p);
    srv->npauses--;
    for (pd_session_t *s = srv->sessions; s != NULL; s = s->next)
        if (s->gate_held && s->database != NULL && strcmp(s->database, database) == 0)
            pd_session_wake(s);
}

bool pd_server_paused(const pd_server_t *srv, const char *database)
{
    return pd_server_paused_since(srv, database) != 0;
}

uint64_t pd_server_paused_since(const pd_server_t *srv, const char *database)
{
    for (const struct pd_pause *p = srv->pauses; p != NULL; p = p->next)
        if (strcmp(p->database, database) == 0)
            return p->since_ms ? p->since_ms : 1;
    return 0;
}

pd_traffic_t *pd_server_traffic(pd_server_t *srv, const char *database)
{
    for (pd_traffic_t *t = srv->traffic; t != NULL; t = t->next)
        if (strcmp(t->database, database) == 0)
            return t;
    size_t n = strlen(database) + 1;
    pd_traffic_t *t = calloc(1, sizeof *t + n);
    if (t == NULL)
        return NULL;
    memcpy(t->database, database, n);
    t->next = srv->traffic;
    srv->traffic = t;
    return t;
}
