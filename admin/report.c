/*
 * report.c — the cutover readiness report (report.h): the evidence gathered from the
 * server, the divergence log bucketed over time, and the readiness checks.
 */
#include "admin/report.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "admin/render.h"
#include "admin/socket.h"
#include "admin/watch.h"
#include "proxy/compare.h"
#include "rules/state.h"

/* ---------------------------------------------------------------------------------------
 * Time
 */

int64_t pd_report_parse_time(const char *text)
{
    struct tm tm = {0};
    int n = 0;
    if (text == NULL ||
        sscanf(text, "%4d-%2d-%2dT%2d:%2d:%2d%n", &tm.tm_year, &tm.tm_mon, &tm.tm_mday, &tm.tm_hour,
               &tm.tm_min, &tm.tm_sec, &n) != 6 ||
        n != 19)
        return -1;
    if (tm.tm_mon < 1 || tm.tm_mon > 12 || tm.tm_mday < 1 || tm.tm_mday > 31 || tm.tm_hour > 23 ||
        tm.tm_min > 59 || tm.tm_sec > 60)
        return -1;
    int64_t ms = 0;
    const char *p = text + n;
    if (*p == '.') {
        int digits = 0;
        for (p++; *p >= '0' && *p <= '9'; p++, digits++)
            if (digits < 3)
                ms = ms * 10 + (*p - '0');
        if (digits == 0)
            return -1;
        for (; digits < 3; digits++)
            ms *= 10;
    }
    if (strcmp(p, "Z") != 0)
        return -1;
    tm.tm_year -= 1900;
    tm.tm_mon -= 1;
    time_t t = timegm(&tm);
    return t < 0 ? -1 : (int64_t)t * 1000 + ms;
}

