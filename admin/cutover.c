/*
 * cutover.c — pause, resume, switchover and rollback (cutover.h says what each does).
 *
 * One operation per database at a time, on the event loop: a pause (or the pause inside a
 * switchover) is a pd_server_pause plus a timer that looks every millisecond whether the
 * database went quiet; the sequences are set on a libuv worker thread (libpq's blocking
 * calls never run on the loop), then the flags flip and the pause ends.
 */
#include "admin/cutover.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "admin/fleet.h"
#include "admin/report.h"
#include "proxy/log.h"
#include "proxy/mirror.h"
#include "proxy/seqsync.h"
#include "proxy/session.h"
#include "rules/state.h"

#define PAUSE_DEFAULT_MS      10000
#define SWITCHOVER_DEFAULT_MS 5000
#define TIMEOUT_MAX_MS        600000
#define VERIFY_AGE_DEFAULT_S  3600

typedef enum { OP_PAUSE, OP_SWITCHOVER, OP_ROLLBACK } op_kind_t;

struct pd_cutover {
    struct pd_cutover *next;
    pd_server_t *srv;
    pd_admin_req_t *req; /* NULL once answered */
    op_kind_t kind;
    char database[64];
    char who[96];
    uint64_t started_ms, timeout_ms, quiet_ms;
    uv_timer_t timer;
    bool tables;           /* the database has tables rules (mirrors, sequences) */
    bool sequencing;       /* the worker thread sets sequences */
    bool stopped;          /* abandoned while the worker ran: freed when it returns */
    json_t *checks;        /* switchover: the guardrails as checked */
    pd_watch_opts_t watch; /* switchover --watch: what to watch after the flip */
    pd_watch_t *auto_for;  /* a rollback run by this watch (not owned), or NULL */
    /* sequences, on the worker */
    uv_work_t work;
    char *from, *to; /* conninfos: sequences of `to` are brought up to `from`'s */
    int seq_set;
    char seq_error[512];
};

static const char *op_name(op_kind_t k)
{
    return k == OP_PAUSE ? "pause" : k == OP_SWITCHOVER ? "switchover" : "rollback";
}

static json_t *error_reply(const char *error, const char *hint)
{
    json_t *r = json_pack("{s:b, s:s}", "ok", 0, "error", error);
    if (hint != NULL)
        json_object_set_new(r, "hint", json_string(hint));
    return r;
}

static struct pd_cutover **op_slot(pd_server_t *srv, const char *database)
{
    struct pd_cutover **pp = &srv->cutovers;
    while (*pp != NULL && strcmp((*pp)->database, database) != 0)
        pp = &(*pp)->next;
    return pp;
}

static void op_closed(uv_handle_t *h)
{
    struct pd_cutover *op = h->data;
    json_decref(op->checks);
    free(op->from);
    free(op->to);
    free(op);
}

/* Ends the operation: the pause ends (sessions go on), op leaves the list. */
static void op_end(struct pd_cutover *op)
{
    pd_server_resume(op->srv, op->database);
    struct pd_cutover **pp = op_slot(op->srv, op->database);
    if (*pp == op)
        *pp = op->next;
    op->stopped = true;
    uv_timer_stop(&op->timer);
    if (!op->sequencing)
        uv_close((uv_handle_t *)&op->timer, op_closed);
}

static void reply(struct pd_cutover *op, json_t *r)
{
    if (op->req != NULL)
        pd_admin_reply(op->req, r);
    else
        json_decref(r);
    op->req = NULL;
}

/*
 * A shared state (PostgreSQL) is written off the event loop, one event after the other in
 * the order they happened: proxying never waits for the control database. A state file is
 * written at once, so that its history is complete when the command is answered.
 */
struct pd_record {
    struct pd_record *next;
    uv_work_t work;
    pd_server_t *srv;
    json_t *fields;
    char event[32], who[96], database[64];
    int rc;
    char *err;
};

static void record_work(uv_work_t *w)
{
    struct pd_record *rec = w->data;
    rec->rc = pd_state_record_event(rec->srv->state, rec->event, rec->who, rec->fields, &rec->err);
    rec->fields = NULL; /* taken */
}

static void record_next(pd_server_t *srv);

static void record_done(uv_work_t *w, int status)
{
    struct pd_record *rec = w->data;
    pd_server_t *srv = rec->srv;
    if (status != 0 || rec->rc != 0)
        pd_log_warning(NULL, "%s of database \"%s\" not recorded in the state: %s", rec->event,
                       rec->database, rec->err ? rec->err : "out of memory");
    srv->records = rec->next;
    json_decref(rec->fields);
    free(rec->err);
    free(rec);
    record_next(srv);
}

static void record_next(pd_server_t *srv)
{
    struct pd_record *rec = srv->records;
    if (rec != NULL && uv_queue_work(srv->loop, &rec->work, record_work, record_done) != 0)
        record_done(&rec->work, -1);
}

