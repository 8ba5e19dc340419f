/*
 * watch.c — rollback triggers after a switchover (watch.h says what is compared).
 *
 * A watch is a timer on the loop that looks every PD_WATCH_TICK_MS at the database's
 * divergence counters and client traffic, both taken relative to their values at the flip.
 * A threshold passed starts the rollback through cutover.c, which calls back when it is
 * done or could not be done.
 */
#include "admin/watch.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "admin/cutover.h"
#include "admin/report.h"
#include "proxy/log.h"
#include "rules/state.h"

#define RETRY_FIRST_MS 1000
#define RETRY_MAX_MS   60000

struct pd_watch {
    pd_watch_t *next;
    pd_server_t *srv;
    uv_timer_t timer;
    char database[64];
    char who[64]; /* the operator who asked for the switchover */
    char by[96];  /* the author of what the watch does, for the history */
    pd_watch_opts_t o;
    uint64_t timeout_ms;    /* the switchover's drain timeout, for the rollback */
    uint64_t started_ms;    /* loop time of the flip */
    int64_t started_at;     /* wall clock of the flip, ms since the epoch */
    pd_traffic_t *traffic;  /* the server's */
    uint64_t div0;          /* the database's divergence events at the flip */
    uint64_t req0, err0;    /* its traffic at the flip */
    uint64_t base_requests; /* before the flip: from the previous flip (or start) to it */
    uint64_t base_errors;
    double rate_before; /* what the rate after is compared with (0 when too few requests) */
    /* once a threshold is passed */
    bool triggered, rolling_back;
    const char *threshold; /* "max_divergence" or "max_error_rate" */
    double observed, limit;
    uint64_t triggered_ms;
    char reason[256];
    unsigned attempts;
    uint64_t retry_at_ms, retry_ms;
    char last_failure[512];
};

/* What the watch sees now, relative to the flip. */
typedef struct {
    uint64_t divergence, requests, errors;
    double rate;
} observed_t;

void pd_watch_opts_init(pd_watch_opts_t *o)
{
    *o = (pd_watch_opts_t){.window_ms = 0, .max_divergence = -1, .max_error_rate = -1};
}

/* ---------------------------------------------------------------------------------------
 * Options
 */

static bool parse_window(const char *text, pd_watch_opts_t *o)
{
    char *end = NULL;
    if (text[0] < '0' || text[0] > '9')
        return false;
    unsigned long long v = strtoull(text, &end, 10);
    uint64_t unit = strcmp(end, "") == 0 || strcmp(end, "s") == 0 ? 1000
                    : strcmp(end, "m") == 0                       ? 60000
                    : strcmp(end, "h") == 0                       ? 3600000
                                                                  : 0;
    if (unit == 0 || v == 0 || v > PD_WATCH_MAX_MS / unit)
        return false;
    o->window_ms = (uint64_t)v * unit;
    return true;
}

static bool parse_count(const char *text, pd_watch_opts_t *o)
{
    char *end = NULL;
    if (text[0] < '0' || text[0] > '9')
        return false;
    long long v = strtoll(text, &end, 10);
    if (*end != '\0' || v < 0)
        return false;
    o->max_divergence = v;
    return true;
}

static bool parse_rate(const char *text, pd_watch_opts_t *o)
{
    char *end = NULL;
    if ((text[0] < '0' || text[0] > '9') && text[0] != '.')
        return false;
    double v = strtod(text, &end);
    if (strcmp(end, "%") == 0)
        v /= 100;
    else if (*end != '\0')
        return false;
    if (!isfinite(v) || v < 0 || v > 1)
        return false;
    o->max_error_rate = v;
    return true;
}

/* The options: one table for the parsing, the messages and pd_watch_is_option. */
static const struct {
    const char *flag;
    bool (*parse)(const char *text, pd_watch_opts_t *o);
    const char *takes;
} options[] = {
    {"--watch", parse_window,
     "a duration such as 90s, 10m or 1h (plain numbers are seconds), from 1 s to 7 days"},
    {"--max-divergence", parse_count, "a whole number of divergence events, 0 or more"},
    {"--max-error-rate", parse_rate, "errors per request from 0 to 1, such as 0.05 or 5%"},
};

