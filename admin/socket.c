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

#include "admin/cutover.h"
#include "admin/fleet.h"
#include "admin/jobs_cmd.h"
#include "admin/render.h"
#include "admin/report.h"
#include "proxy/compare.h"
#include "proxy/log.h"
#include "proxy/mirror.h"
#include "proxy/relay.h"
#include "proxy/seqsync.h"
#include "proxy/session.h"
#include "rules/catalog.h"
#include "rules/state.h"

#define LINE_MAX_LEN 65536
#define MAX_WORDS    16

struct pd_admin {
    pd_server_t *srv;
    uv_pipe_t listener;
    char *path;
    struct admin_conn *conns;
};

typedef struct admin_conn admin_conn_t;

/* A command whose reply comes later (reload). Outlives its connection if need be. */
struct pd_admin_req {
    admin_conn_t *conn; /* NULL once the connection closed */
};

struct admin_conn {
    uv_pipe_t pipe;
    pd_admin_t *admin;
    struct admin_conn *prev, *next;
    char who[64];            /* "uid 0 pid 4711", from SO_PEERCRED: recorded with flag changes */
    pd_admin_req_t *pending; /* while set, further commands wait their turn */
    char buf[LINE_MAX_LEN];
    size_t len;
    bool closing;
};

/* ---------------------------------------------------------------------------------------
 * Commands
 */

typedef json_t *(*handler_fn)(pd_server_t *srv, int argc, char **argv);
typedef void (*async_handler_fn)(pd_server_t *srv, pd_admin_req_t *req, int argc, char **argv);

/* The caller of the command being run (for the audit trail); set around each dispatch. */
static const char *current_who = "unknown";

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
                            json_integer(PD_GET(srv->state_counts[st])));
    json_t *dbs = json_array();
    for (unsigned i = 0; i < srv->cfg->database_count; i++) {
        const pd_database_cfg_t *db = &srv->cfg->databases[i];
        /* Conninfo strings may hold passwords: only whether a side exists is shown. */
        json_array_append_new(
            dbs, json_pack("{s:s, s:b}", "name", db->name, "has_new", db->new != NULL));
    }
    json_object_set_new(r, "version", json_string(PD_VERSION));
    json_object_set_new(r, "pid", json_integer(getpid()));
    json_object_set_new(r, "uptime_s",
                        json_integer((json_int_t)((uv_now(srv->loop) - srv->started_ms) / 1000)));
    json_object_set_new(r, "listen",
                        json_sprintf("%s:%u", srv->cfg->listen_host, srv->cfg->listen_port));
    json_object_set_new(r, "stopping", json_boolean(srv->stopping));
    json_object_set_new(r, "sessions", json_integer(srv->nsessions));
    json_object_set_new(r, "sessions_by_state", states);
    json_object_set_new(r, "sessions_total", json_integer((json_int_t)srv->total_sessions));
    /* The loops that relay pass-through sessions: [0] the main loop (proxy/relay.h). */
    json_t *loops = json_array();
    for (unsigned i = 0; i < srv->nrelays; i++)
        json_array_append_new(loops, json_pack("{s:i, s:I}", "loop", (int)i, "pass_through",
                                               (json_int_t)srv->relays[i].assigned));
    json_object_set_new(r, "relay_loops", loops);
    json_object_set_new(r, "databases", dbs);
    json_object_set_new(r, "rules", json_integer(srv->cfg->rule_count));
    /* switchover --watch: the watches running, and the last automatic rollback of each
       database (from the history: it survives restarts). */
    json_object_set_new(r, "watches", pd_watch_list(srv, NULL));
    json_object_set_new(r, "auto_rollbacks", pd_watch_last_rollbacks(srv, NULL));
    pd_mirror_totals_t mt;
    pd_mirror_totals(srv, &mt);
    json_object_set_new(r, "mirrors",
                        json_pack("{s:i, s:i, s:i, s:I}", "open", (int)mt.open, "connecting",
                                  (int)mt.connecting, "detached", (int)mt.detached, "queued",
                                  (json_int_t)mt.queued));
    json_object_set_new(r, "sequences", pd_seqsync_status(srv));
    /* Where the flags live; in a fleet, the version of the shared state this instance runs. */
    json_object_set_new(r, "state",
                        srv->fleet != NULL ? pd_fleet_status(srv->fleet)
                                           : json_pack("{s:s, s:s?}", "backend",
                                                       srv->cfg->state ? "file" : "memory", "path",
                                                       srv->cfg->state));
    json_t *counters = pd_render_rule_stats(srv);
    json_object_set(r, "rule_counters", json_object_get(counters, "rules"));
    json_object_set(r, "rewrite_cache", json_object_get(counters, "rewrite_cache"));
    json_decref(counters);
    return r;
}