void pd_cutover_record(pd_server_t *srv, const char *database, const char *who, const char *event,
                       json_t *fields)
{
    json_object_set_new(fields, "database", json_string(database));
    if (pd_state_shared(srv->state)) {
        struct pd_record *rec = calloc(1, sizeof *rec);
        if (rec != NULL) {
            rec->srv = srv;
            rec->fields = fields;
            rec->work.data = rec;
            snprintf(rec->event, sizeof rec->event, "%s", event);
            snprintf(rec->who, sizeof rec->who, "%s", who);
            snprintf(rec->database, sizeof rec->database, "%s", database);
            struct pd_record **pp = &srv->records;
            while (*pp != NULL)
                pp = &(*pp)->next;
            *pp = rec;
            if (srv->records == rec)
                record_next(srv);
            return;
        }
    }
    char *err = NULL;
    if (pd_state_record_event(srv->state, event, who, fields, &err) != 0) {
        pd_log_warning(NULL, "%s of database \"%s\" not recorded in the state: %s", event, database,
                       err ? err : "out of memory");
        free(err);
    }
}

static void record(struct pd_cutover *op, const char *event, json_t *fields)
{
    pd_cutover_record(op->srv, op->database, op->who, event, fields);
}

/* Sessions of the database not between transactions, as [{session, state, since_ms}]. */
static json_t *busy_sessions(pd_server_t *srv, const char *database)
{
    json_t *list = json_array();
    for (pd_session_t *s = srv->sessions; s != NULL; s = s->next) {
        if (s->database == NULL || strcmp(s->database, database) != 0 || pd_session_quiet(s))
            continue;
        char txn[2] = {(char)PD_GET(s->txn_status), 0};
        json_array_append_new(list, json_pack("{s:i, s:s, s:s, s:I}", "session", (int)s->id,
                                              "transaction", txn, "peer", s->peer, "connected_ms",
                                              (json_int_t)(uv_now(srv->loop) - s->started_ms)));
    }
    return list;
}

static bool db_quiet(pd_server_t *srv, const char *database)
{
    for (pd_session_t *s = srv->sessions; s != NULL; s = s->next)
        if (s->database != NULL && strcmp(s->database, database) == 0 && !pd_session_quiet(s))
            return false;
    return true;
}

bool pd_cutover_drained(pd_server_t *srv, const char *database)
{
    pd_mirror_totals_t mt = {0};
    pd_mirror_db_totals(srv, database, &mt);
    return db_quiet(srv, database) && mt.busy == 0 && mt.queued == 0;
}

static bool db_has_rules(const pd_server_t *srv, const char *database, bool *tables)
{
    bool any = false;
    *tables = false;
    for (unsigned i = 0; i < srv->cfg->rule_count; i++)
        if (strcmp(srv->cfg->rules[i].database, database) == 0) {
            any = true;
            *tables = *tables || srv->cfg->rules[i].kind == PD_RULE_TABLES;
        }
    return any;
}

int pd_cutover_seq_sides(const pd_server_t *srv, const char *database, bool rollback, char **from,
                         char **to)
{
    bool tables;
    const pd_database_cfg_t *db = pd_config_database(srv->cfg, database);
    if (!db_has_rules(srv, database, &tables) || !tables || db == NULL || db->new == NULL)
        return 0;
    *from = strdup(rollback ? db->new : db->old);
    *to = strdup(rollback ? db->old : db->new);
    return *from != NULL && *to != NULL ? 1 : -1;
}

/* Options: --timeout MS, --force, --dry-run, --max-verify-age S, and switchover's watch
 * (watch.h). NULL or an error reply. */
typedef struct {
    uint64_t timeout_ms;
    long max_age_s;
    bool force, dry_run;
    pd_watch_opts_t watch;
} opts_t;

static const char *usage_of(op_kind_t kind)
{
    return kind == OP_PAUSE ? "Usage: pause DB [--timeout MS]"
           : kind == OP_ROLLBACK
               ? "Usage: rollback DB [--timeout MS] [--force] [--dry-run]"
               : "Usage: switchover DB [--timeout MS] [--force] [--dry-run] [--max-verify-age S] "
                 "[--watch DURATION [--max-divergence N] [--max-error-rate R]]";
}

