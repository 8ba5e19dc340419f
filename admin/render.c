/*
 * render.c — the metrics exposition (text format 0.0.4) and status counters.
 */
#include "admin/render.h"

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "admin/fleet.h"
#include "proxy/mirror.h"
#include "proxy/relay.h"
#include "proxy/seqsync.h"
#include "rules/catalog.h"
#include "rules/sql.h"

__attribute__((format(printf, 2, 3))) static void put(pd_buf_t *out, const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n > 0)
        pd_buf_put(out, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
}

static void help(pd_buf_t *out, const char *name, const char *type, const char *text)
{
    put(out, "# HELP %s %s\n# TYPE %s %s\n", name, text, name, type);
}

static void render_sessions(const pd_server_t *srv, pd_buf_t *out)
{
    help(out, "pgdual_sessions", "gauge", "Client sessions by state.");
    for (int st = 0; st < PD_SESSION_NSTATES; st++)
        put(out, "pgdual_sessions{state=\"%s\"} %u\n",
            pd_session_state_name((pd_session_state_t)st), PD_GET(srv->state_counts[st]));
    help(out, "pgdual_sessions_total", "counter", "Client sessions accepted since start.");
    put(out, "pgdual_sessions_total %llu\n", (unsigned long long)srv->total_sessions);
    help(out, "pgdual_relay_sessions", "gauge",
         "Pass-through sessions by the loop that relays them (0: the main loop).");
    for (unsigned i = 0; i < srv->nrelays; i++)
        put(out, "pgdual_relay_sessions{loop=\"%u\"} %u\n", i, srv->relays[i].assigned);
}

/* One per-rule counter of pd_rule_stats_t under a label value (NULL: no label). */
typedef struct {
    const char *value;
    size_t offset;
} rule_series_t;

#define SERIES(value, field)                                                                       \
    {                                                                                              \
        value, offsetof(pd_rule_stats_t, field)                                                    \
    }

/* A counter family with one line per rule and series: family{rule="R",label="V"} N. */
static void rule_counters(const pd_server_t *srv, pd_buf_t *out, const char *family,
                          const char *text, const char *label, const rule_series_t *series,
                          size_t n)
{
    help(out, family, "counter", text);
    for (unsigned i = 0; i < srv->cfg->rule_count; i++) {
        const char *st = (const char *)&srv->stats[i];
        for (size_t k = 0; k < n; k++) {
            unsigned long long v = *(const uint64_t *)(st + series[k].offset);
            if (label == NULL)
                put(out, "%s{rule=\"%s\"} %llu\n", family, srv->cfg->rules[i].name, v);
            else
                put(out, "%s{rule=\"%s\",%s=\"%s\"} %llu\n", family, srv->cfg->rules[i].name, label,
                    series[k].value, v);
        }
    }
}

#define RULE_COUNTERS(srv, out, family, text, label, ...)                                          \
    do {                                                                                           \
        static const rule_series_t s_[] = {__VA_ARGS__};                                           \
        rule_counters(srv, out, family, text, label, s_, sizeof s_ / sizeof s_[0]);                \
    } while (0)

