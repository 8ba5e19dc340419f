/*
 * catalog.h — facts about the rules' tables read from the live catalog through libpq:
 * that the table and the rule's old and new columns exist, every column in order and
 * its default; for `tables` rules also every table's column types, identity/generated
 * columns and key. Blocking: call it at start (before serving) or from a worker thread.
 */
#ifndef PD_RULES_CATALOG_H
#define PD_RULES_CATALOG_H

#include "rules/config.h"
#include "rules/sql.h"

/* Facts of one rule; `error` says why the rule cannot be served (malloc'd) or is NULL.
   A `tables` rule's first table is `table`, the others are in `more`, chained by `next`.
   `unreachable`: the error is that the database could not be reached (connecting failed,
   or the connection broke during the check), so the same check may pass later; a missing
   table or column is not. */
typedef struct pd_rule_facts {
    pd_table_facts_t table;
    pd_table_facts_t *more;
    unsigned nmore;
    char *error;
    bool unreachable;
} pd_rule_facts_t;

/*
 * Loads facts for every rule of cfg (an array of cfg->rule_count). A rule whose table or
 * columns are missing, or whose database cannot be reached, gets `error` set; the others
 * are loaded. Never NULL except out of memory.
 */
pd_rule_facts_t *pd_catalog_load(const pd_config_t *cfg);

/* The same for cfg->rules[rule] only, into *out (zeroed first), giving up connecting after
   connect_timeout_s seconds (0: libpq's default, or the conninfo's). */
void pd_catalog_load_rule(const pd_config_t *cfg, unsigned rule, pd_rule_facts_t *out,
                          unsigned connect_timeout_s);

void pd_catalog_free(pd_rule_facts_t *facts, unsigned n);

#endif /* PD_RULES_CATALOG_H */