static json_t *parse_opts(int argc, char **argv, op_kind_t kind, opts_t *o)
{
    bool pause = kind == OP_PAUSE;
    o->timeout_ms = pause ? PAUSE_DEFAULT_MS : SWITCHOVER_DEFAULT_MS;
    o->max_age_s = VERIFY_AGE_DEFAULT_S;
    o->force = o->dry_run = false;
    pd_watch_opts_init(&o->watch);
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        char *end = NULL;
        char msg[256];
        int taken = kind == OP_SWITCHOVER && i + 1 < argc
                        ? pd_watch_option(a, argv[i + 1], &o->watch, msg, sizeof msg)
                        : 0;
        if (taken < 0)
            return error_reply(msg, usage_of(kind));
        if (taken > 0) {
            i++;
            continue;
        }
        if ((strcmp(a, "--timeout") == 0 || strcmp(a, "--max-verify-age") == 0) && i + 1 < argc) {
            long v = strtol(argv[++i], &end, 10);
            bool timeout = strcmp(a, "--timeout") == 0;
            if (end == argv[i] || *end != '\0' || v < 1 || (timeout && v > TIMEOUT_MAX_MS))
                return error_reply(timeout ? "--timeout takes milliseconds, 1 to 600000"
                                           : "--max-verify-age takes seconds, at least 1",
                                   NULL);
            if (timeout)
                o->timeout_ms = (uint64_t)v;
            else
                o->max_age_s = v;
        } else if (!pause && strcmp(a, "--force") == 0) {
            o->force = true;
        } else if (!pause && strcmp(a, "--dry-run") == 0) {
            o->dry_run = true;
        } else {
            bool valued = strcmp(a, "--timeout") == 0 ||
                          (!pause && strcmp(a, "--max-verify-age") == 0) ||
                          (kind == OP_SWITCHOVER && pd_watch_is_option(a));
            snprintf(msg, sizeof msg, "%s \"%.64s\"",
                     valued ? "missing value of option" : "unknown option", a);
            return error_reply(msg, usage_of(kind));
        }
    }
    const char *hint = NULL;
    const char *why = pd_watch_opts_error(&o->watch, &hint);
    return why != NULL ? error_reply(why, hint) : NULL;
}

/* The database exists and has rules, and nothing else is pausing it. NULL or an error. */
static json_t *check_database(pd_server_t *srv, const char *database, bool *tables)
{
    char msg[256];
    if (pd_config_database(srv->cfg, database) == NULL) {
        snprintf(msg, sizeof msg, "database \"%.64s\" does not exist", database);
        return error_reply(msg, "pgdualctl status lists the databases.");
    }
    if (!db_has_rules(srv, database, tables)) {
        snprintf(msg, sizeof msg,
                 "database \"%.64s\" has no rules: there is nothing to pause "
                 "or switch",
                 database);
        return error_reply(msg, "Add a rule for it to the config and reload.");
    }
    struct pd_cutover *busy = *op_slot(srv, database);
    if (busy != NULL) {
        snprintf(msg, sizeof msg, "database \"%.64s\" is paused already (%s, for %llu ms)",
                 database, op_name(busy->kind),
                 (unsigned long long)(uv_now(srv->loop) - busy->started_ms));
        return error_reply(msg, busy->kind == OP_PAUSE
                                    ? "pgdualctl resume DB ends the pause."
                                    : "Wait for it: it ends within its --timeout.");
    }
    return NULL;
}

static struct pd_cutover *op_new(pd_server_t *srv, pd_admin_req_t *req, op_kind_t kind,
                                 const char *database, uint64_t timeout_ms)
{
    struct pd_cutover *op = calloc(1, sizeof *op);
    if (op == NULL)
        return NULL;
    op->srv = srv;
    op->req = req;
    op->kind = kind;
    snprintf(op->database, sizeof op->database, "%s", database);
    snprintf(op->who, sizeof op->who, "%s", pd_admin_who());
    op->started_ms = uv_now(srv->loop);
    op->timeout_ms = timeout_ms;
    uv_timer_init(srv->loop, &op->timer);
    op->timer.data = op;
    op->work.data = op;
    if (pd_server_pause(srv, database) != 0) {
        uv_close((uv_handle_t *)&op->timer, op_closed);
        return NULL;
    }
    op->next = srv->cutovers;
    srv->cutovers = op;
    return op;
}

/* ---------------------------------------------------------------------------------------
 * pause / resume
 */

static void pause_expired(uv_timer_t *t)
{
    struct pd_cutover *op = t->data;
    pd_log_info(NULL, "pause of database \"%s\" ended after its timeout (%llu ms)", op->database,
                (unsigned long long)op->timeout_ms);
    record(op, "resume",
           json_pack("{s:s, s:I}", "reason", "timeout", "paused_ms",
                     (json_int_t)(uv_now(op->srv->loop) - op->started_ms)));
    op_end(op);
}

