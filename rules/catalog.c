/*
 * catalog.c — reads pg_attribute/pg_attrdef for each rule's tables on the old side of its
 * database: the `columns` rule's table, or every table a `tables` rule moves (with column
 * types, identity/generated columns and the key, which mirroring needs).
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

/* A tables rule's table: columns with type, default, identity/generated, and whether the
   column is in the primary key (its position there, from 1: int2vector's bounds start at
   0). */
static const char TABLE_SQL[] =
    "SELECT n.nspname, c.relname, a.attname, a.atttypid, "
    "pg_catalog.pg_get_expr(d.adbin, d.adrelid), "
    "CASE WHEN a.attidentity <> '' THEN a.attidentity::text "
    "WHEN a.attgenerated <> '' THEN a.attgenerated::text END, "
    "pg_catalog.array_position(i.indkey::int2[], a.attnum) + 1 "
    "- pg_catalog.array_lower(i.indkey::int2[], 1) "
    "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
    "JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid "
    "LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
    "LEFT JOIN pg_catalog.pg_index i ON i.indrelid = c.oid AND i.indisprimary "
    "WHERE c.oid = pg_catalog.to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped "
    "ORDER BY a.attnum";

/* Every ordinary table a `tables` rule without a list moves. */
static const char ALL_TABLES_SQL[] =
    "SELECT pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.relname) "
    "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition "
    "AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgdual') "
    "AND n.nspname NOT LIKE 'pg\\_%' ORDER BY 1";

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

static int column_index(const pd_table_facts_t *t, const char *name)
{
    for (unsigned i = 0; i < t->ncolumns; i++)
        if (strcmp(t->columns[i], name) == 0)
            return (int)i;
    return -1;
}

/* The key: the rule's `key` columns where the table has them all, else its primary key. */
static void choose_key(const pd_rule_cfg_t *rule, pd_table_facts_t *t, const int *pk_pos)
{
    unsigned n = 0;
    for (unsigned i = 0; i < rule->key_count; i++)
        if (column_index(t, rule->key[i]) >= 0)
            n++;
    if (rule->key_count > 0 && n == rule->key_count) {
        for (unsigned i = 0; i < rule->key_count; i++)
            t->key[t->nkey++] = (unsigned)column_index(t, rule->key[i]);
        return;
    }
    for (int pos = 1; pos <= (int)t->ncolumns; pos++)
        for (unsigned i = 0; i < t->ncolumns; i++)
            if (pk_pos[i] == pos)
                t->key[t->nkey++] = i;
}

static bool load_one_table(PGconn *conn, const pd_rule_cfg_t *rule, const char *table,
                           pd_table_facts_t *t, pd_rule_facts_t *f)
{
    const char *params[1] = {table};
    PGresult *res = PQexecParams(conn, TABLE_SQL, 1, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) == 0) {
        if (PQresultStatus(res) != PGRES_TUPLES_OK)
            set_error(f, "rule \"%s\": could not read the catalog: %s", rule->name,
                      PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY));
        else
            set_error(f,
                      "rule \"%s\": table %s does not exist in database \"%s\"; create it on "
                      "both sides (old and new) and reload",
                      rule->name, table, rule->database);
        PQclear(res);
        return false;
    }
    unsigned n = (unsigned)PQntuples(res);
    t->columns = calloc(n, sizeof *t->columns);
    t->defaults = calloc(n, sizeof *t->defaults);
    t->types = calloc(n, sizeof *t->types);
    t->generated = calloc(n, 1);
    t->key = calloc(n, sizeof *t->key);
    int *pk_pos = calloc(n, sizeof *pk_pos);
    t->schema = strdup(PQgetvalue(res, 0, 0));
    t->name = strdup(PQgetvalue(res, 0, 1));
    bool ok = t->columns != NULL && t->defaults != NULL && t->types != NULL &&
              t->generated != NULL && t->key != NULL && pk_pos != NULL && t->schema != NULL &&
              t->name != NULL;
    for (unsigned i = 0; ok && i < n; i++) {
        t->columns[i] = strdup(PQgetvalue(res, (int)i, 2));
        t->types[i] = (uint32_t)strtoul(PQgetvalue(res, (int)i, 3), NULL, 10);
        if (!PQgetisnull(res, (int)i, 4))
            t->defaults[i] = strdup(PQgetvalue(res, (int)i, 4));
        if (!PQgetisnull(res, (int)i, 5))
            t->generated[i] = PQgetvalue(res, (int)i, 5)[0];
        pk_pos[i] = PQgetisnull(res, (int)i, 6) ? 0 : atoi(PQgetvalue(res, (int)i, 6));
        t->ncolumns++;
        ok = t->columns[i] != NULL && (PQgetisnull(res, (int)i, 4) || t->defaults[i] != NULL);
    }
    PQclear(res);
    if (ok)
        choose_key(rule, t, pk_pos);
    free(pk_pos);
    if (!ok)
        set_error(f, "out of memory");
    t->loaded = ok;
    return ok;
}

