/*
 * sql_facts.h — catalog facts of the tables the SQL rewriter's tests and its fuzz target
 * share (tests/unit/test_sql.c, tests/fuzz/fuzz_sql.c): the columns rules' users and
 * accounts, and the blue/green rule's people (email and name mapped on new) and tags.
 * Definitions, for one translation unit each.
 */
#ifndef PD_TESTS_SQL_FACTS_H
#define PD_TESTS_SQL_FACTS_H

#include <stddef.h>
#include <stdint.h>

#include "rules/sql.h"

static char *users_cols[] = {"id", "email", "email_address", "created_at"};
static char *users_defaults[] = {"nextval('users_id_seq'::regclass)", NULL, NULL, "now()"};
static char *accounts_cols[] = {"id", "name", "full_name", "phone", "phone_e164"};
static char *accounts_defaults[] = {NULL, NULL, NULL, "''::text", NULL};

static const pd_table_facts_t users_facts = {
    .loaded = true, .ncolumns = 4, .columns = users_cols, .defaults = users_defaults};
static const pd_table_facts_t accounts_facts = {
    .loaded = true, .ncolumns = 5, .columns = accounts_cols, .defaults = accounts_defaults};

/* The blue/green rule's tables (no table list): people maps email (lower-cased on new as
   email_address) and name (renamed full_name); tags maps nothing. */
static char *tags_cols[] = {"id", "label"};
static uint32_t tags_types[] = {23, 25};
static unsigned first_column_key[] = {0};
static const pd_table_facts_t tags_facts = {.loaded = true,
                                            .ncolumns = 2,
                                            .columns = tags_cols,
                                            .schema = "public",
                                            .name = "tags",
                                            .types = tags_types,
                                            .nkey = 1,
                                            .key = first_column_key};
static char *people_cols[] = {"id", "email", "name", "created"};
static char *people_defaults[] = {"nextval('people_id_seq'::regclass)", NULL, NULL, "now()"};
static uint32_t people_types[] = {23, 25, 25, 1184};
static const pd_table_facts_t people_facts = {.loaded = true,
                                              .ncolumns = 4,
                                              .columns = people_cols,
                                              .defaults = people_defaults,
                                              .schema = "public",
                                              .name = "people",
                                              .types = people_types,
                                              .nkey = 1,
                                              .key = first_column_key,
                                              .next = &tags_facts};

#endif /* PD_TESTS_SQL_FACTS_H */