static void pause_tick(uv_timer_t *t)
{
    struct pd_cutover *op = t->data;
    pd_server_t *srv = op->srv;
    uint64_t now = uv_now(srv->loop);
    if (op->req != NULL && pd_admin_req_gone(op->req)) {
        pd_log_info(NULL, "pause of database \"%s\" ended: the admin client went away",
                    op->database);
        reply(op, json_object()); /* nobody to hear it: frees the request */
        op_end(op);
        return;
    }
    if (db_quiet(srv, op->database)) {
        json_t *r = json_pack("{s:b, s:s, s:b, s:I, s:I}", "ok", 1, "database", op->database,
                              "quiet", 1, "waited_ms", (json_int_t)(now - op->started_ms),
                              "ends_in_ms", (json_int_t)(op->started_ms + op->timeout_ms - now));
        record(op, "pause", json_pack("{s:I}", "waited_ms", (json_int_t)(now - op->started_ms)));
        reply(op, r);
        /* It lasts until resume, or until its timeout: a forgotten pause ends. */
        uv_timer_start(&op->timer, pause_expired, op->started_ms + op->timeout_ms - now, 0);
        return;
    }
    if (now - op->started_ms >= op->timeout_ms) {
        char msg[256];
        snprintf(msg, sizeof msg,
                 "database \"%s\" did not go quiet within %llu ms; the pause ended", op->database,
                 (unsigned long long)op->timeout_ms);
        json_t *r = error_reply(msg, "The sessions listed are in transactions; wait for them "
                                     "(or end them) and pause again, with a longer --timeout.");
        json_object_set_new(r, "busy", busy_sessions(srv, op->database));
        reply(op, r);
        op_end(op);
    }
}

void pd_cmd_pause(pd_server_t *srv, pd_admin_req_t *req, int argc, char **argv)
{
    opts_t o;
    bool tables;
    json_t *err = parse_opts(argc, argv, OP_PAUSE, &o);
    if (err == NULL)
        err = check_database(srv, argv[1], &tables);
    if (err != NULL) {
        pd_admin_reply(req, err);
        return;
    }
    struct pd_cutover *op = op_new(srv, req, OP_PAUSE, argv[1], o.timeout_ms);
    if (op == NULL) {
        pd_admin_reply(req, error_reply("out of memory", NULL));
        return;
    }
    pd_log_info(NULL, "database \"%s\" paused by %s (at most %llu ms)", op->database, op->who,
                (unsigned long long)o.timeout_ms);
    uv_timer_start(&op->timer, pause_tick, 0, 1);
}

json_t *pd_cmd_resume(pd_server_t *srv, int argc, char **argv)
{
    (void)argc;
    struct pd_cutover *op = *op_slot(srv, argv[1]);
    char msg[256];
    if (op == NULL) {
        snprintf(msg, sizeof msg, "database \"%.64s\" is not paused", argv[1]);
        return error_reply(msg, NULL);
    }
    if (op->kind != OP_PAUSE) {
        snprintf(msg, sizeof msg, "database \"%.64s\" is paused by a %s in progress", argv[1],
                 op_name(op->kind));
        return error_reply(msg, "It resumes on its own, within its --timeout.");
    }
    uint64_t paused = uv_now(srv->loop) - op->started_ms;
    snprintf(op->who, sizeof op->who, "%s", pd_admin_who());
    record(op, "resume",
           json_pack("{s:s, s:I}", "reason", "resume", "paused_ms", (json_int_t)paused));
    if (op->req != NULL) /* the pause command had not been answered yet */
        reply(op,
              error_reply("the pause was ended by resume before the database went quiet", NULL));
    pd_log_info(NULL, "database \"%s\" resumed after %llu ms", op->database,
                (unsigned long long)paused);
    op_end(op);
    return json_pack("{s:b, s:s, s:I}", "ok", 1, "database", argv[1], "paused_ms",
                     (json_int_t)paused);
}

/* ---------------------------------------------------------------------------------------
 * switchover / rollback
 */

static void add_check(json_t *checks, const char *name, bool ok, json_t *value, const char *hint)
{
    json_t *c =
        json_pack("{s:s, s:b, s:o}", "check", name, "ok", ok, "value", value ? value : json_null());
    if (!ok && hint != NULL)
        json_object_set_new(c, "hint", json_string(hint));
    json_array_append_new(checks, c);
}

/* When a verify result was recorded (unix seconds; 0: never, or unreadable). */
static time_t verify_time(json_t *v)
{
    int64_t at_ms = pd_report_parse_time(json_string_value(json_object_get(v, "time")));
    return at_ms > 0 ? (time_t)(at_ms / 1000) : 0;
}

/* Did the rule record divergence at or after a verify at `at` (0: there was none)? */
static bool diverged_since(const pd_rule_stats_t *st, time_t at)
{
    return st->divergence_at != 0 && (at <= 0 || st->divergence_at >= at);
}

/* Every guardrail, passing or not, into a new array; *failed: how many failed, *hard: how
   many of those --force cannot override (flags this version cannot serve). */