static json_t *cmd_sessions(pd_server_t *srv, int argc, char **argv)
{
    (void)argc;
    (void)argv;
    json_t *list = json_array();
    uint64_t now = uv_now(srv->loop);
    for (pd_session_t *s = srv->sessions; s != NULL; s = s->next) {
        uint8_t status = PD_GET(s->txn_status);
        char txn[2] = {status ? (char)status : '-', 0};
        json_array_append_new(
            list,
            json_pack("{s:I, s:s?, s:s?, s:s, s:s, s:s, s:b, s:I, s:I, s:I, s:i}", "id",
                      (json_int_t)s->id, "database", s->database, "user", s->user, "peer", s->peer,
                      "state", pd_session_state_name(PD_GET(s->state)), "transaction", txn, "tls",
                      s->tls_done, "age_s", (json_int_t)((now - s->started_ms) / 1000), "bytes_in",
                      (json_int_t)PD_GET(s->bytes_c2b), "bytes_out",
                      (json_int_t)PD_GET(s->bytes_b2c), "loop",
                      s->home != NULL ? (int)s->home->index : 0));
    }
    json_t *r = reply_ok();
    json_object_set_new(r, "sessions", list);
    return r;
}

json_t *pd_admin_rule_json(const pd_server_t *srv, unsigned index)
{
    static const char *const kinds[] = {[PD_RULE_COLUMNS] = "columns", [PD_RULE_TABLES] = "tables"};
    const pd_rule_cfg_t *rule = &srv->cfg->rules[index];
    const pd_rule_flags_t *flags = &srv->flags[index];
    char reads[32];
    json_t *j =
        json_pack("{s:s, s:s, s:s, s:s, s:s}", "name", rule->name, "database", rule->database,
                  "kind", kinds[rule->kind], "writes", pd_writes_name(flags->writes), "reads",
                  pd_reads_format(&flags->reads, reads, sizeof reads));
    if (rule->kind == PD_RULE_COLUMNS) {
        json_object_set_new(j, "table", json_string(rule->table));
        json_t *cols = json_array();
        for (unsigned i = 0; i < rule->column_count; i++) {
            const pd_column_map_t *c = &rule->columns[i];
            json_array_append_new(cols, json_pack("{s:s, s:s, s:s?, s:s?}", "old", c->old, "new",
                                                  c->new, "up", c->up, "down", c->down));
        }
        json_object_set_new(j, "columns", cols);
    } else {
        json_t *tables = json_array();
        for (unsigned i = 0; i < rule->table_count; i++)
            json_array_append_new(tables, json_string(rule->tables[i]));
        json_object_set_new(j, "tables", tables);
    }
    const char *error = srv->facts ? srv->facts[index].error : NULL;
    json_object_set_new(j, "error", error ? json_string(error) : json_null());
    /* The last verify's outcome, without its list of keys (those are in `jobs`). */
    json_t *verify = pd_state_verify(srv->state, rule->name);
    if (verify != NULL) {
        json_object_del(verify, "keys");
        json_object_set_new(j, "last_verify", verify);
    } else {
        json_object_set_new(j, "last_verify", json_null());
    }
    return j;
}

static json_t *cmd_rules(pd_server_t *srv, int argc, char **argv)
{
    (void)argc;
    (void)argv;
    json_t *list = json_array();
    for (unsigned i = 0; i < srv->cfg->rule_count; i++)
        json_array_append_new(list, pd_admin_rule_json(srv, i));
    json_t *r = reply_ok();
    json_object_set_new(r, "rules", list);
    return r;
}

