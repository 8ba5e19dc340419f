/*
 * route.c — views, routing of statements through the rewriter, refusal statements.
 */
#include "proxy/route.h"

#include <stdio.h>
#include <string.h>

#include "rules/catalog.h"

bool pd_route_db_has_rules(const pd_config_t *cfg, const char *db)
{
    for (unsigned i = 0; i < cfg->rule_count; i++)
        if (strcmp(cfg->rules[i].database, db) == 0)
            return true;
    return false;
}

/* splitmix64's finalizer: a good spread of the session key over the buckets. */
static uint64_t mix(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

unsigned pd_route_bucket(uint64_t session_key, const char *rule)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a of the rule name */
    for (const char *p = rule; *p; p++)
        h = (h ^ (uint8_t)*p) * 1099511628211ull;
    return (unsigned)(mix(session_key ^ h) % 100);
}

void pd_route_views(const pd_server_t *srv, uint64_t session_key, pd_rule_view_t *views)
{
    for (unsigned i = 0; i < srv->cfg->rule_count; i++) {
        const pd_rule_flags_t *f = &srv->flags[i];
        views[i].writes = f->writes;
        views[i].reads = f->reads.mode;
        if (f->reads.mode == PD_READS_NEW && f->reads.percent < 100 &&
            pd_route_bucket(session_key, srv->cfg->rules[i].name) >= f->reads.percent)
            views[i].reads = PD_READS_OLD;
    }
}

/* A refusal built here (not by the rewriter) for a rule whose catalog check failed. */
static pd_sql_result_t *facts_refusal(pd_sql_result_t *r, const pd_rule_facts_t *facts)
{
    const char *error = facts->error;
    const char *hint = facts->unreachable
                           ? "pgdual checks the database again every few seconds and serves "
                             "the rule once the check passes; pgdualctl reload checks at once."
                           : "Fix the table or the rule, then run pgdualctl reload.";
    pd_sql_result_t *f = calloc(1, sizeof *f);
    if (f == NULL)
        return r;
    f->refs = 1;
    f->action = PD_SQL_REFUSE;
    f->rule = r->rule;
    f->mirror_rule = -1;
    f->is_write = r->is_write;
    f->sqlstate = "55000"; /* object_not_in_prerequisite_state */
    f->message = strdup(error);
    f->hint = strdup(hint);
    pd_sql_result_release(r);
    if (f->message == NULL || f->hint == NULL) {
        pd_sql_result_release(f);
        return NULL;
    }
    return f;
}

/* Whether some rule of the database asks for any work (flags other than old/old). */
static bool db_rules_busy(const pd_server_t *srv, const char *database)
{
    for (unsigned i = 0; i < srv->cfg->rule_count; i++)
        if (strcmp(srv->cfg->rules[i].database, database) == 0 &&
            (srv->flags[i].writes != PD_WRITES_OLD || srv->flags[i].reads.mode != PD_READS_OLD))
            return true;
    return false;
}

pd_sql_result_t *pd_route_statement(pd_server_t *srv, const char *database, uint64_t session_key,
                                    const char *sql)
{
    /* Rules all at old/old change nothing: no parsing at all. */
    if (!db_rules_busy(srv, database)) {
        srv->pass_result->refs++;
        return srv->pass_result;
    }
    unsigned n = srv->cfg->rule_count;
    pd_rule_view_t views[n + 1];
    pd_route_views(srv, session_key, views);
    pd_sql_result_t *r = pd_sql_rewrite(srv->sql, database, sql, views);
    if (r == NULL)
        return NULL;
    if (r->rule >= 0 && (unsigned)r->rule < n) {
        if (srv->facts[r->rule].error != NULL && r->action == PD_SQL_REWRITE) {
            r = facts_refusal(r, &srv->facts[r->rule]);
            if (r == NULL)
                return NULL;
        }
        pd_rule_stats_t *st = &srv->stats[r->rule];
        if (r->action == PD_SQL_PASS)
            st->passed++;
        else if (r->action == PD_SQL_REWRITE)
            st->rewritten++;
        else
            st->refused++;
    }
    return r;
}

/* Appends text as the body of a standard SQL string literal (quotes doubled). */
static void put_literal(pd_buf_t *out, const char *text)
{
    pd_buf_put_u8(out, '\'');
    for (const char *p = text ? text : ""; *p; p++) {
        if (*p == '\'')
            pd_buf_put_u8(out, '\'');
        pd_buf_put_u8(out, (uint8_t)*p);
    }
    pd_buf_put_u8(out, '\'');
}

void pd_route_refusal_sql(pd_buf_t *out, const char *sqlstate, const char *message,
                          const char *hint)
{
    /* The body is a standard string literal, not dollar quoting, so that no message text
     * can close the quote early; standard_conforming_strings is on since PostgreSQL 9.1
     * and E'' is not used, so backslashes are plain characters. */
    static const char head[] = "DO ";
    pd_buf_put(out, head, sizeof head - 1);
    pd_buf_t body;
    pd_buf_init(&body);
    static const char begin[] = "BEGIN RAISE EXCEPTION USING ERRCODE = ";
    pd_buf_put(&body, begin, sizeof begin - 1);
    put_literal(&body, sqlstate);
    pd_buf_put(&body, ", MESSAGE = ", 12);
    put_literal(&body, message);
    if (hint != NULL) {
        pd_buf_put(&body, ", HINT = ", 9);
        put_literal(&body, hint);
    }
    pd_buf_put(&body, "; END", 5);
    pd_buf_put_u8(&body, 0);
    if (pd_buf_ok(&body))
        put_literal(out, (const char *)body.data);
    pd_buf_free(&body);
    pd_buf_put_u8(out, 0);
}