void pd_report_format_time(int64_t ms, char *buf, size_t size)
{
    time_t t = (time_t)(ms / 1000);
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(buf, size, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---------------------------------------------------------------------------------------
 * Divergence over time
 */

static int64_t floor_to(int64_t v, int64_t step)
{
    int64_t q = v / step;
    return (v % step != 0 && v < 0 ? q - 1 : q) * step;
}

static int64_t buckets_needed(int64_t first_ms, int64_t last_ms, int64_t width_s)
{
    int64_t w = width_s * 1000;
    return (last_ms - floor_to(first_ms, w)) / w + 1;
}

int64_t pd_report_bucket_width(int64_t first_ms, int64_t last_ms, unsigned max_buckets)
{
    static const int64_t ladder[] = {1,   5,    10,   30,   60,    120,   300,   600,
                                     900, 1800, 3600, 7200, 10800, 21600, 43200, 86400};
    if (max_buckets == 0)
        max_buckets = 1;
    if (last_ms < first_ms)
        last_ms = first_ms;
    for (size_t i = 0; i < sizeof ladder / sizeof ladder[0]; i++)
        if (buckets_needed(first_ms, last_ms, ladder[i]) <= (int64_t)max_buckets)
            return ladder[i];
    /* Whole days past that: a first guess from the span, then the alignment's due. */
    int64_t days = (last_ms - first_ms) / (86400000LL * max_buckets) + 1;
    while (buckets_needed(first_ms, last_ms, days * 86400) > (int64_t)max_buckets)
        days++;
    return days * 86400;
}

static int series_cmp(const void *a, const void *b)
{
    json_t *x = *(json_t *const *)a, *y = *(json_t *const *)b;
    int c = strcmp(json_string_value(json_object_get(x, "rule")),
                   json_string_value(json_object_get(y, "rule")));
    return c != 0 ? c
                  : strcmp(json_string_value(json_object_get(x, "kind")),
                           json_string_value(json_object_get(y, "kind")));
}

/* The series of (rule, kind), made on first sight with n zero counts. */
static json_t *series_of(json_t *by_key, const char *rule, const char *kind, int64_t n)
{
    /* Rule names hold no control characters (config.c), so \x1f cannot be part of one. */
    char *key = NULL;
    if (asprintf(&key, "%s\x1f%s", rule, kind) < 0)
        return NULL;
    json_t *s = json_object_get(by_key, key);
    if (s == NULL) {
        json_t *counts = json_array();
        for (int64_t i = 0; i < n; i++)
            json_array_append_new(counts, json_integer(0));
        s = json_pack("{s:s, s:s, s:i, s:o}", "rule", rule, "kind", kind, "total", 0, "counts",
                      counts);
        json_object_set_new(by_key, key, s);
    }
    free(key);
    return s;
}

static void count_in(json_t *series, int64_t bucket)
{
    json_t *total = json_object_get(series, "total");
    json_integer_set(total, json_integer_value(total) + 1);
    json_t *c = json_array_get(json_object_get(series, "counts"), (size_t)bucket);
    json_integer_set(c, json_integer_value(c) + 1);
}

/* The series sorted by rule and kind, as an array. */
static json_t *sorted_series(json_t *by_key)
{
    size_t n = json_object_size(by_key), i = 0;
    json_t **v = calloc(n ? n : 1, sizeof *v);
    json_t *out = json_array();
    if (v == NULL)
        return out;
    const char *k;
    json_t *s;
    json_object_foreach(by_key, k, s) v[i++] = s;
    qsort(v, n, sizeof *v, series_cmp);
    for (i = 0; i < n; i++)
        json_array_append(out, v[i]);
    free(v);
    return out;
}

json_t *pd_report_divergence(json_t *events, int64_t now_ms, unsigned max_buckets)
{
    int64_t first = INT64_MAX, last = INT64_MIN;
    json_int_t dated = 0, undated = 0;
    size_t i;
    json_t *ev;
    json_array_foreach(events, i, ev)
    {
        if (!json_is_string(json_object_get(ev, "rule")) ||
            !json_is_string(json_object_get(ev, "kind")))
            continue;
        int64_t t = pd_report_parse_time(json_string_value(json_object_get(ev, "time")));
        if (t < 0) {
            undated++;
            continue;
        }
        dated++;
        first = t < first ? t : first;
        last = t > last ? t : last;
    }
    json_t *out = json_pack("{s:I, s:I}", "events", dated, "undated", undated);
    if (dated == 0) {
        json_object_update_new(out, json_pack("{s:i, s:n, s:n, s:i, s:[]}", "bucket_s", 0, "start",
                                              "end", "buckets", 0, "series"));
        return out;
    }
    if (now_ms > last)
        last = now_ms;
    int64_t width = pd_report_bucket_width(first, last, max_buckets);
    int64_t start = floor_to(first, width * 1000);
    int64_t n = buckets_needed(first, last, width);
    json_t *by_key = json_object();
    json_array_foreach(events, i, ev)
    {
        const char *rule = json_string_value(json_object_get(ev, "rule"));
        const char *kind = json_string_value(json_object_get(ev, "kind"));
        int64_t t = pd_report_parse_time(json_string_value(json_object_get(ev, "time")));
        json_t *s = rule && kind && t >= 0 ? series_of(by_key, rule, kind, n) : NULL;
        if (s != NULL)
            count_in(s, (t - start) / (width * 1000));
    }
    char from[32], to[32];
    pd_report_format_time(start, from, sizeof from);
    pd_report_format_time(start + n * width * 1000, to, sizeof to);
    json_object_update_new(out, json_pack("{s:I, s:s, s:s, s:I, s:o}", "bucket_s",
                                          (json_int_t)width, "start", from, "end", to, "buckets",
                                          (json_int_t)n, "series", sorted_series(by_key)));
    json_decref(by_key);
    return out;
}

/* ---------------------------------------------------------------------------------------
 * Readiness checks
 */

/* A check's value is written into a memory stream, one part per rule. */
typedef struct {
    FILE *f;
    char *text;
    size_t len;
    bool pass;
} check_t;

static void check_begin(check_t *c)
{
    *c = (check_t){.pass = true};
    c->f = open_memstream(&c->text, &c->len);
}

__attribute__((format(printf, 2, 3))) static void check_put(check_t *c, const char *fmt, ...)
{
    if (c->f == NULL)
        return;
    va_list ap;
    va_start(ap, fmt);
    if (ftell(c->f) > 0)
        fputs(", ", c->f);
    vfprintf(c->f, fmt, ap);
    va_end(ap);
}

static void check_end(check_t *c, json_t *checks, const char *name, const char *title)
{
    if (c->f != NULL)
        fclose(c->f);
    json_array_append_new(checks, json_pack("{s:s, s:s, s:b, s:s}", "name", name, "title", title,
                                            "pass", c->pass, "value", c->text ? c->text : ""));
    free(c->text);
}

static void check_writes(const pd_report_inputs_t *in, json_t *checks)
{
    check_t c;
    check_begin(&c);
    if (in->nrules == 0) {
        c.pass = false;
        check_put(&c, "the database has no rules");
    }
    for (unsigned i = 0; i < in->nrules; i++) {
        c.pass = c.pass && in->rules[i].writes == in->want;
        check_put(&c, "%s: %s", in->rules[i].name, pd_writes_name(in->rules[i].writes));
    }
    char title[64];
    snprintf(title, sizeof title, "every rule at writes=%s", pd_writes_name(in->want));
    check_end(&c, checks, "writes", title);
}

static void check_mirrors(const pd_report_inputs_t *in, json_t *checks)
{
    const pd_mirror_totals_t *m = &in->mirrors;
    check_t c;
    check_begin(&c);
    if (!in->mirrored) {
        check_put(&c, "nothing mirrored (no tables rules)");
    } else {
        c.pass = m->detached == 0;
        check_put(&c, "%u open, %u connecting, %u detached", m->open, m->connecting, m->detached);
    }
    check_end(&c, checks, "mirrors_connected", "no mirror connection detached");
    check_begin(&c);
    if (!in->mirrored) {
        check_put(&c, "nothing mirrored (no tables rules)");
    } else {
        c.pass = m->queued <= in->max_queued;
        check_put(&c, "%llu statements queued (at most %llu)", m->queued, in->max_queued);
    }
    check_end(&c, checks, "mirrors_caught_up", "mirrors do not trail");
}

static void check_verify(const pd_report_inputs_t *in, json_t *checks)
{
    check_t c;
    check_begin(&c);
    for (unsigned i = 0; i < in->nrules; i++) {
        const pd_report_rule_t *r = &in->rules[i];
        c.pass = c.pass && r->verified && r->verify_ok;
        if (!r->verified)
            check_put(&c, "%s: never verified", r->name);
        else
            check_put(&c, "%s: %s at %s", r->name, r->verify_ok ? "ok" : "divergence left",
                      r->verify_time ? r->verify_time : "?");
    }
    check_end(&c, checks, "verify_ok", "the last verify of every rule found no divergence left");

    check_begin(&c);
    for (unsigned i = 0; i < in->nrules; i++) {
        const pd_report_rule_t *r = &in->rules[i];
        c.pass = c.pass && r->diverged_since == 0;
        if (r->diverged_since < 0)
            check_put(&c, "%s: unknown (no divergence log)", r->name);
        else if (r->verified)
            check_put(&c, "%s: %lld since %s", r->name, r->diverged_since,
                      r->verify_time ? r->verify_time : "?");
        else
            check_put(&c, "%s: %lld (never verified)", r->name, r->diverged_since);
    }
    check_end(&c, checks, "no_divergence_since_verify",
              "no divergence recorded since the last verify");
}

json_t *pd_report_checks(const pd_report_inputs_t *in)
{
    json_t *checks = json_array();
    check_writes(in, checks);
    check_mirrors(in, checks);
    check_verify(in, checks);
    bool ok = true;
    size_t i;
    json_t *c;
    json_array_foreach(checks, i, c) ok = ok && json_is_true(json_object_get(c, "pass"));
    return json_pack("{s:b, s:o}", "ok", ok, "checks", checks);
}

/* ---------------------------------------------------------------------------------------
 * Gathering from the server
 */

/* The rules of the database: indexes into cfg->rules. */
typedef struct {
    const pd_config_t *cfg;
    unsigned *idx;
    unsigned n;
    json_t *events; /* the divergence log's events of these rules, slimmed */
} scope_t;

static bool in_scope(const scope_t *sc, const char *rule)
{
    for (unsigned i = 0; rule != NULL && i < sc->n; i++)
        if (strcmp(sc->cfg->rules[sc->idx[i]].name, rule) == 0)
            return true;
    return false;
}

static void keep_event(json_t *ev, void *ctx)
{
    scope_t *sc = ctx;
    if (!in_scope(sc, json_string_value(json_object_get(ev, "rule"))))
        return;
    /* What the report shows of an event; its statement is already normalized. */
    json_array_append_new(sc->events,
                          json_pack("{s:O?, s:O, s:O?, s:O?}", "time", json_object_get(ev, "time"),
                                    "rule", json_object_get(ev, "rule"), "kind",
                                    json_object_get(ev, "kind"), "statement",
                                    json_object_get(ev, "statement")));
}

static json_t *history_of(pd_server_t *srv, const scope_t *sc, const char *db)
{
    json_t *all = pd_state_history(srv->state), *out = json_array();
    size_t i;
    json_t *h;
    json_array_foreach(all, i, h)
    {
        const char *rule = json_string_value(json_object_get(h, "rule"));
        const char *hdb = json_string_value(json_object_get(h, "database"));
        bool event = json_is_string(json_object_get(h, "event"));
        if ((rule != NULL && in_scope(sc, rule)) || (event && hdb && strcmp(hdb, db) == 0))
            json_array_append(out, h);
    }
    json_decref(all);
    return out;
}

/* Events of the rule at or after since_ms (an event without a readable time counts). */
static long long count_since(json_t *events, const char *rule, int64_t since_ms)
{
    long long n = 0;
    size_t i;
    json_t *ev;
    json_array_foreach(events, i, ev)
    {
        const char *kind = json_string_value(json_object_get(ev, "kind"));
        if (strcmp(json_string_value(json_object_get(ev, "rule")), rule) != 0 ||
            (kind != NULL && strcmp(kind, "aa_read") == 0)) /* noise, not divergence */
            continue;
        int64_t t = pd_report_parse_time(json_string_value(json_object_get(ev, "time")));
        n += t < 0 || t >= since_ms;
    }
    return n;
}

/* One rule's entry of the report, and its evidence for the checks. */
static json_t *rule_entry(pd_server_t *srv, unsigned index, json_t *counters, json_t *events,
                          pd_report_rule_t *ev)
{
    json_t *j = pd_admin_rule_json(srv, index);
    json_t *verify = json_object_get(j, "last_verify");
    const char *name = srv->cfg->rules[index].name;
    *ev = (pd_report_rule_t){
        .name = name,
        .writes = srv->flags[index].writes,
        .verified = json_is_object(verify),
        .verify_ok = json_is_true(json_object_get(verify, "ok")),
        .verify_time = json_string_value(json_object_get(verify, "time")),
        .diverged_since = -1,
    };
    if (srv->cfg->divergence_log != NULL) {
        /* A verify's time is whole seconds: an event in its last second counts as after
           it, so that the check errs towards "not ready". Never verified: every event. */
        int64_t since = ev->verified ? pd_report_parse_time(ev->verify_time) : -1;
        ev->diverged_since = count_since(events, name, since < 0 ? INT64_MIN : since);
    }
    json_object_set(j, "counters", json_object_get(counters, name));
    json_object_set_new(j, "divergence_since_verify",
                        ev->diverged_since < 0 ? json_null() : json_integer(ev->diverged_since));
    return j;
}

/* The newest PD_REPORT_RECENT events. */
static json_t *recent_events(json_t *events)
{
    json_t *out = json_array();
    size_t n = json_array_size(events);
    for (size_t i = n > PD_REPORT_RECENT ? n - PD_REPORT_RECENT : 0; i < n; i++)
        json_array_append(out, json_array_get(events, i));
    return out;
}

json_t *pd_report_build(pd_server_t *srv, const char *db)
{
    const pd_config_t *cfg = srv->cfg;
    const pd_database_cfg_t *dbc = pd_config_database(cfg, db);
    if (dbc == NULL)
        return NULL;
    int64_t now = now_ms();
    scope_t sc = {.cfg = cfg, .idx = calloc(cfg->rule_count + 1, sizeof *sc.idx)};
    pd_report_rule_t *evidence = calloc(cfg->rule_count + 1, sizeof *evidence);
    if (sc.idx == NULL || evidence == NULL) {
        free(sc.idx);
        free(evidence);
        return NULL;
    }
    bool mirrored = false;
    for (unsigned i = 0; i < cfg->rule_count; i++) {
        if (strcmp(cfg->rules[i].database, db) != 0)
            continue;
        sc.idx[sc.n++] = i;
        mirrored = mirrored || (cfg->rules[i].kind == PD_RULE_TABLES && dbc->new != NULL);
    }
    sc.events = json_array();
    bool cut = pd_divergence_scan(cfg->divergence_log, PD_DIVERGENCE_WINDOW, keep_event, &sc);

    json_t *stats = pd_render_rule_stats(srv);
    json_t *rules = json_array();
    for (unsigned k = 0; k < sc.n; k++)
        json_array_append_new(rules, rule_entry(srv, sc.idx[k], json_object_get(stats, "rules"),
                                                sc.events, &evidence[k]));
    pd_report_inputs_t in = {.rules = evidence,
                             .nrules = sc.n,
                             .want = PD_WRITES_DUAL,
                             .mirrored = mirrored,
                             .max_queued = PD_REPORT_MAX_QUEUED};
    pd_mirror_db_totals(srv, db, &in.mirrors);
    json_t *ready = pd_report_checks(&in);

    json_t *divergence = pd_report_divergence(sc.events, now, PD_REPORT_MAX_BUCKETS);
    json_object_set_new(divergence, "logged", json_boolean(cfg->divergence_log != NULL));
    json_object_set_new(divergence, "window_cut", json_boolean(cut));
    json_object_set_new(divergence, "recent", recent_events(sc.events));

    char when[32];
    pd_report_format_time(now, when, sizeof when);
    /* switchover --watch: the watch running and the history's watch events */
    json_t *watch = json_pack("{s:o, s:o}", "active", pd_watch_list(srv, db), "events",
                              pd_watch_events(srv, db));
    json_t *report = json_pack(
        "{s:s, s:s, s:b, s:o, s:o, s:{s:i, s:i, s:i, s:I, s:s}, s:o, s:o, s:o}", "database", db,
        "generated_at", when, "has_new", dbc->new != NULL, "ready", ready, "rules", rules,
        "mirrors", "open", (int)in.mirrors.open, "connecting", (int)in.mirrors.connecting,
        "detached", (int)in.mirrors.detached, "queued", (json_int_t)in.mirrors.queued, "scope",
        "database", "divergence", divergence, "watch", watch, "history", history_of(srv, &sc, db));
    json_decref(stats);
    json_decref(sc.events);
    free(sc.idx);
    free(evidence);
    return report;
}