bool pd_watch_is_option(const char *flag)
{
    for (size_t i = 0; i < sizeof options / sizeof options[0]; i++)
        if (strcmp(flag, options[i].flag) == 0)
            return true;
    return false;
}

int pd_watch_option(const char *flag, const char *value, pd_watch_opts_t *o, char *msg, size_t size)
{
    for (size_t i = 0; i < sizeof options / sizeof options[0]; i++) {
        if (strcmp(flag, options[i].flag) != 0)
            continue;
        if (options[i].parse(value, o))
            return 1;
        snprintf(msg, size, "%s takes %s; not \"%.32s\"", flag, options[i].takes, value);
        return -1;
    }
    return 0;
}

const char *pd_watch_opts_error(const pd_watch_opts_t *o, const char **hint)
{
    bool thresholds = o->max_divergence >= 0 || o->max_error_rate >= 0;
    if (o->window_ms == 0 && thresholds) {
        *hint = "Say how long to watch after the switch, e.g. --watch 10m --max-divergence 0.";
        return "--max-divergence and --max-error-rate are thresholds of a watch: give --watch "
               "DURATION too";
    }
    if (o->window_ms > 0 && !thresholds) {
        *hint = "Add --max-divergence N, --max-error-rate R, or both.";
        return "--watch needs a threshold to watch";
    }
    *hint = NULL;
    return NULL;
}

/* "more than N divergence events, or an error rate above the rate before plus R ..." */
static void thresholds_text(const pd_watch_opts_t *o, char *buf, size_t size)
{
    int n = 0;
    buf[0] = '\0';
    if (o->max_divergence >= 0)
        n = snprintf(buf, size, "more than %lld divergence events", o->max_divergence);
    if (o->max_error_rate >= 0 && n >= 0 && (size_t)n < size)
        snprintf(buf + n, size - (size_t)n,
                 "%san error rate above the rate before plus %g (after %d requests)",
                 n > 0 ? ", or " : "", o->max_error_rate, PD_WATCH_MIN_REQUESTS);
}

void pd_watch_plan(const pd_watch_opts_t *o, char *buf, size_t size)
{
    char t[256];
    thresholds_text(o, t, sizeof t);
    snprintf(buf, size, "watch for %llu s after the flip: roll back on %s",
             (unsigned long long)(o->window_ms / 1000), t);
}

/* ---------------------------------------------------------------------------------------
 * Watching
 */

static int64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Divergence events recorded by the database's rules since pgdual started (reloads keep
 * the counters of rules they keep). */
static uint64_t db_divergence(const pd_server_t *srv, const char *database)
{
    uint64_t n = 0;
    for (unsigned i = 0; i < srv->cfg->rule_count; i++) {
        if (strcmp(srv->cfg->rules[i].database, database) != 0)
            continue;
        const pd_rule_stats_t *st = &srv->stats[i];
        n += st->shadow_mismatched + st->mirror_diverged + st->mirror_unapplied +
             st->mirror_proxy_errors;
    }
    return n;
}

/* Is every rule of the database (at least one) at writes=dual-new? */
static bool db_switched(const pd_server_t *srv, const char *database)
{
    bool any = false;
    for (unsigned i = 0; i < srv->cfg->rule_count; i++) {
        if (strcmp(srv->cfg->rules[i].database, database) != 0)
            continue;
        if (srv->flags[i].writes != PD_WRITES_DUAL_NEW)
            return false;
        any = true;
    }
    return any;
}

static uint64_t since(uint64_t now, uint64_t then)
{
    return now > then ? now - then : 0; /* a reload may drop a rule and its counts */
}