static void reload_finished(pd_server_t *srv, const char *error, void *ctx)
{
    pd_admin_req_t *req = ctx;
    if (error != NULL) {
        pd_admin_reply(req, reply_error(error, "Fix it and reload again; pgdual still runs "
                                               "with the previous configuration."));
        return;
    }
    json_t *r = reply_ok();
    json_object_set_new(r, "databases", json_integer(srv->cfg->database_count));
    json_object_set_new(r, "rules", json_integer(srv->cfg->rule_count));
    json_object_set_new(r, "generation", json_integer(srv->config_generation));
    /* Keys the file changed that only a restart applies (logged as a warning too). */
    if (srv->restart_needed[0] != NULL) {
        json_t *keys = json_array();
        for (unsigned i = 0; srv->restart_needed[i] != NULL; i++)
            json_array_append_new(keys, json_string(srv->restart_needed[i]));
        json_object_set_new(r, "restart_needed", keys);
        json_object_set_new(r, "warning",
                            json_string("the config file changes keys that take effect only "
                                        "after a restart of pgdual (restart_needed); the values "
                                        "in force are kept until then"));
    }
    pd_admin_reply(req, r);
}

static void cmd_reload(pd_server_t *srv, pd_admin_req_t *req, int argc, char **argv)
{
    (void)argc;
    (void)argv;
    pd_config_errors_t errs = {0};
    if (pd_server_reload(srv, &errs, reload_finished, req) == 0)
        return;
    json_t *r = reply_error("reload failed; pgdual still runs with the previous configuration",
                            "Fix the errors listed, check with pgdual -c FILE --check, and "
                            "reload again.");
    json_t *list = json_array();
    for (size_t i = 0; i < errs.count; i++)
        json_array_append_new(list, json_string(errs.msgs[i]));
    json_object_set_new(r, "errors", list);
    pd_config_errors_free(&errs);
    pd_admin_reply(req, r);
}

static int find_rule(const pd_server_t *srv, const char *name)
{
    for (unsigned i = 0; i < srv->cfg->rule_count; i++)
        if (strcmp(srv->cfg->rules[i].name, name) == 0)
            return (int)i;
    return -1;
}

static json_t *flags_json(const pd_server_t *srv, unsigned i)
{
    char reads[32];
    return json_pack("{s:b, s:s, s:s, s:s}", "ok", 1, "rule", srv->cfg->rules[i].name, "writes",
                     pd_writes_name(srv->flags[i].writes), "reads",
                     pd_reads_format(&srv->flags[i].reads, reads, sizeof reads));
}

/* flag RULE reads=VALUE|writes=VALUE [...]: all-or-nothing, persisted before in force. */
/*
 * A flag change is saved off the event loop (the state may be a file that is fsynced, or
 * PostgreSQL), then comes into force on the loop and is answered: proxying never waits
 * for the store.
 */
struct flag_work {
    uv_work_t work;
    pd_server_t *srv;
    pd_admin_req_t *req;
    char rule[128], who[96];
    pd_writes_t writes;
    pd_reads_t reads;
    int rc;
    char *err;
};

static void flag_save(uv_work_t *w)
{
    struct flag_work *fw = w->data;
    fw->rc =
        pd_state_set_flags(fw->srv->state, fw->rule, fw->writes, &fw->reads, fw->who, &fw->err);
}

static void flag_saved(uv_work_t *w, int status)
{
    struct flag_work *fw = w->data;
    pd_server_t *srv = fw->srv;
    json_t *r;
    int rule = find_rule(srv, fw->rule); /* a reload may have come in between */
    if (status != 0 || fw->rc != 0) {
        r = reply_error(fw->err ? fw->err : "could not save the state",
                        pd_state_shared(srv->state)
                            ? "The flags were not changed. pgdualctl status shows the state's "
                              "connection; try again once it is back."
                            : "The flags were not changed. Check that the state file's "
                              "directory is writable.");
    } else if (rule < 0) {
        r = reply_error("the rule went away (reload) while its flags were saved",
                        "pgdualctl rules lists the rules.");
    } else {
        /* A shared state may have moved on meanwhile (another instance): what is in force
           is what it holds now, not necessarily this change. */
        if (pd_state_shared(srv->state))
            pd_server_apply_state(srv);
        else
            pd_server_flags_saved(srv, (unsigned)rule, fw->writes, &fw->reads, fw->who);
        r = flags_json(srv, (unsigned)rule);
    }
    if (fw->req != NULL)
        pd_admin_reply(fw->req, r);
    else
        json_decref(r);
    free(fw->err);
    free(fw);
}

