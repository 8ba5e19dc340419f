/*
 * socket.c — the admin socket server and its command table.
 *
 * The table {verb, arguments, handler, usage} is the single description of the
 * commands: dispatch, argument checks and the help text come from it.
 */
#include "admin/socket.h"

#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "proxy/log.h"
#include "proxy/session.h"

#define LINE_MAX_LEN 65536
#define MAX_WORDS    16

struct pd_admin {
    pd_server_t *srv;
    uv_pipe_t listener;
    char *path;
    struct admin_conn *conns;
};

typedef struct admin_conn {
    uv_pipe_t pipe;
    pd_admin_t *admin;
    struct admin_conn *prev, *next;
    char buf[LINE_MAX_LEN];
    size_t len;
    bool closing;
} admin_conn_t;

/* ---------------------------------------------------------------------------------------
 * Commands
 */

typedef json_t *(*handler_fn)(pd_server_t *srv, int argc, char **argv);

static json_t *reply_error(const char *error, const char *hint)
{
    json_t *r = json_pack("{s:b, s:s}", "ok", 0, "error", error);
    if (hint != NULL)
        json_object_set_new(r, "hint", json_string(hint));
    return r;
}

static json_t *reply_ok(void)
{
    return json_pack("{s:b}", "ok", 1);
}

static json_t *cmd_status(pd_server_t *srv, int argc, char **argv)
{
    (void)argc;
    (void)argv;
    json_t *r = reply_ok();
    json_t *states = json_object();
    for (int st = 0; st < PD_SESSION_NSTATES; st++)
        json_object_set_new(states, pd_session_state_name((pd_session_state_t)st),
                            json_integer(srv->state_counts[st]));
    json_t *dbs = json_array();
    for (unsigned i = 0; i < srv->cfg->database_count; i++) {
        const pd_database_cfg_t *db = &srv->cfg->databases[i];
        /* Conninfo strings may hold passwords: only whether a side exists is shown. */
        json_array_append_new(dbs, json_pack("{s:s, s:b}", "name", db->name, "has_new",
                                             db->new != NULL));
    }
    json_object_set_new(r, "version", json_string(PD_VERSION));
    json_object_set_new(r, "pid", json_integer(getpid()));
    json_object_set_new(r, "uptime_s",
                        json_integer((json_int_t)((uv_now(srv->loop) - srv->started_ms) / 1000)));
    json_object_set_new(r, "listen", json_sprintf("%s:%u", srv->cfg->listen_host,
                                                  srv->cfg->listen_port));
    json_object_set_new(r, "stopping", json_boolean(srv->stopping));
    json_object_set_new(r, "sessions", json_integer(srv->nsessions));
    json_object_set_new(r, "sessions_by_state", states);
    json_object_set_new(r, "sessions_total", json_integer((json_int_t)srv->total_sessions));
    json_object_set_new(r, "databases", dbs);
    json_object_set_new(r, "rules", json_integer(srv->cfg->rule_count));
    return r;
}

static json_t *cmd_sessions(pd_server_t *srv, int argc, char **argv)
{
    (void)argc;
    (void)argv;
    json_t *list = json_array();
    uint64_t now = uv_now(srv->loop);
    for (pd_session_t *s = srv->sessions; s != NULL; s = s->next) {
        char txn[2] = {s->txn_status ? (char)s->txn_status : '-', 0};
        json_array_append_new(
            list, json_pack("{s:I, s:s?, s:s?, s:s, s:s, s:s, s:b, s:I, s:I, s:I}", "id",
                            (json_int_t)s->id, "database", s->database, "user", s->user, "peer",
                            s->peer, "state", pd_session_state_name(s->state), "transaction",
                            txn, "tls", s->tls_done, "age_s",
                            (json_int_t)((now - s->started_ms) / 1000), "bytes_in",
                            (json_int_t)s->bytes_c2b, "bytes_out", (json_int_t)s->bytes_b2c));
    }
    json_t *r = reply_ok();
    json_object_set_new(r, "sessions", list);
    return r;
}