static void observe(const pd_watch_t *w, observed_t *ob)
{
    ob->divergence = since(db_divergence(w->srv, w->database), w->div0);
    ob->requests = since(PD_GET(w->traffic->requests), w->req0);
    ob->errors = since(PD_GET(w->traffic->errors), w->err0);
    ob->rate = ob->requests > 0 ? (double)ob->errors / (double)ob->requests : 0;
}

static pd_watch_t **watch_slot(pd_server_t *srv, const char *database)
{
    pd_watch_t **pp = &srv->watches;
    while (*pp != NULL && strcmp((*pp)->database, database) != 0)
        pp = &(*pp)->next;
    return pp;
}

static void watch_closed(uv_handle_t *h)
{
    free(h->data);
}

/* Ends the watch: it leaves the list, its timer stops, memory goes in the close callback. */
static void watch_free(pd_watch_t *w)
{
    pd_watch_t **pp = watch_slot(w->srv, w->database);
    if (*pp == w)
        *pp = w->next;
    uv_timer_stop(&w->timer);
    uv_close((uv_handle_t *)&w->timer, watch_closed);
}

/* A rate (0..1) as JSON, to 6 decimals: people read it. */
static json_t *rate_json(double rate)
{
    return json_real((double)(long long)(rate * 1e6 + 0.5) / 1e6);
}

/* The thresholds into j: max_divergence, max_error_rate (null when not watched). */
static json_t *with_thresholds(json_t *j, const pd_watch_opts_t *o)
{
    json_object_set_new(j, "max_divergence",
                        o->max_divergence >= 0 ? json_integer(o->max_divergence) : json_null());
    json_object_set_new(j, "max_error_rate",
                        o->max_error_rate >= 0 ? rate_json(o->max_error_rate) : json_null());
    return j;
}

/* What the history keeps of a watch's end: thresholds and what was observed. */
static json_t *watch_fields(const pd_watch_t *w)
{
    observed_t ob;
    observe(w, &ob);
    json_t *f =
        json_pack("{s:I, s:I, s:I, s:I, s:o, s:o}", "window_s", (json_int_t)(w->o.window_ms / 1000),
                  "divergence", (json_int_t)ob.divergence, "requests", (json_int_t)ob.requests,
                  "errors", (json_int_t)ob.errors, "error_rate", rate_json(ob.rate), "rate_before",
                  rate_json(w->rate_before));
    return with_thresholds(f, &w->o);
}

/* A threshold passed? Then the reason is kept in w. */
static bool passed(pd_watch_t *w, const observed_t *ob)
{
    if (w->o.max_divergence >= 0 && ob->divergence > (uint64_t)w->o.max_divergence) {
        w->threshold = "max_divergence";
        w->observed = (double)ob->divergence;
        w->limit = (double)w->o.max_divergence;
        snprintf(w->reason, sizeof w->reason,
                 "%llu divergence events since the switch, more than --max-divergence %lld",
                 (unsigned long long)ob->divergence, w->o.max_divergence);
        return true;
    }
    if (w->o.max_error_rate >= 0 && ob->requests >= PD_WATCH_MIN_REQUESTS &&
        ob->rate > w->rate_before + w->o.max_error_rate) {
        w->threshold = "max_error_rate";
        w->observed = ob->rate;
        w->limit = w->rate_before + w->o.max_error_rate;
        snprintf(w->reason, sizeof w->reason,
                 "client error rate %.4f since the switch (%llu errors in %llu requests), above "
                 "the rate before it (%.4f) plus --max-error-rate %g",
                 ob->rate, (unsigned long long)ob->errors, (unsigned long long)ob->requests,
                 w->rate_before, w->o.max_error_rate);
        return true;
    }
    return false;
}