/* NULL when the change was queued (flag_saved answers req), else the error reply. */
static json_t *cmd_flag(pd_server_t *srv, pd_admin_req_t *req, int argc, char **argv)
{
    int rule = find_rule(srv, argv[1]);
    if (rule < 0) {
        char msg[160];
        snprintf(msg, sizeof msg, "rule \"%.64s\" does not exist", argv[1]);
        return reply_error(msg, "pgdualctl rules lists the rules.");
    }
    pd_writes_t writes = srv->flags[rule].writes;
    pd_reads_t reads = srv->flags[rule].reads;
    for (int i = 2; i < argc; i++) {
        char *eq = strchr(argv[i], '=');
        bool ok = false;
        if (eq != NULL && strncmp(argv[i], "reads=", 6) == 0)
            ok = pd_reads_parse(eq + 1, &reads);
        else if (eq != NULL && strncmp(argv[i], "writes=", 7) == 0)
            ok = pd_writes_parse(eq + 1, &writes);
        if (!ok) {
            char msg[160];
            snprintf(msg, sizeof msg, "invalid flag \"%.64s\"", argv[i]);
            return reply_error(msg, "Use reads=old|shadow|aa|new|new@N (N 0..100) or "
                                    "writes=old|dual|dual-new|new.");
        }
    }
    const char *refusal = pd_server_check_flags(srv, (unsigned)rule, writes, &reads);
    if (refusal != NULL)
        return reply_error(refusal, "The flags were not changed.");
    bool was_new =
        srv->flags[rule].writes == PD_WRITES_DUAL_NEW || srv->flags[rule].writes == PD_WRITES_NEW;
    bool is_new = writes == PD_WRITES_DUAL_NEW || writes == PD_WRITES_NEW;
    if (srv->cfg->rules[rule].kind == PD_RULE_TABLES && was_new != is_new)
        return reply_error("changing the authoritative database of a kind: tables rule needs "
                           "its sessions paused and drained first",
                           "Use pgdualctl switchover DB (or rollback DB); the flags were not "
                           "changed.");
    struct flag_work *fw = calloc(1, sizeof *fw);
    if (fw == NULL)
        return reply_error("out of memory", NULL);
    fw->srv = srv;
    fw->req = req;
    fw->writes = writes;
    fw->reads = reads;
    snprintf(fw->rule, sizeof fw->rule, "%s", srv->cfg->rules[rule].name);
    snprintf(fw->who, sizeof fw->who, "%s", current_who);
    fw->work.data = fw;
    if (uv_queue_work(srv->loop, &fw->work, flag_save, flag_saved) != 0) {
        free(fw);
        return reply_error("out of memory", NULL);
    }
    return NULL;
}

static void cmd_flag_async(pd_server_t *srv, pd_admin_req_t *req, int argc, char **argv)
{
    json_t *r = cmd_flag(srv, req, argc, argv);
    if (r != NULL)
        pd_admin_reply(req, r);
}

/* The newest events of the divergence log (of one rule, or all), at most `limit`. */
typedef struct {
    json_t *events;
    const char *rule;
    long limit;
} newest_t;

static void keep_newest(json_t *ev, void *ctx)
{
    newest_t *n = ctx;
    const char *r = json_string_value(json_object_get(ev, "rule"));
    if (n->rule != NULL && (r == NULL || strcmp(r, n->rule) != 0))
        return;
    json_array_append(n->events, ev);
    while ((long)json_array_size(n->events) > n->limit)
        json_array_remove(n->events, 0);
}

static json_t *read_divergence(const char *path, const char *rule, long limit)
{
    newest_t n = {json_array(), rule, limit};
    pd_divergence_scan(path, PD_DIVERGENCE_WINDOW, keep_newest, &n);
    return n.events;
}