/* Every table of a `tables` rule, chained from f->table through `next`. */
static void load_tables(PGconn *conn, const pd_rule_cfg_t *rule, pd_rule_facts_t *f)
{
    PGresult *all = NULL;
    unsigned n = rule->table_count;
    if (n == 0) {
        all = PQexec(conn, ALL_TABLES_SQL);
        if (PQresultStatus(all) != PGRES_TUPLES_OK) {
            set_error(f, "rule \"%s\": could not list the tables: %s", rule->name,
                      PQresultErrorField(all, PG_DIAG_MESSAGE_PRIMARY));
            PQclear(all);
            return;
        }
        n = (unsigned)PQntuples(all);
    }
    f->more = n > 1 ? calloc(n - 1, sizeof *f->more) : NULL;
    if (n > 1 && f->more == NULL) {
        set_error(f, "out of memory");
        PQclear(all);
        return;
    }
    for (unsigned i = 0; i < n; i++) {
        pd_table_facts_t *t = i == 0 ? &f->table : &f->more[i - 1];
        const char *name = all != NULL ? PQgetvalue(all, (int)i, 0) : rule->tables[i];
        if (i > 0) {
            f->nmore++;
            (i == 1 ? &f->table : &f->more[i - 2])->next = t;
        }
        if (!load_one_table(conn, rule, name, t, f))
            break;
    }
    PQclear(all);
}

/* Parameters before dbname are defaults the conninfo may override. */
static PGconn *connect_old(const char *conninfo, unsigned connect_timeout_s)
{
    char timeout[16];
    snprintf(timeout, sizeof timeout, "%u", connect_timeout_s);
    const char *keys[] = {"connect_timeout", "fallback_application_name", "dbname", NULL};
    const char *vals[] = {connect_timeout_s > 0 ? timeout : NULL, "pgdual catalog", conninfo, NULL};
    return PQconnectdbParams(keys, vals, 1);
}

void pd_catalog_load_rule(const pd_config_t *cfg, unsigned i, pd_rule_facts_t *out,
                          unsigned connect_timeout_s)
{
    *out = (pd_rule_facts_t){0};
    const pd_rule_cfg_t *rule = &cfg->rules[i];
    const pd_database_cfg_t *db = pd_config_database(cfg, rule->database);
    if (db == NULL)
        return; /* the config loader already refused this */
    /* One short connection per rule: rules are few and this runs at start/reload. */
    PGconn *conn = connect_old(db->old, connect_timeout_s);
    if (PQstatus(conn) != CONNECTION_OK) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s", conn != NULL ? PQerrorMessage(conn) : "out of memory");
        msg[strcspn(msg, "\n")] = '\0';
        set_error(out,
                  "rule \"%s\": could not connect to database \"%s\" to check its table: "
                  "%s",
                  rule->name, rule->database, msg);
        out->unreachable = true;
    } else if (rule->kind == PD_RULE_COLUMNS) {
        load_table(conn, rule, out);
    } else {
        load_tables(conn, rule, out);
    }
    /* A connection lost half-way is the same kind of trouble as one not made. */
    if (out->error != NULL && PQstatus(conn) != CONNECTION_OK)
        out->unreachable = true;
    PQfinish(conn);
}

pd_rule_facts_t *pd_catalog_load(const pd_config_t *cfg)
{
    pd_rule_facts_t *facts = calloc(cfg->rule_count + 1, sizeof *facts);
    if (facts == NULL)
        return NULL;
    for (unsigned i = 0; i < cfg->rule_count; i++)
        pd_catalog_load_rule(cfg, i, &facts[i], 0);
    return facts;
}

static void table_free(pd_table_facts_t *t)
{
    for (unsigned j = 0; j < t->ncolumns; j++) {
        free(t->columns[j]);
        free(t->defaults[j]);
    }
    free(t->columns);
    free(t->defaults);
    free(t->schema);
    free(t->name);
    free(t->types);
    free(t->generated);
    free(t->key);
}

void pd_catalog_free(pd_rule_facts_t *facts, unsigned n)
{
    if (facts == NULL)
        return;
    for (unsigned i = 0; i < n; i++) {
        table_free(&facts[i].table);
        for (unsigned j = 0; j < facts[i].nmore; j++)
            table_free(&facts[i].more[j]);
        free(facts[i].more);
        free(facts[i].error);
    }
    free(facts);
}
