/*
 * fuzz_sql.c — libFuzzer target for the SQL rewriter: any text, under several views of
 * two column rules (with and without catalog facts, cache on) and of a tables rule that
 * maps columns (translated for new while new is authoritative), gives a result that is
 * consistent with its action and can be released; normalizing it never leaves a quote;
 * where the plain-text path finds a template's literals, PostgreSQL's lexer finds the same.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "rules/config.h"
#include "rules/sql.h"
#include "rules/sql_internal.h"
#include "tests/sql_facts.h"

static const char config_yaml[] =
    "databases:\n"
    "  - { name: app, old: \"dbname=app\" }\n"
    "  - { name: bg, old: \"dbname=bg\", new: \"dbname=bg2\" }\n"
    "rules:\n"
    "  - name: users-email\n"
    "    database: app\n"
    "    kind: columns\n"
    "    table: public.users\n"
    "    key: [id]\n"
    "    columns:\n"
    "      - { old: email, new: email_address, up: \"lower(email)\", down: \"email_address\" }\n"
    "  - name: accounts-name\n"
    "    database: app\n"
    "    kind: columns\n"
    "    table: accounts\n"
    "    key: [id]\n"
    "    columns:\n"
    "      - { old: name, new: full_name, up: \"trim(name)\", down: \"full_name\" }\n"
    "      - { old: phone, new: phone_e164 }\n"
    "  - name: bg-people\n"
    "    database: bg\n"
    "    kind: tables\n"
    "    columns:\n"
    "      - { old: email, new: email_address, up: \"lower(email)\", down: \"email_address\" }\n"
    "      - { old: name, new: full_name }\n";

/* Every input runs under each of these (writes, reads) pairs, for every rule: in database
   app (the column rules) and in database bg (the tables rule). */
static const pd_rule_view_t views[][3] = {
    {{PD_WRITES_DUAL, PD_READS_OLD},
     {PD_WRITES_DUAL, PD_READS_OLD},
     {PD_WRITES_DUAL_NEW, PD_READS_NEW}},
    {{PD_WRITES_OLD, PD_READS_NEW},
     {PD_WRITES_DUAL_NEW, PD_READS_NEW},
     {PD_WRITES_DUAL, PD_READS_SHADOW}},
    {{PD_WRITES_DUAL_NEW, PD_READS_SHADOW},
     {PD_WRITES_OLD, PD_READS_NEW},
     {PD_WRITES_NEW, PD_READS_NEW}},
    {{PD_WRITES_NEW, PD_READS_OLD},
     {PD_WRITES_OLD, PD_READS_OLD},
     {PD_WRITES_DUAL_NEW, PD_READS_SHADOW}},
    {{PD_WRITES_OLD, PD_READS_AA}, {PD_WRITES_OLD, PD_READS_AA}, {PD_WRITES_OLD, PD_READS_AA}},
};

static pd_config_t *cfg;
static pd_sql_t *with_facts, *without_facts;

static void setup(void)
{
    pd_config_errors_t errs = {0};
    cfg = pd_config_load_string(config_yaml, sizeof config_yaml - 1, "fuzz.yaml", &errs);
    pd_config_errors_free(&errs);
    if (cfg == NULL)
        abort();
    const pd_table_facts_t *facts[3] = {&users_facts, &accounts_facts, &people_facts};
    with_facts = pd_sql_new(cfg, facts, 64);
    without_facts = pd_sql_new(cfg, NULL, 0);
    if (with_facts == NULL || without_facts == NULL)
        abort();
}

static void check(const pd_sql_result_t *r)
{
    if (r == NULL)
        abort();
    switch (r->action) {
    case PD_SQL_PASS:
        break;
    case PD_SQL_REWRITE:
        if (r->sql == NULL)
            abort();
        break;
    case PD_SQL_REFUSE:
        if (r->sqlstate == NULL || strlen(r->sqlstate) != 5 || r->message == NULL ||
            r->hint == NULL)
            abort();
        break;
    default:
        abort();
    }
    if (r->rule < -1 || r->rule >= (int)cfg->rule_count)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (cfg == NULL)
        setup();
    char *sql = malloc(size + 1);
    if (sql == NULL)
        return 0;
    memcpy(sql, data, size);
    sql[size] = '\0';
    for (size_t i = 0; i < sizeof views / sizeof *views; i++) {
        pd_sql_t *rw = i % 2 == 0 ? with_facts : without_facts;
        pd_sql_result_t *r = pd_sql_rewrite(rw, "app", sql, views[i]);
        check(r);
        pd_sql_result_release(r);
        r = pd_sql_rewrite(rw, "bg", sql, views[i]);
        check(r);
        pd_sql_result_release(r);
    }
    pd__lits_t fast, full;
    if (pd__lits_take_plain(sql, &fast) == PD__LITS_OK) {
        if (pd__lits_take(sql, &full) != PD__LITS_OK || fast.n != full.n ||
            strcmp(fast.kinds, full.kinds) != 0 || fast.tmpl.len != full.tmpl.len ||
            memcmp(fast.tmpl.buf, full.tmpl.buf, full.tmpl.len) != 0 ||
            memcmp(fast.start, full.start, full.n * sizeof *full.start) != 0 ||
            memcmp(fast.end, full.end, full.n * sizeof *full.end) != 0)
            abort();
        pd__lits_free(&full);
        pd__lits_free(&fast);
    }
    char *norm = pd_sql_normalize(sql);
    if (norm == NULL)
        abort();
    free(norm);
    free(sql);
    return 0;
}