/* The rollback did not happen this time: said, kept for status, tried again later. */
static void rollback_failed(pd_watch_t *w, const char *why)
{
    uint64_t now = uv_now(w->srv->loop);
    snprintf(w->last_failure, sizeof w->last_failure, "%s", why);
    w->retry_ms = w->retry_ms == 0                 ? RETRY_FIRST_MS
                  : w->retry_ms * 2 > RETRY_MAX_MS ? RETRY_MAX_MS
                                                   : w->retry_ms * 2;
    w->retry_at_ms = now + w->retry_ms;
    pd_log_warning(NULL,
                   "automatic rollback of database \"%s\" (attempt %u) did not happen: %s; "
                   "trying again in %llu s",
                   w->database, w->attempts, why, (unsigned long long)(w->retry_ms / 1000));
    pd_log_warning(NULL,
                   "HINT:  pgdualctl status shows the watch; pgdualctl rollback %s (with a "
                   "longer --timeout if sessions are busy) does it by hand and ends the watch.",
                   w->database);
    if (w->attempts == 1) {
        json_t *f = watch_fields(w);
        json_object_update_new(f, json_pack("{s:s, s:s, s:s}", "threshold", w->threshold, "reason",
                                            w->reason, "error", why));
        pd_cutover_record(w->srv, w->database, w->by, "auto_rollback_failed", f);
    }
}

static void try_rollback(pd_watch_t *w)
{
    char msg[512];
    w->attempts++;
    w->rolling_back = true;
    if (pd_cutover_auto_rollback(w->srv, w, w->database, w->by, w->timeout_ms, msg, sizeof msg) !=
        0) {
        w->rolling_back = false;
        rollback_failed(w, msg);
    }
}

void pd_watch_rollback_done(pd_watch_t *w, const char *error, json_t *fields)
{
    w->rolling_back = false;
    if (error != NULL) {
        json_decref(fields);
        rollback_failed(w, error);
        return;
    }
    json_t *f = watch_fields(w);
    bool rate = strcmp(w->threshold, "max_error_rate") == 0;
    json_object_update_new(
        f, json_pack("{s:s, s:o, s:o, s:s, s:I, s:i}", "threshold", w->threshold, "observed",
                     rate ? rate_json(w->observed) : json_integer((json_int_t)w->observed), "limit",
                     rate ? rate_json(w->limit) : json_integer((json_int_t)w->limit), "reason",
                     w->reason, "after_s", (json_int_t)((w->triggered_ms - w->started_ms) / 1000),
                     "attempts", (int)w->attempts));
    if (fields != NULL)
        json_object_update_new(f, fields);
    pd_cutover_record(w->srv, w->database, w->by, "auto_rollback", f);
    pd_log_warning(NULL, "database \"%s\" rolled back automatically to old: %s", w->database,
                   w->reason);
    watch_free(w);
}

static void watch_tick(uv_timer_t *t)
{
    pd_watch_t *w = t->data;
    pd_server_t *srv = w->srv;
    uint64_t now = uv_now(srv->loop);
    if (w->rolling_back)
        return;
    if (!db_switched(srv, w->database)) {
        pd_log_info(NULL,
                    "switchover watch of database \"%s\" ended: its rules are no longer "
                    "at writes=dual-new",
                    w->database);
        json_t *f = watch_fields(w);
        json_object_set_new(f, "reason", json_string("the rules are no longer at writes=dual-new"));
        pd_cutover_record(srv, w->database, w->by, "watch_ended", f);
        watch_free(w);
        return;
    }
    if (!w->triggered) {
        observed_t ob;
        observe(w, &ob);
        if (passed(w, &ob)) {
            w->triggered = true;
            w->triggered_ms = now;
            w->retry_at_ms = now;
            pd_log_warning(NULL, "switchover watch of database \"%s\": %s; rolling back to old",
                           w->database, w->reason);
        } else if (now - w->started_ms >= w->o.window_ms) {
            pd_log_info(NULL,
                        "switchover watch of database \"%s\" passed: %llu s without %s "
                        "(%llu divergence events, %llu errors in %llu requests)",
                        w->database, (unsigned long long)(w->o.window_ms / 1000),
                        "passing a threshold", (unsigned long long)ob.divergence,
                        (unsigned long long)ob.errors, (unsigned long long)ob.requests);
            pd_cutover_record(srv, w->database, w->by, "watch_passed", watch_fields(w));
            watch_free(w);
            return;
        }
    }
    if (w->triggered && now >= w->retry_at_ms)
        try_rollback(w);
}