static json_t *rule_json(const pd_rule_cfg_t *rule)
{
    static const char *const kinds[] = {[PD_RULE_COLUMNS] = "columns", [PD_RULE_TABLES] = "tables"};
    char reads[32];
    json_t *j = json_pack("{s:s, s:s, s:s, s:s, s:s}", "name", rule->name, "database",
                          rule->database, "kind", kinds[rule->kind], "writes",
                          pd_writes_name(rule->writes), "reads",
                          pd_reads_format(&rule->reads, reads, sizeof reads));
    if (rule->kind == PD_RULE_COLUMNS) {
        json_object_set_new(j, "table", json_string(rule->table));
        json_t *cols = json_array();
        for (unsigned i = 0; i < rule->column_count; i++) {
            const pd_column_map_t *c = &rule->columns[i];
            json_array_append_new(cols, json_pack("{s:s, s:s, s:s?, s:s?}", "old", c->old,
                                                  "new", c->new, "up", c->up, "down", c->down));
        }
        json_object_set_new(j, "columns", cols);
    } else {
        json_t *tables = json_array();
        for (unsigned i = 0; i < rule->table_count; i++)
            json_array_append_new(tables, json_string(rule->tables[i]));
        json_object_set_new(j, "tables", tables);
    }
    return j;
}

static json_t *cmd_rules(pd_server_t *srv, int argc, char **argv)
{
    (void)argc;
    (void)argv;
    json_t *list = json_array();
    for (unsigned i = 0; i < srv->cfg->rule_count; i++)
        json_array_append_new(list, rule_json(&srv->cfg->rules[i]));
    json_t *r = reply_ok();
    json_object_set_new(r, "rules", list);
    return r;
}

static json_t *cmd_reload(pd_server_t *srv, int argc, char **argv)
{
    (void)argc;
    (void)argv;
    pd_config_errors_t errs = {0};
    if (pd_server_reload(srv, &errs) != 0) {
        json_t *r = reply_error("reload failed; pgdual still runs with the previous "
                                "configuration",
                                "Fix the errors listed, check with pgdual -c FILE --check, "
                                "and reload again.");
        json_t *list = json_array();
        for (size_t i = 0; i < errs.count; i++)
            json_array_append_new(list, json_string(errs.msgs[i]));
        json_object_set_new(r, "errors", list);
        pd_config_errors_free(&errs);
        return r;
    }
    json_t *r = reply_ok();
    json_object_set_new(r, "databases", json_integer(srv->cfg->database_count));
    json_object_set_new(r, "rules", json_integer(srv->cfg->rule_count));
    return r;
}

static const struct {
    const char *verb;
    int min_args, max_args;
    handler_fn handler;
    const char *usage;
} commands[] = {
    {"status", 0, 0, cmd_status, "status"},
    {"sessions", 0, 0, cmd_sessions, "sessions"},
    {"rules", 0, 0, cmd_rules, "rules"},
    {"reload", 0, 0, cmd_reload, "reload"},
};

json_t *pd_admin_execute(pd_server_t *srv, const char *line)
{
    char copy[LINE_MAX_LEN];
    snprintf(copy, sizeof copy, "%s", line);
    char *argv[MAX_WORDS];
    int argc = 0;
    for (char *save = NULL, *w = strtok_r(copy, " \t\r", &save); w != NULL;
         w = strtok_r(NULL, " \t\r", &save)) {
        if (argc == MAX_WORDS)
            return reply_error("too many arguments", NULL);
        argv[argc++] = w;
    }
    if (argc == 0)
        return reply_error("empty command", "Commands: status, sessions, rules, reload.");
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++) {
        if (strcmp(commands[i].verb, argv[0]) != 0)
            continue;
        if (argc - 1 < commands[i].min_args || argc - 1 > commands[i].max_args) {
            char msg[256];
            snprintf(msg, sizeof msg, "wrong number of arguments; usage: %s", commands[i].usage);
            return reply_error(msg, NULL);
        }
        return commands[i].handler(srv, argc, argv);
    }
    char msg[128];
    snprintf(msg, sizeof msg, "unknown command \"%.64s\"", argv[0]);
    return reply_error(msg, "Commands: status, sessions, rules, reload.");
}

/* ---------------------------------------------------------------------------------------
 * Connections
 */

static void conn_free(uv_handle_t *h)
{
    free(h->data);
}

static void conn_close(admin_conn_t *c)
{
    if (c->closing)
        return;
    c->closing = true;
    if (c->prev != NULL)
        c->prev->next = c->next;
    else
        c->admin->conns = c->next;
    if (c->next != NULL)
        c->next->prev = c->prev;
    uv_close((uv_handle_t *)&c->pipe, conn_free);
}

typedef struct {
    uv_write_t req;
    char *text;
} write_req_t;

static void on_written(uv_write_t *req, int status)
{
    write_req_t *w = (write_req_t *)req;
    (void)status;
    free(w->text);
    free(w);
}