static json_t *guardrails(pd_server_t *srv, const char *database, op_kind_t kind, long max_age_s,
                          bool tables, int *failed, int *hard)
{
    json_t *checks = json_array();
    pd_writes_t from = kind == OP_SWITCHOVER ? PD_WRITES_DUAL : PD_WRITES_DUAL_NEW;
    time_t now = time(NULL);
    char hint[512];
    for (unsigned i = 0; i < srv->cfg->rule_count; i++) {
        const pd_rule_cfg_t *r = &srv->cfg->rules[i];
        if (strcmp(r->database, database) != 0)
            continue;
        char name[160];
        /* flags */
        snprintf(name, sizeof name, "%s: writes=%s", r->name, pd_writes_name(from));
        bool ok = srv->flags[i].writes == from;
        snprintf(hint, sizeof hint,
                 "pgdualctl flag %s writes=%s (and let the mirror catch up) "
                 "first.",
                 r->name, pd_writes_name(from));
        /* Under writes=new old was not written at all: nothing is queued to catch up. */
        if (from == PD_WRITES_DUAL_NEW && srv->flags[i].writes == PD_WRITES_NEW)
            snprintf(hint, sizeof hint,
                     "pgdualctl flag %s writes=dual-new, then pgdualctl verify %s --repair: "
                     "old was not written while writes=new, and only the repair brings it up "
                     "to date.",
                     r->name, r->name);
        add_check(checks, name, ok, json_string(pd_writes_name(srv->flags[i].writes)), hint);
        *failed += !ok;
        /* the flags after the flip are ones this version serves */
        pd_reads_t reads = {.mode = kind == OP_SWITCHOVER ? PD_READS_NEW : PD_READS_OLD,
                            .percent = kind == OP_SWITCHOVER ? 100 : 0};
        pd_writes_t to = kind == OP_SWITCHOVER ? PD_WRITES_DUAL_NEW : PD_WRITES_DUAL;
        const char *why = pd_server_check_flags(srv, i, to, &reads);
        snprintf(name, sizeof name, "%s: can be served at writes=%s", r->name, pd_writes_name(to));
        add_check(checks, name, why == NULL, why ? json_string(why) : json_true(),
                  "Change the rule as the value says and reload (--force does not override "
                  "this).");
        *failed += why != NULL;
        *hard += why != NULL;
        if (kind == OP_ROLLBACK)
            continue; /* rollback is the way back: it needs the flags and the mirror only */
        /* divergence since the last passing verify, and that verify's age */
        json_t *v = pd_state_verify(srv->state, r->name);
        bool v_ok = json_is_true(json_object_get(v, "ok"));
        time_t at = verify_time(v);
        snprintf(name, sizeof name, "%s: verify passed within %ld s", r->name, max_age_s);
        ok = v != NULL && v_ok && at > 0 && now - at <= max_age_s;
        snprintf(hint, sizeof hint,
                 "Run pgdualctl verify %s (--touched is enough after a full "
                 "one; --repair if it finds rows).",
                 r->name);
        add_check(checks, name, ok,
                  v == NULL ? json_string("never")
                            : json_pack("{s:b, s:I}", "ok", v_ok, "age_s", (json_int_t)(now - at)),
                  hint);
        *failed += !ok;
        const pd_rule_stats_t *st = &srv->stats[i];
        snprintf(name, sizeof name, "%s: no divergence since that verify", r->name);
        ok = v != NULL && v_ok && at > 0 && !diverged_since(st, at);
        snprintf(hint, sizeof hint,
                 "pgdualctl divergence %s shows what differed; then run "
                 "pgdualctl verify %s --repair.",
                 r->name, r->name);
        add_check(
            checks, name, ok,
            json_pack("{s:I, s:I, s:I, s:I}", "mirror_diverged", (json_int_t)st->mirror_diverged,
                      "mirror_unapplied", (json_int_t)st->mirror_unapplied, "shadow_mismatched",
                      (json_int_t)st->shadow_mismatched, "last_at", (json_int_t)st->divergence_at),
            hint);
        *failed += !ok;
        json_decref(v);
    }
    if (tables) {
        pd_mirror_totals_t mt;
        pd_mirror_db_totals(srv, database, &mt);
        /* Under load an async mirror always trails a little; the drain while paused waits
           for the rest. Far behind, the pause would be long: refused. */
        bool ok = mt.detached == 0 && mt.queued <= PD_REPORT_MAX_QUEUED;
        add_check(checks, "mirrors connected and caught up", ok,
                  json_pack("{s:i, s:i, s:i, s:I}", "open", (int)mt.open, "connecting",
                            (int)mt.connecting, "detached", (int)mt.detached, "queued",
                            (json_int_t)mt.queued),
                  "A detached mirror missed writes: run pgdualctl verify RULE --repair (and "
                  "reconnect its sessions); more than 2000 statements queued: wait for the "
                  "mirrors to catch up.");
        *failed += !ok;
    }
    if (srv->fleet != NULL)
        *failed += !pd_fleet_check(srv->fleet, checks);
    return checks;
}

bool pd_cutover_local_ok(pd_server_t *srv, const char *database, bool rollback, char *why,
                         size_t size)
{
    bool tables = false;
    for (unsigned i = 0; i < srv->cfg->rule_count; i++) {
        const pd_rule_cfg_t *r = &srv->cfg->rules[i];
        if (strcmp(r->database, database) != 0)
            continue;
        tables |= r->kind == PD_RULE_TABLES;
        if (rollback)
            continue;
        json_t *v = pd_state_verify(srv->state, r->name);
        time_t at = verify_time(v);
        json_decref(v);
        if (diverged_since(&srv->stats[i], at)) {
            snprintf(why, size,
                     "rule \"%s\" saw divergence here since its last verify (pgdualctl "
                     "divergence %s on this instance; then verify %s --repair)",
                     r->name, r->name, r->name);
            return false;
        }
    }
    pd_mirror_totals_t mt = {0};
    if (tables)
        pd_mirror_db_totals(srv, database, &mt);
    if (mt.detached > 0) {
        snprintf(why, size,
                 "%u mirror connections detached here: writes missed the mirror (pgdualctl "
                 "verify RULE --repair, and reconnect those sessions)",
                 (unsigned)mt.detached);
        return false;
    }
    return true;
}