json_t *pd_watch_flipped(pd_server_t *srv, const char *database, const pd_watch_opts_t *o,
                         uint64_t timeout_ms, const char *who)
{
    pd_traffic_t *t = pd_server_traffic(srv, database);
    if (t == NULL)
        return o != NULL && o->window_ms > 0 ? json_pack("{s:s}", "error", "out of memory") : NULL;
    uint64_t requests = PD_GET(t->requests), errors = PD_GET(t->errors);
    uint64_t base_requests = requests - t->mark_requests;
    uint64_t base_errors = errors - t->mark_errors;
    t->mark_requests = requests;
    t->mark_errors = errors;
    if (o == NULL || o->window_ms == 0)
        return NULL;
    pd_watch_t *w = calloc(1, sizeof *w);
    if (w == NULL)
        return json_pack("{s:s}", "error", "out of memory: the switch is not watched");
    *w = (pd_watch_t){.srv = srv,
                      .o = *o,
                      .timeout_ms = timeout_ms,
                      .started_ms = uv_now(srv->loop),
                      .started_at = wall_ms(),
                      .traffic = t,
                      .div0 = db_divergence(srv, database),
                      .req0 = requests,
                      .err0 = errors,
                      .base_requests = base_requests,
                      .base_errors = base_errors};
    if (base_requests >= PD_WATCH_MIN_REQUESTS)
        w->rate_before = (double)base_errors / (double)base_requests;
    snprintf(w->database, sizeof w->database, "%s", database);
    snprintf(w->who, sizeof w->who, "%s", who);
    snprintf(w->by, sizeof w->by, "pgdual watch (switchover by %s)", who);
    pd_watch_t **slot = watch_slot(srv, database);
    if (*slot != NULL) /* cannot happen: a switchover ends the database's watch first */
        watch_free(*slot);
    w->next = srv->watches;
    srv->watches = w;
    uv_timer_init(srv->loop, &w->timer);
    w->timer.data = w;
    uv_timer_start(&w->timer, watch_tick, PD_WATCH_TICK_MS, PD_WATCH_TICK_MS);
    char until[32], t_text[256];
    pd_report_format_time(w->started_at + (int64_t)o->window_ms, until, sizeof until);
    thresholds_text(o, t_text, sizeof t_text);
    pd_log_info(NULL, "switchover of database \"%s\" watched until %s: rolls back on %s", database,
                until, t_text);
    json_t *r = json_pack(
        "{s:I, s:s, s:i, s:{s:I, s:I, s:o}, s:o}", "window_s", (json_int_t)(o->window_ms / 1000),
        "until", until, "min_requests", PD_WATCH_MIN_REQUESTS, "before", "requests",
        (json_int_t)base_requests, "errors", (json_int_t)base_errors, "error_rate",
        rate_json(base_requests > 0 ? (double)base_errors / (double)base_requests : 0.0),
        "rate_before", rate_json(w->rate_before));
    return with_thresholds(r, o);
}

void pd_watch_end(pd_server_t *srv, const char *database, const char *who, const char *why)
{
    pd_watch_t *w = *watch_slot(srv, database);
    if (w == NULL)
        return;
    pd_log_info(NULL, "switchover watch of database \"%s\" ended: %s", database, why);
    json_t *f = watch_fields(w);
    json_object_set_new(f, "reason", json_string(why));
    pd_cutover_record(srv, database, who, "watch_ended", f);
    watch_free(w);
}

/* ---------------------------------------------------------------------------------------
 * For people
 */