static void send_reply(admin_conn_t *c, json_t *reply)
{
    char *text = json_dumps(reply, JSON_COMPACT);
    json_decref(reply);
    write_req_t *w = malloc(sizeof *w);
    size_t n = text ? strlen(text) : 0;
    char *line = text ? realloc(text, n + 2) : NULL;
    if (w == NULL || line == NULL) {
        free(w);
        free(line ? line : text);
        conn_close(c);
        return;
    }
    line[n] = '\n';
    line[n + 1] = '\0';
    w->text = line;
    uv_buf_t buf = uv_buf_init(line, (unsigned)(n + 1));
    if (uv_write(&w->req, (uv_stream_t *)&c->pipe, &buf, 1, on_written) != 0) {
        free(line);
        free(w);
        conn_close(c);
    }
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    admin_conn_t *c = h->data;
    (void)suggested;
    *buf = uv_buf_init(c->buf + c->len, (unsigned)(sizeof c->buf - c->len - 1));
}

static void on_read(uv_stream_t *stream, ssize_t n, const uv_buf_t *buf)
{
    admin_conn_t *c = stream->data;
    (void)buf;
    if (n < 0) {
        conn_close(c);
        return;
    }
    c->len += (size_t)n;
    c->buf[c->len] = '\0';
    char *nl;
    while (!c->closing && (nl = memchr(c->buf, '\n', c->len)) != NULL) {
        *nl = '\0';
        pd_log_info("[admin]", "command: %.32s", c->buf); /* the verb and its first words */
        send_reply(c, pd_admin_execute(c->admin->srv, c->buf));
        size_t used = (size_t)(nl - c->buf) + 1;
        memmove(c->buf, c->buf + used, c->len - used);
        c->len -= used;
        c->buf[c->len] = '\0';
    }
    if (!c->closing && c->len >= sizeof c->buf - 1) {
        send_reply(c, reply_error("command line too long", NULL));
        conn_close(c);
    }
}

static void on_connection(uv_stream_t *server, int status)
{
    pd_admin_t *a = server->data;
    if (status < 0)
        return;
    admin_conn_t *c = calloc(1, sizeof *c);
    if (c == NULL)
        return;
    c->admin = a;
    uv_pipe_init(a->srv->loop, &c->pipe, 0);
    c->pipe.data = c;
    if (uv_accept(server, (uv_stream_t *)&c->pipe) != 0) {
        uv_close((uv_handle_t *)&c->pipe, conn_free);
        return;
    }
    c->next = a->conns;
    if (a->conns != NULL)
        a->conns->prev = c;
    a->conns = c;
    uv_read_start((uv_stream_t *)&c->pipe, on_alloc, on_read);
}

/* A socket file left by a pgdual that died is removed; a live one is an error. */
static int clear_stale(const char *path)
{
    struct stat st;
    if (lstat(path, &st) != 0)
        return 0;
    if (!S_ISSOCK(st.st_mode)) {
        pd_log_error(NULL, "admin socket path \"%s\" exists and is not a socket", path);
        return -1;
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path);
    int live = fd >= 0 && connect(fd, (struct sockaddr *)&addr, sizeof addr) == 0;
    if (fd >= 0)
        close(fd);
    if (live) {
        pd_log_error(NULL, "admin socket \"%s\" is in use by another process", path);
        pd_log_error(NULL, "HINT:  Is another pgdual running? Give each its own admin.socket.");
        return -1;
    }
    unlink(path);
    return 0;
}

pd_admin_t *pd_admin_start(pd_server_t *srv, const char *path)
{
    if (clear_stale(path) != 0)
        return NULL;
    pd_admin_t *a = calloc(1, sizeof *a);
    if (a == NULL || (a->path = strdup(path)) == NULL) {
        free(a);
        return NULL;
    }
    a->srv = srv;
    uv_pipe_init(srv->loop, &a->listener, 0);
    a->listener.data = a;
    /* Only the owner may talk to the admin socket: created 0600 through the umask. */
    mode_t old = umask(0177);
    int rc = uv_pipe_bind(&a->listener, path);
    umask(old);
    if (rc == 0)
        rc = uv_listen((uv_stream_t *)&a->listener, 16, on_connection);
    if (rc != 0) {
        pd_log_error(NULL, "could not open admin socket \"%s\": %s", path, uv_strerror(rc));
        pd_admin_stop(a);
        return NULL;
    }
    pd_log_info(NULL, "admin socket at %s", path);
    return a;
}

static void admin_free(uv_handle_t *h)
{
    pd_admin_t *a = h->data;
    free(a->path);
    free(a);
}

void pd_admin_stop(pd_admin_t *a)
{
    if (a == NULL)
        return;
    while (a->conns != NULL)
        conn_close(a->conns);
    unlink(a->path);
    uv_close((uv_handle_t *)&a->listener, admin_free);
}