static void flip_done(struct pd_cutover *op, int seq_set);

static void seq_work(uv_work_t *w)
{
    struct pd_cutover *op = w->data;
    op->seq_set = pd_seqsync_once(op->from, op->to, op->seq_error, sizeof op->seq_error);
}

static void abandon(struct pd_cutover *op, const char *why, const char *hint, json_t *busy)
{
    uint64_t paused = uv_now(op->srv->loop) - op->started_ms;
    char msg[768];
    snprintf(msg, sizeof msg,
             "%s of database \"%s\" abandoned: %s; traffic resumes on %s, "
             "unchanged",
             op_name(op->kind), op->database, why, op->kind == OP_SWITCHOVER ? "old" : "new");
    pd_log_warning(NULL, "%s", msg);
    json_t *r = error_reply(msg, hint);
    json_object_set_new(r, "pause_ms", json_integer((json_int_t)paused));
    if (busy != NULL)
        json_object_set(r, "busy", busy);
    if (op->checks != NULL)
        json_object_set(r, "checks", op->checks);
    record(op, "switchover_abandoned",
           json_pack("{s:s, s:s, s:I}", "operation", op_name(op->kind), "reason", why, "pause_ms",
                     (json_int_t)paused));
    json_decref(busy);
    reply(op, r);
    pd_watch_t *w = op->auto_for;
    op_end(op);
    if (w != NULL)
        pd_watch_rollback_done(w, why, NULL);
}

static void seq_done(uv_work_t *w, int status)
{
    struct pd_cutover *op = w->data;
    op->sequencing = false;
    if (op->stopped) { /* abandoned meanwhile (shutdown): nothing flips */
        uv_close((uv_handle_t *)&op->timer, op_closed);
        return;
    }
    if (status != 0 || op->seq_error[0] != '\0') {
        abandon(op, status != 0 ? "the sequence step could not run" : op->seq_error,
                "Check that both sides of the database are reachable with the conninfos of "
                "the config, then run it again.",
                NULL);
        return;
    }
    flip_done(op, op->seq_set);
}

/* Quiet: every rule of the database flips, then the pause ends. */
static void flip_done(struct pd_cutover *op, int seq_set)
{
    pd_server_t *srv = op->srv;
    bool sw = op->kind == OP_SWITCHOVER;
    pd_writes_t to = sw ? PD_WRITES_DUAL_NEW : PD_WRITES_DUAL;
    pd_reads_t reads = {.mode = sw ? PD_READS_NEW : PD_READS_OLD, .percent = sw ? 100 : 0};
    json_t *rules = json_array();
    /* The state write is the only step that can fail midway: the rules flipped so far
       are then put back as they were. */
    pd_rule_flags_t *before = malloc((srv->cfg->rule_count + 1) * sizeof *before);
    if (before == NULL) {
        json_decref(rules);
        abandon(op, "out of memory", NULL, NULL);
        return;
    }
    memcpy(before, srv->flags, srv->cfg->rule_count * sizeof *before);
    for (unsigned i = 0; i < srv->cfg->rule_count; i++) {
        if (strcmp(srv->cfg->rules[i].database, op->database) != 0)
            continue;
        char *err = NULL;
        if (pd_server_set_flags(srv, i, to, &reads, op->who, &err) != 0) {
            for (unsigned k = 0; k < i; k++) {
                char *e2 = NULL;
                if (strcmp(srv->cfg->rules[k].database, op->database) == 0)
                    pd_server_set_flags(srv, k, before[k].writes, &before[k].reads, op->who, &e2);
                free(e2);
            }
            char why[512];
            snprintf(why, sizeof why, "the state could not be saved: %s",
                     err ? err : "out of memory");
            free(err);
            free(before);
            json_decref(rules);
            abandon(op, why, "Check that the state file's directory is writable.", NULL);
            return;
        }
        char rt[32];
        json_array_append_new(rules, json_pack("{s:s, s:s, s:s}", "rule", srv->cfg->rules[i].name,
                                               "writes", pd_writes_name(to), "reads",
                                               pd_reads_format(&reads, rt, sizeof rt)));
    }
    free(before);
    uint64_t paused = uv_now(srv->loop) - op->started_ms;
    json_t *r = json_pack("{s:b, s:s, s:s, s:I, s:I, s:i, s:O, s:o}", "ok", 1, "database",
                          op->database, "operation", op_name(op->kind), "pause_ms",
                          (json_int_t)paused, "drain_ms", (json_int_t)op->quiet_ms, "sequences_set",
                          seq_set, "checks", op->checks, "rules", rules);
    json_t *measured = json_pack("{s:I, s:I, s:i}", "pause_ms", (json_int_t)paused, "drain_ms",
                                 (json_int_t)op->quiet_ms, "sequences_set", seq_set);
    /* The traffic mark moves with every flip; a switchover --watch starts its watch. */
    json_t *watch =
        pd_watch_flipped(srv, op->database, sw ? &op->watch : NULL, op->timeout_ms, op->who);
    if (watch != NULL) {
        json_object_set(measured, "watch", watch);
        json_object_set_new(r, "watch", watch);
    }
    pd_log_info(NULL, "%s of database \"%s\" done by %s: paused %llu ms, %d sequences set",
                op_name(op->kind), op->database, op->who, (unsigned long long)paused, seq_set);
    pd_watch_t *w = op->auto_for;
    if (w == NULL)
        record(op, op_name(op->kind), measured); /* the watch records its own rollback */
    reply(op, r);
    op_end(op);
    if (w != NULL)
        pd_watch_rollback_done(w, NULL, measured);
}