static json_t *watch_json(const pd_watch_t *w, uint64_t now)
{
    observed_t ob;
    observe(w, &ob);
    char started[32], until[32];
    pd_report_format_time(w->started_at, started, sizeof started);
    pd_report_format_time(w->started_at + (int64_t)w->o.window_ms, until, sizeof until);
    uint64_t end = w->started_ms + w->o.window_ms;
    const char *state = !w->triggered     ? "watching"
                        : w->rolling_back ? "rolling back"
                                          : "rollback pending";
    json_t *j = json_pack("{s:s, s:s, s:s, s:s, s:s, s:I}", "database", w->database, "state", state,
                          "started_by", w->who, "started_at", started, "until", until,
                          "remaining_s", (json_int_t)(end > now ? (end - now + 999) / 1000 : 0));
    with_thresholds(j, &w->o);
    json_object_update_new(
        j, json_pack("{s:I, s:I, s:I, s:o, s:o, s:s?, s:i, s:s?}", "divergence",
                     (json_int_t)ob.divergence, "requests", (json_int_t)ob.requests, "errors",
                     (json_int_t)ob.errors, "error_rate", rate_json(ob.rate), "rate_before",
                     rate_json(w->rate_before), "reason", w->triggered ? w->reason : NULL,
                     "attempts", (int)w->attempts, "last_failure",
                     w->last_failure[0] != '\0' ? w->last_failure : NULL));
    return j;
}

json_t *pd_watch_list(pd_server_t *srv, const char *database)
{
    json_t *list = json_array();
    uint64_t now = uv_now(srv->loop);
    for (const pd_watch_t *w = srv->watches; w != NULL; w = w->next)
        if (database == NULL || strcmp(w->database, database) == 0)
            json_array_append_new(list, watch_json(w, now));
    return list;
}

/* Is history entry h about a watch (of database, or of any with NULL)? */
static bool watch_event(json_t *h, const char *database)
{
    static const char *const events[] = {"auto_rollback", "auto_rollback_failed", "watch_passed",
                                         "watch_ended"};
    const char *ev = json_string_value(json_object_get(h, "event"));
    const char *db = json_string_value(json_object_get(h, "database"));
    if (ev == NULL || db == NULL || (database != NULL && strcmp(db, database) != 0))
        return false;
    if (strcmp(ev, "switchover") == 0)
        return json_object_get(h, "watch") != NULL;
    for (size_t k = 0; k < sizeof events / sizeof events[0]; k++)
        if (strcmp(ev, events[k]) == 0)
            return true;
    return false;
}

json_t *pd_watch_events(pd_server_t *srv, const char *database)
{
    json_t *history = pd_state_history(srv->state), *out = json_array();
    size_t i;
    json_t *h;
    json_array_foreach(history, i, h)
    {
        if (watch_event(h, database))
            json_array_append(out, h);
    }
    json_decref(history);
    return out;
}

json_t *pd_watch_last_rollbacks(pd_server_t *srv, const char *database)
{
    json_t *events = pd_watch_events(srv, database), *newest = json_object();
    size_t i;
    json_t *h;
    json_array_foreach(events, i, h)
    {
        const char *db = json_string_value(json_object_get(h, "database"));
        if (strcmp(json_string_value(json_object_get(h, "event")), "auto_rollback") != 0)
            continue;
        json_object_set_new(
            newest, db,
            json_pack("{s:s, s:O?, s:O?, s:O?, s:O?, s:O?}", "database", db, "time",
                      json_object_get(h, "time"), "threshold", json_object_get(h, "threshold"),
                      "observed", json_object_get(h, "observed"), "limit",
                      json_object_get(h, "limit"), "reason", json_object_get(h, "reason")));
    }
    json_t *list = json_array();
    const char *db;
    json_object_foreach(newest, db, h) json_array_append(list, h);
    json_decref(newest);
    json_decref(events);
    return list;
}

void pd_watch_stop_all(pd_server_t *srv)
{
    while (srv->watches != NULL)
        pd_watch_end(srv, srv->watches->database, "pgdual", "pgdual is stopping");
}