/* divergence [RULE] [--limit N]: counters per rule and the newest events. */
static json_t *cmd_divergence(pd_server_t *srv, int argc, char **argv)
{
    const char *rule = NULL;
    long limit = 20;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--limit") == 0 && i + 1 < argc) {
            char *end;
            limit = strtol(argv[++i], &end, 10);
            if (*end != '\0' || limit < 1 || limit > 10000)
                return reply_error("invalid --limit: expected 1 to 10000", NULL);
        } else if (argv[i][0] != '-' && rule == NULL) {
            rule = argv[i];
            if (find_rule(srv, rule) < 0) {
                char msg[160];
                snprintf(msg, sizeof msg, "rule \"%.64s\" does not exist", rule);
                return reply_error(msg, "pgdualctl rules lists the rules.");
            }
        } else {
            return reply_error("usage: divergence [RULE] [--limit N]", NULL);
        }
    }
    json_t *counts = json_array();
    for (unsigned i = 0; i < srv->cfg->rule_count; i++) {
        if (rule != NULL && strcmp(rule, srv->cfg->rules[i].name) != 0)
            continue;
        const pd_rule_stats_t *st = &srv->stats[i];
        json_array_append_new(
            counts, json_pack("{s:s, s:I, s:I, s:I, s:I, s:I, s:I, s:I}", "rule",
                              srv->cfg->rules[i].name, "aa_compared", (json_int_t)st->aa_compared,
                              "aa_mismatched", (json_int_t)st->aa_mismatched, "shadow_mismatched",
                              (json_int_t)st->shadow_mismatched, "shadow_compared",
                              (json_int_t)st->shadow_compared, "shadow_skipped",
                              (json_int_t)st->shadow_skipped, "mirror_diverged",
                              (json_int_t)st->mirror_diverged, "mirror_unapplied",
                              (json_int_t)st->mirror_unapplied));
    }
    json_t *r = reply_ok();
    json_object_set_new(r, "counters", counts);
    json_object_set_new(r, "events", read_divergence(srv->cfg->divergence_log, rule, limit));
    if (srv->cfg->divergence_log == NULL)
        json_object_set_new(r, "hint",
                            json_string("No divergence.log is configured: events are "
                                        "counted but not kept."));
    return r;
}

/* report DB: the cutover readiness report (admin/report.h). */
static json_t *cmd_report(pd_server_t *srv, int argc, char **argv)
{
    (void)argc;
    json_t *report = pd_report_build(srv, argv[1]);
    if (report == NULL) {
        char msg[160];
        snprintf(msg, sizeof msg, "database \"%.64s\" does not exist", argv[1]);
        return reply_error(msg, "pgdualctl status lists the databases; DB is the name clients "
                                "connect to.");
    }
    json_t *r = reply_ok();
    json_object_set_new(r, "report", report);
    return r;
}

static const struct {
    const char *verb;
    int min_args, max_args;
    handler_fn handler;
    async_handler_fn async_handler;
    const char *usage;
} commands[] = {
    {"status", 0, 0, cmd_status, NULL, "status"},
    {"sessions", 0, 0, cmd_sessions, NULL, "sessions"},
    {"rules", 0, 0, cmd_rules, NULL, "rules"},
    {"flag", 2, 3, NULL, cmd_flag_async, "flag RULE reads=VALUE|writes=VALUE"},
    {"divergence", 0, 3, cmd_divergence, NULL, "divergence [RULE] [--limit N]"},
    {"reload", 0, 0, NULL, cmd_reload, "reload"},
    {"verify", 1, 5, pd_cmd_verify, NULL, "verify RULE [--repair] [--touched] [--batch N]"},
    {"backfill", 1, 5, pd_cmd_backfill, NULL, "backfill RULE [--batch N] [--throttle MS]"},
    {"jobs", 0, 1, pd_cmd_jobs, NULL, "jobs [ID]"},
    {"cancel", 1, 1, pd_cmd_cancel, NULL, "cancel ID"},
    {"pause", 1, 3, NULL, pd_cmd_pause, "pause DB [--timeout MS]"},
    {"resume", 1, 1, pd_cmd_resume, NULL, "resume DB"},
    {"switchover", 1, 13, NULL, pd_cmd_switchover,
     "switchover DB [--timeout MS] [--force] [--dry-run] [--max-verify-age S] "
     "[--watch DURATION [--max-divergence N] [--max-error-rate R]]"},
    {"rollback", 1, 7, NULL, pd_cmd_switchover, "rollback DB [--timeout MS] [--force] [--dry-run]"},
    {"report", 1, 1, cmd_report, NULL, "report DB"},
    {"fleet", 0, 2, NULL, pd_cmd_fleet, "fleet [forget INSTANCE]"},
};