static void switch_tick(uv_timer_t *t)
{
    struct pd_cutover *op = t->data;
    pd_server_t *srv = op->srv;
    uint64_t now = uv_now(srv->loop);
    if (pd_cutover_drained(srv, op->database)) {
        uv_timer_stop(&op->timer);
        op->quiet_ms = now - op->started_ms;
        int sides =
            pd_cutover_seq_sides(srv, op->database, op->kind == OP_ROLLBACK, &op->from, &op->to);
        if (sides == 0) {
            flip_done(op, 0);
            return;
        }
        if (sides < 0 || uv_queue_work(srv->loop, &op->work, seq_work, seq_done) != 0) {
            abandon(op, "out of memory", NULL, NULL);
            return;
        }
        op->sequencing = true;
        return;
    }
    if (now - op->started_ms >= op->timeout_ms) {
        char why[160];
        snprintf(why, sizeof why, "%s did not drain within %llu ms",
                 !db_quiet(srv, op->database) ? "transactions in flight" : "the mirrors",
                 (unsigned long long)op->timeout_ms);
        abandon(op, why,
                "The sessions listed are in transactions: wait for them, or run it again with a "
                "longer --timeout.",
                busy_sessions(srv, op->database));
    }
}

/* The reply refusing an operation whose guardrails failed; takes checks. */
static json_t *refusal(op_kind_t kind, const char *database, json_t *checks, int failed)
{
    /* Name the first failing check in the message; the list has them all. */
    json_t *first = NULL;
    for (size_t i = 0; i < json_array_size(checks) && first == NULL; i++)
        if (!json_is_true(json_object_get(json_array_get(checks, i), "ok")))
            first = json_array_get(checks, i);
    char msg[512];
    snprintf(msg, sizeof msg,
             "%s of database \"%s\" refused: check \"%s\" failed (%d of %zu failed)", op_name(kind),
             database, json_string_value(json_object_get(first, "check")), failed,
             json_array_size(checks));
    json_t *r = error_reply(msg, json_string_value(json_object_get(first, "hint")));
    json_object_set_new(r, "checks", checks);
    return r;
}

/* Pauses the database and lets switch_tick drain and flip it. NULL, or out of memory. */
static struct pd_cutover *switch_start(pd_server_t *srv, pd_admin_req_t *req, op_kind_t kind,
                                       const char *database, const opts_t *o, json_t *checks,
                                       bool tables)
{
    struct pd_cutover *op = op_new(srv, req, kind, database, o->timeout_ms);
    if (op == NULL) {
        json_decref(checks);
        return NULL;
    }
    op->checks = checks;
    op->tables = tables;
    op->watch = o->watch;
    uv_timer_start(&op->timer, switch_tick, 0, 1);
    return op;
}

static json_t *dry_run(const char *database, op_kind_t kind, const opts_t *o, json_t *checks,
                       int failed, int hard)
{
    bool sw = kind == OP_SWITCHOVER;
    json_t *plan =
        json_pack("[s, s, s, s, s]", "check the guardrails (refuse unless --force)",
                  "pause: hold new transactions and statements outside transactions",
                  "drain: wait until sessions are between transactions and mirrors applied all",
                  sw ? "set new's sequences at least as high as old's"
                     : "set old's sequences at least as high as new's",
                  sw ? "flip every rule to writes=dual-new reads=new, then resume"
                     : "flip every rule to writes=dual reads=old, then resume");
    if (o->watch.window_ms > 0) {
        char step[512];
        pd_watch_plan(&o->watch, step, sizeof step);
        json_array_append_new(plan, json_string(step));
    }
    return json_pack("{s:b, s:b, s:s, s:s, s:b, s:o, s:o}", "ok", 1, "dry_run", 1, "database",
                     database, "operation", op_name(kind), "would_refuse",
                     hard > 0 || (failed > 0 && !o->force), "plan", plan, "checks", checks);
}