static void render_rules(const pd_server_t *srv, pd_buf_t *out)
{
    const pd_config_t *cfg = srv->cfg;
    RULE_COUNTERS(srv, out, "pgdual_statements_total",
                  "Statements concerning a rule, by what pgdual did with them.", "action",
                  SERIES("passed", passed), SERIES("rewritten", rewritten),
                  SERIES("refused", refused));
    RULE_COUNTERS(srv, out, "pgdual_shadow_reads_total", "Shadow reads by outcome.", "outcome",
                  SERIES("compared", shadow_compared), SERIES("skipped", shadow_skipped));
    RULE_COUNTERS(
        srv, out, "pgdual_aa_reads_total",
        "reads=aa: reads run twice on the authoritative side, by outcome (the noise floor).",
        "outcome", SERIES("compared", aa_compared), SERIES("differed", aa_mismatched));
    pd_mirror_totals_t mt;
    pd_mirror_totals(srv, &mt);
    help(out, "pgdual_mirror_connections", "gauge",
         "Mirror connections of tables rules by state (detached: its session lives on).");
    put(out, "pgdual_mirror_connections{state=\"open\"} %u\n", mt.open);
    put(out, "pgdual_mirror_connections{state=\"connecting\"} %u\n", mt.connecting);
    put(out, "pgdual_mirror_connections{state=\"detached\"} %u\n", mt.detached);
    help(out, "pgdual_mirror_queued_statements", "gauge",
         "Statements released to mirrors and not applied yet (how far new trails).");
    put(out, "pgdual_mirror_queued_statements %llu\n", mt.queued);
    help(out, "pgdual_sequences_set_total", "counter",
         "Mirror-side sequences raised to the authoritative side's value (kept in step).");
    put(out, "pgdual_sequences_set_total %llu\n", (unsigned long long)pd_seqsync_total(srv));
    /* What switchover --watch compares: client requests and errors per database. */
    help(out, "pgdual_client_requests_total", "counter",
         "Requests answered to clients (one per ReadyForQuery), by database.");
    for (const pd_traffic_t *t = srv->traffic; t != NULL; t = t->next)
        put(out, "pgdual_client_requests_total{database=\"%s\"} %llu\n", t->database,
            (unsigned long long)PD_GET(t->requests));
    help(out, "pgdual_client_errors_total", "counter",
         "ErrorResponses sent to clients, by database.");
    for (const pd_traffic_t *t = srv->traffic; t != NULL; t = t->next)
        put(out, "pgdual_client_errors_total{database=\"%s\"} %llu\n", t->database,
            (unsigned long long)PD_GET(t->errors));
    if (srv->fleet != NULL) {
        int connected, live;
        long long version;
        pd_fleet_numbers(srv->fleet, &connected, &version, &live);
        help(out, "pgdual_state_connected", "gauge",
             "1 while the control connection to the shared state (state: postgres) is up; at 0 "
             "flags cannot change here (fail closed).");
        put(out, "pgdual_state_connected %d\n", connected);
        help(out, "pgdual_state_version", "gauge", "The version of the shared state in force.");
        put(out, "pgdual_state_version %lld\n", version);
        help(out, "pgdual_fleet_instances", "gauge",
             "Instances sharing the state with a heartbeat in the last 5 s (this one included).");
        put(out, "pgdual_fleet_instances %d\n", live);
    }
    RULE_COUNTERS(srv, out, "pgdual_mirrored_statements_total",
                  "Statements replayed on a tables rule's mirror.", NULL, SERIES(NULL, mirrored));
    RULE_COUNTERS(srv, out, "pgdual_divergence_total", "Divergence events by rule and kind.",
                  "kind", SERIES("shadow_read", shadow_mismatched),
                  SERIES("mirror_outcome", mirror_diverged),
                  SERIES("mirror_unapplied", mirror_unapplied));
    RULE_COUNTERS(srv, out, "pgdual_mirror_proxy_errors_total",
                  "Errors pgdual itself caused on a mirror (a bug: report it).", NULL,
                  SERIES(NULL, mirror_proxy_errors));
    help(out, "pgdual_rule_flags", "gauge", "The flags in force (value 1).");
    for (unsigned i = 0; i < cfg->rule_count; i++) {
        char reads[32];
        put(out, "pgdual_rule_flags{rule=\"%s\",writes=\"%s\",reads=\"%s\"} 1\n",
            cfg->rules[i].name, pd_writes_name(srv->flags[i].writes),
            pd_reads_format(&srv->flags[i].reads, reads, sizeof reads));
    }
    help(out, "pgdual_rule_error", "gauge",
         "1 when the rule's catalog check failed (statements it would rewrite are refused).");
    for (unsigned i = 0; i < cfg->rule_count; i++)
        put(out, "pgdual_rule_error{rule=\"%s\"} %d\n", cfg->rules[i].name,
            srv->facts != NULL && srv->facts[i].error != NULL);
}