#define COMMAND_LIST                                                                               \
    "Commands: status, sessions, rules, flag, divergence, reload, verify, backfill, jobs, "        \
    "cancel, pause, resume, switchover, rollback, report, fleet."

/*
 * Runs one command line. A synchronous command returns its reply; an asynchronous one
 * returns NULL and answers later through pd_admin_reply(req) (req NULL: not allowed).
 */
static json_t *dispatch(pd_server_t *srv, const char *line, pd_admin_req_t *req)
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
        return reply_error("empty command", COMMAND_LIST);
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++) {
        if (strcmp(commands[i].verb, argv[0]) != 0)
            continue;
        if (argc - 1 < commands[i].min_args || argc - 1 > commands[i].max_args) {
            char msg[256];
            snprintf(msg, sizeof msg, "wrong number of arguments; usage: %s", commands[i].usage);
            return reply_error(msg, NULL);
        }
        if (commands[i].handler != NULL)
            return commands[i].handler(srv, argc, argv);
        if (req == NULL)
            return reply_error("this command cannot run here", NULL);
        commands[i].async_handler(srv, req, argc, argv);
        return NULL;
    }
    char msg[128];
    snprintf(msg, sizeof msg, "unknown command \"%.64s\"", argv[0]);
    return reply_error(msg, COMMAND_LIST);
}

json_t *pd_admin_execute(pd_server_t *srv, const char *line)
{
    return dispatch(srv, line, NULL);
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
    if (c->pending != NULL)
        c->pending->conn = NULL; /* its reply will find nobody to send to */
    c->pending = NULL;
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

/* Reals (error rates) go with 15 digits: 0.1, not 0.10000000000000001. */
static void send_reply(admin_conn_t *c, json_t *reply)
{
    char *text = json_dumps(reply, JSON_COMPACT | JSON_REAL_PRECISION(15));
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

/* Runs the complete lines in the buffer, one at a time: a command waiting for its
 * asynchronous reply holds back the ones after it, so replies keep the commands' order. */
static void run_lines(admin_conn_t *c)
{
    char *nl;
    while (!c->closing && c->pending == NULL && (nl = memchr(c->buf, '\n', c->len)) != NULL) {
        *nl = '\0';
        pd_log_info("[admin]", "%s: %.32s", c->who, c->buf); /* verb and first words only */
        pd_admin_req_t *req = calloc(1, sizeof *req);
        json_t *reply;
        if (req == NULL) {
            reply = reply_error("out of memory", NULL);
        } else {
            req->conn = c;
            c->pending = req;
            current_who = c->who;
            reply = dispatch(c->admin->srv, c->buf, req);
            current_who = "unknown";
        }
        size_t used = (size_t)(nl - c->buf) + 1;
        memmove(c->buf, c->buf + used, c->len - used);
        c->len -= used;
        c->buf[c->len] = '\0';
        if (reply != NULL)
            pd_admin_reply(req, reply); /* also frees req */
    }
}

bool pd_admin_req_gone(const pd_admin_req_t *req)
{
    return req->conn == NULL;
}

const char *pd_admin_who(void)
{
    return current_who;
}

void pd_admin_reply(pd_admin_req_t *req, json_t *reply)
{
    admin_conn_t *c = req ? req->conn : NULL;
    free(req);
    if (c == NULL) {
        json_decref(reply);
        return;
    }
    c->pending = NULL;
    send_reply(c, reply);
    run_lines(c);
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
    run_lines(c);
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
    uv_os_fd_t fd;
    struct ucred cred;
    socklen_t len = sizeof cred;
    if (uv_fileno((uv_handle_t *)&c->pipe, &fd) == 0 &&
        getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0)
        snprintf(c->who, sizeof c->who, "uid %u pid %d", (unsigned)cred.uid, (int)cred.pid);
    else
        snprintf(c->who, sizeof c->who, "unknown peer");
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