void pd_cmd_switchover(pd_server_t *srv, pd_admin_req_t *req, int argc, char **argv)
{
    op_kind_t kind = strcmp(argv[0], "rollback") == 0 ? OP_ROLLBACK : OP_SWITCHOVER;
    opts_t o;
    bool tables = false;
    json_t *err = parse_opts(argc, argv, kind, &o);
    if (err == NULL)
        err = check_database(srv, argv[1], &tables);
    if (err != NULL) {
        pd_admin_reply(req, err);
        return;
    }
    int failed = 0, hard = 0;
    json_t *checks = guardrails(srv, argv[1], kind, o.max_age_s, tables, &failed, &hard);
    if (o.dry_run) {
        pd_admin_reply(req, dry_run(argv[1], kind, &o, checks, failed, hard));
        return;
    }
    if (hard > 0 || (failed > 0 && !o.force)) {
        pd_admin_reply(req, refusal(kind, argv[1], checks, failed));
        return;
    }
    if (srv->fleet != NULL) {
        pd_log_info(NULL, "%s of database \"%s\" across the fleet requested by %s%s", op_name(kind),
                    argv[1], pd_admin_who(),
                    o.force && failed > 0 ? " (--force over failing guardrails)" : "");
        pd_watch_end(srv, argv[1], pd_admin_who(),
                     kind == OP_ROLLBACK ? "an operator's rollback" : "a new switchover");
        pd_fleet_switchover(srv, req, kind == OP_ROLLBACK, argv[1], o.timeout_ms, checks,
                            pd_admin_who(), o.force, &o.watch, NULL);
        return;
    }
    struct pd_cutover *op = switch_start(srv, req, kind, argv[1], &o, checks, tables);
    if (op == NULL) {
        pd_admin_reply(req, error_reply("out of memory", NULL));
        return;
    }
    pd_log_info(NULL, "%s of database \"%s\" started by %s%s: paused", op_name(kind), op->database,
                op->who, o.force && failed > 0 ? " (--force over failing guardrails)" : "");
    /* The operator takes over: a watch of the last switchover ends. */
    pd_watch_end(srv, op->database, op->who,
                 kind == OP_ROLLBACK ? "an operator's rollback" : "a new switchover");
}

int pd_cutover_auto_rollback(pd_server_t *srv, pd_watch_t *w, const char *database, const char *who,
                             uint64_t timeout_ms, char *msg, size_t size)
{
    bool tables = false;
    int failed = 0, hard = 0;
    json_t *checks = NULL;
    json_t *err = check_database(srv, database, &tables);
    if (err == NULL) {
        checks =
            guardrails(srv, database, OP_ROLLBACK, VERIFY_AGE_DEFAULT_S, tables, &failed, &hard);
        if (failed > 0)
            err = refusal(OP_ROLLBACK, database, checks, failed); /* takes checks */
    }
    if (err != NULL) {
        /* The refusal as one line: what failed, then what to do. */
        const char *e = json_string_value(json_object_get(err, "error"));
        const char *h = json_string_value(json_object_get(err, "hint"));
        snprintf(msg, size, "%s%s%s%s", e ? e : "refused", h ? " (" : "", h ? h : "", h ? ")" : "");
        json_decref(err);
        return -1;
    }
    if (srv->fleet != NULL && pd_fleet_coordinating(srv->fleet)) {
        snprintf(msg, size, "this instance coordinates a fleet operation already (retried)");
        json_decref(checks);
        return -1;
    }
    if (srv->fleet != NULL) { /* across the fleet, like an operator's rollback */
        pd_log_info(NULL, "rollback of database \"%s\" across the fleet started by %s", database,
                    who);
        pd_fleet_switchover(srv, NULL, true, database, timeout_ms, checks, who, false, NULL, w);
        return 0;
    }
    opts_t o = {.timeout_ms = timeout_ms};
    pd_watch_opts_init(&o.watch);
    struct pd_cutover *op = switch_start(srv, NULL, OP_ROLLBACK, database, &o, checks, tables);
    if (op == NULL) {
        snprintf(msg, size, "out of memory");
        return -1;
    }
    op->auto_for = w;
    snprintf(op->who, sizeof op->who, "%s", who);
    pd_log_info(NULL, "rollback of database \"%s\" started by %s: paused", database, who);
    return 0;
}

void pd_cutover_stop_all(pd_server_t *srv)
{
    while (srv->cutovers != NULL) {
        struct pd_cutover *op = srv->cutovers;
        if (op->kind == OP_PAUSE || op->req == NULL) {
            reply(op, error_reply("pgdual is stopping", NULL));
            op_end(op);
        } else {
            abandon(op, "pgdual is stopping", NULL, NULL);
        }
    }
    pd_watch_stop_all(srv);
}