static void render_cache(const pd_server_t *srv, pd_buf_t *out)
{
    pd_sql_stats_t st = {0};
    if (srv->sql != NULL)
        pd_sql_stats(srv->sql, &st);
    help(out, "pgdual_rewrite_cache_hits_total", "counter", "Rewrite cache hits.");
    put(out, "pgdual_rewrite_cache_hits_total %llu\n", (unsigned long long)st.hits);
    help(out, "pgdual_rewrite_cache_misses_total", "counter", "Rewrite cache misses.");
    put(out, "pgdual_rewrite_cache_misses_total %llu\n", (unsigned long long)st.misses);
    help(out, "pgdual_rewrite_template_hits_total", "counter",
         "Exact-text misses answered from a literal template, without parsing.");
    put(out, "pgdual_rewrite_template_hits_total %llu\n", (unsigned long long)st.template_hits);
    help(out, "pgdual_rewrite_template_misses_total", "counter",
         "Literal templates rewritten (a template-cache miss).");
    put(out, "pgdual_rewrite_template_misses_total %llu\n", (unsigned long long)st.template_misses);
    help(out, "pgdual_rewrite_template_unusable_total", "counter",
         "Statements rewritten by exact text because their literal template cannot stand for "
         "them.");
    put(out, "pgdual_rewrite_template_unusable_total %llu\n",
        (unsigned long long)st.template_unusable);
    help(out, "pgdual_rewrite_cache_entries", "gauge", "Rewrite cache entries.");
    put(out, "pgdual_rewrite_cache_entries %llu\n", (unsigned long long)st.entries);
    help(out, "pgdual_statements_parsed_total", "counter", "Statements parsed with libpg_query.");
    put(out, "pgdual_statements_parsed_total %llu\n", (unsigned long long)st.parsed);
    help(out, "pgdual_statements_unparsed_total", "counter",
         "Statements passed without parsing (no rule table named in them).");
    put(out, "pgdual_statements_unparsed_total %llu\n", (unsigned long long)st.skipped_unparsed);
}

void pd_render_metrics(void *ctx, pd_buf_t *out)
{
    const pd_server_t *srv = ctx;
    help(out, "pgdual_up", "gauge", "1 while pgdual runs.");
    put(out, "pgdual_up 1\n");
    render_sessions(srv, out);
    render_rules(srv, out);
    render_cache(srv, out);
}

json_t *pd_render_rule_stats(const pd_server_t *srv)
{
    json_t *rules = json_object();
    for (unsigned i = 0; i < srv->cfg->rule_count; i++) {
        const pd_rule_stats_t *st = &srv->stats[i];
        json_object_set_new(
            rules, srv->cfg->rules[i].name,
            json_pack("{s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I}", "passed",
                      (json_int_t)st->passed, "rewritten", (json_int_t)st->rewritten, "refused",
                      (json_int_t)st->refused, "shadow_compared", (json_int_t)st->shadow_compared,
                      "shadow_mismatched", (json_int_t)st->shadow_mismatched, "shadow_skipped",
                      (json_int_t)st->shadow_skipped, "aa_compared", (json_int_t)st->aa_compared,
                      "aa_mismatched", (json_int_t)st->aa_mismatched, "mirrored",
                      (json_int_t)st->mirrored, "mirror_diverged", (json_int_t)st->mirror_diverged,
                      "mirror_unapplied", (json_int_t)st->mirror_unapplied, "mirror_proxy_errors",
                      (json_int_t)st->mirror_proxy_errors));
    }
    pd_sql_stats_t cs = {0};
    if (srv->sql != NULL)
        pd_sql_stats(srv->sql, &cs);
    return json_pack("{s:o, s:{s:I, s:I, s:I, s:I, s:I, s:I}}", "rules", rules, "rewrite_cache",
                     "hits", (json_int_t)cs.hits, "misses", (json_int_t)cs.misses, "template_hits",
                     (json_int_t)cs.template_hits, "template_misses",
                     (json_int_t)cs.template_misses, "template_unusable",
                     (json_int_t)cs.template_unusable, "entries", (json_int_t)cs.entries);
}
