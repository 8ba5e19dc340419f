/*
 * catalog.c — reads pg_attribute/pg_attrdef for each `columns` rule's table on the old
 * side of its database (for `tables` rules, on both sides: issue 4).
 */
#include "rules/catalog.h"

#include <libpq-fe.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char COLUMNS_SQL[] =
    "SELECT a.attname, pg_catalog.pg_get_expr(d.adbin, d.adrelid) "
    "FROM pg_catalog.pg_attribute a "
    "LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
    "WHERE a.attrelid = pg_catalog.to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped "
    "ORDER BY a.attnum";

__attribute__((format(printf, 2, 3))) static void set_error(pd_rule_facts_t *f, const char *fmt,
                                                            ...)
{
    if (f->error != NULL)
        return; /* the first reason is the one to fix first */
    va_list ap;
    va_start(ap, fmt);
    if (vasprintf(&f->error, fmt, ap) < 0)
        f->error = NULL;
    va_end(ap);
}

static bool has_column(const pd_table_facts_t *t, const char *name)
{
    for (unsigned i = 0; i < t->ncolumns; i++)
        if (strcmp(t->columns[i], name) == 0)
            return true;
    return false;
}

static void load_table(PGconn *conn, const pd_rule_cfg_t *rule, pd_rule_facts_t *f)
{
    const char *params[1] = {rule->table};
    PGresult *res = PQexecParams(conn, COLUMNS_SQL, 1, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        set_error(f, "rule \"%s\": could not read the catalog: %s", rule->name,
                  PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY));
        PQclear(res);
        return;
    }
    int n = PQntuples(res);
    if (n == 0) {
        set_error(f, "rule \"%s\": table %s does not exist in database \"%s\"", rule->name,
                  rule->table, rule->database);
        PQclear(res);
        return;
    }
    pd_table_facts_t *t = &f->table;
    t->columns = calloc((size_t)n, sizeof *t->columns);
    t->defaults = calloc((size_t)n, sizeof *t->defaults);
    if (t->columns == NULL || t->defaults == NULL) {
        set_error(f, "out of memory");
        PQclear(res);
        return;
    }
    for (int i = 0; i < n; i++) {
        t->columns[i] = strdup(PQgetvalue(res, i, 0));
        t->defaults[i] = PQgetisnull(res, i, 1) ? NULL : strdup(PQgetvalue(res, i, 1));
        t->ncolumns++;
    }
    PQclear(res);
    for (unsigned i = 0; i < rule->column_count; i++) {
        const pd_column_map_t *c = &rule->columns[i];
        const char *missing = !has_column(t, c->old)   ? c->old
                              : !has_column(t, c->new) ? c->new
                                                       : NULL;
        if (missing != NULL)
            set_error(f,
                      "rule \"%s\": column \"%s\" of table %s does not exist; add it (ALTER "
                      "TABLE %s ADD COLUMN ...) and reload",
                      rule->name, missing, rule->table, rule->table);
    }
    for (unsigned i = 0; i < rule->key_count; i++)
        if (!has_column(t, rule->key[i]))
            set_error(f, "rule \"%s\": key column \"%s\" of table %s does not exist", rule->name,
                      rule->key[i], rule->table);
    t->loaded = f->error == NULL;
}

pd_rule_facts_t *pd_catalog_load(const pd_config_t *cfg)
{
    pd_rule_facts_t *facts = calloc(cfg->rule_count + 1, sizeof *facts);
    if (facts == NULL)
        return NULL;
    for (unsigned i = 0; i < cfg->rule_count; i++) {
        const pd_rule_cfg_t *rule = &cfg->rules[i];
        if (rule->kind != PD_RULE_COLUMNS)
            continue;
        const pd_database_cfg_t *db = pd_config_database(cfg, rule->database);
        if (db == NULL)
            continue; /* the config loader already refused this */
        /* One short connection per rule: rules are few and this runs at start/reload. */
        PGconn *conn = PQconnectdb(db->old);
        if (PQstatus(conn) != CONNECTION_OK) {
            char msg[512];
            snprintf(msg, sizeof msg, "%s", PQerrorMessage(conn));
            msg[strcspn(msg, "\n")] = '\0';
            set_error(&facts[i],
                      "rule \"%s\": could not connect to database \"%s\" to check its table: "
                      "%s",
                      rule->name, rule->database, msg);
        } else {
            load_table(conn, rule, &facts[i]);
        }
        PQfinish(conn);
    }
    return facts;
}

void pd_catalog_free(pd_rule_facts_t *facts, unsigned n)
{
    if (facts == NULL)
        return;
    for (unsigned i = 0; i < n; i++) {
        pd_table_facts_t *t = &facts[i].table;
        for (unsigned j = 0; j < t->ncolumns; j++) {
            free(t->columns[j]);
            free(t->defaults[j]);
        }
        free(t->columns);
        free(t->defaults);
        free(facts[i].error);
    }
    free(facts);
}
