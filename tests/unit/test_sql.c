/*
 * test_sql.c — the SQL rewriter (rules/sql.c and its parts): the corpus in
 * tests/unit/sql_corpus (every statement with its exact expected rewrite per flag setting),
 * the result cache (hits, misses, skips, LRU eviction, shared results), refusal messages,
 * statements that do not parse, rules without catalog facts, and pd_sql_normalize.
 *
 * Corpus format (one file per theme, cases separated by `### name` lines):
 *
 *     ### name
 *     -- views: writes=dual reads=old        (every rule; default writes=old reads=old)
 *     -- view accounts-name: writes=old reads=new   (optional, per rule)
 *     -- db: app                             (optional; default app)
 *     <input sql, one or more lines>
 *     --> PASS | REFUSE <sqlstate> | <exact expected output, one or more lines>
 *     --> shadow: <expected shadow_sql>      (optional; absent means none)
 *     --> flags: write ordered rule=NAME mirror=KIND   (optional; checks is_write,
 *                                            ordered, rule and the mirror plan)
 *     --> image: <expected image_sql>        (absent means none)
 *
 * Lines starting with "# " are comments. After the first expectation, further `-- views:`
 * or `-- view` lines followed by `-->` run the same input again under other flags.
 * PD_SQL_CORPUS_DUMP=1 prints what the rewriter gives for every case in the same format
 * (to review before freezing).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rules/config.h"
#include "rules/sql.h"

/* ---------------------------------------------------------------------------------------
 * The test configuration: two column rules in database app and a tables rule in shop.
 */
static const char *config_yaml =
    "databases:\n"
    "  - { name: app, old: \"host=localhost dbname=app\" }\n"
    "  - { name: shop, old: \"host=localhost dbname=shop\", new: \"host=localhost "
    "dbname=shop2\" }\n"
    "rules:\n"
    "  - name: users-email\n"
    "    database: app\n"
    "    kind: columns\n"
    "    table: public.users\n"
    "    key: [id]\n"
    "    columns:\n"
    "      - { old: email, new: email_address, up: \"lower(email)\", down: \"email_address\" }\n"
    "    writes: old\n"
    "    reads: old\n"
    "  - name: accounts-name\n"
    "    database: app\n"
    "    kind: columns\n"
    "    table: accounts\n"
    "    key: [id]\n"
    "    columns:\n"
    "      - { old: name, new: full_name, up: \"trim(name)\", down: \"full_name\" }\n"
    "      - { old: phone, new: phone_e164 }\n"
    "    writes: old\n"
    "    reads: old\n"
    "  - name: orders-to-green\n"
    "    database: shop\n"
    "    kind: tables\n"
    "    tables: [public.orders]\n"
    "    writes: dual\n"
    "    reads: old\n";

enum { R_USERS, R_ACCOUNTS, R_ORDERS, NRULES };

static char *users_cols[] = {"id", "email", "email_address", "created_at"};
static char *users_defaults[] = {"nextval('users_id_seq'::regclass)", NULL, NULL, "now()"};
static char *accounts_cols[] = {"id", "name", "full_name", "phone", "phone_e164"};
static char *accounts_defaults[] = {NULL, NULL, NULL, "''::text", NULL};

static const pd_table_facts_t users_facts = {
    .loaded = true, .ncolumns = 4, .columns = users_cols, .defaults = users_defaults};
static const pd_table_facts_t accounts_facts = {
    .loaded = true, .ncolumns = 5, .columns = accounts_cols, .defaults = accounts_defaults};

/* The tables rule's table: a serial key, a plain column, a now() default, a generated one. */
static char *orders_cols[] = {"id", "total", "created_at", "note", "total_cents"};
static char *orders_defaults[] = {"nextval('orders_id_seq'::regclass)", NULL, "now()", "'none'::text",
                                  NULL};
static uint32_t orders_types[] = {23, 1700, 1184, 25, 20};
static char orders_generated[] = {0, 0, 0, 0, 's'};
static unsigned orders_key[] = {0};
static const pd_table_facts_t orders_facts = {.loaded = true,
                                              .ncolumns = 5,
                                              .columns = orders_cols,
                                              .defaults = orders_defaults,
                                              .schema = "public",
                                              .name = "orders",
                                              .types = orders_types,
                                              .generated = orders_generated,
                                              .nkey = 1,
                                              .key = orders_key};

static pd_config_t *load_config(void)
{
    pd_config_errors_t errs = {0};
    pd_config_t *cfg = pd_config_load_string(config_yaml, strlen(config_yaml), "test.yaml", &errs);
    for (size_t i = 0; i < errs.count; i++)
        print_error("config: %s\n", errs.msgs[i]);
    pd_config_errors_free(&errs);
    assert_non_null(cfg);
    assert_int_equal(cfg->rule_count, NRULES);
    return cfg;
}

static pd_sql_t *new_rewriter(const pd_config_t *cfg, bool with_facts, size_t cache)
{
    const pd_table_facts_t *facts[NRULES] = {NULL, NULL, NULL};
    if (with_facts) {
        facts[R_USERS] = &users_facts;
        facts[R_ACCOUNTS] = &accounts_facts;
        facts[R_ORDERS] = &orders_facts;
    }
    pd_sql_t *rw = pd_sql_new(cfg, facts, cache);
    assert_non_null(rw);
    return rw;
}

static void set_views(pd_rule_view_t *v, pd_writes_t w, pd_reads_mode_t r)
{
    for (int i = 0; i < NRULES; i++)
        v[i] = (pd_rule_view_t){w, r};
}

static char *source_path(const char *rel)
{
    const char *root = getenv("PD_SOURCE_DIR");
    char *out = NULL;
    assert_non_null(root); /* set by tests/CMakeLists.txt */
    assert_true(asprintf(&out, "%s/%s", root, rel) > 0);
    return out;
}

/* ---------------------------------------------------------------------------------------
 * The corpus.
 */
typedef struct {
    char *buf;
    size_t len;
} str_t;

static void str_add(str_t *s, const char *text)
{
    size_t n = strlen(text);
    s->buf = realloc(s->buf, s->len + n + 1);
    assert_non_null(s->buf);
    memcpy(s->buf + s->len, text, n + 1);
    s->len += n;
}

static void str_trim(str_t *s)
{
    while (s->len > 0 && s->buf[s->len - 1] == '\n')
        s->buf[--s->len] = '\0';
}

static void str_clear(str_t *s)
{
    free(s->buf);
    s->buf = NULL;
    s->len = 0;
}

typedef struct {
    const pd_config_t *cfg;
    pd_sql_t *rw;
    bool dump;
    int cases, failures, inputs;
    int by_action[3];
    int refused_by_state[8];
    const char *file;
    char name[200];
    char views_text[400];
    pd_rule_view_t views[NRULES];
    char db[64];
    str_t input, expect, shadow, flags, image;
    bool have_input, in_expect, have_expect;
} corpus_t;

static bool parse_flag_pair(const char *text, pd_rule_view_t *v)
{
    char w[32], r[32];
    pd_reads_t reads;
    if (sscanf(text, " writes=%31s reads=%31s", w, r) != 2)
        return false;
    if (!pd_writes_parse(w, &v->writes) || !pd_reads_parse(r, &reads))
        return false;
    v->reads = reads.mode;
    return true;
}

static int rule_index(const pd_config_t *cfg, const char *name)
{
    for (unsigned i = 0; i < cfg->rule_count; i++)
        if (strcmp(cfg->rules[i].name, name) == 0)
            return (int)i;
    return -1;
}

static const char *action_text(const pd_sql_result_t *r, char *buf, size_t size)
{
    if (r->action == PD_SQL_PASS)
        return "PASS";
    if (r->action == PD_SQL_REFUSE) {
        snprintf(buf, size, "REFUSE %s", r->sqlstate);
        return buf;
    }
    return r->sql;
}

static const char *mirror_text(const pd_sql_result_t *r)
{
    static const char *const txn[] = {"", "txn-begin", "txn-end", "txn-inner"};
    static const char *const image[] = {"", "image-insert", "image-upsert", "image-update",
                                        "image-delete"};
    switch (r->mirror) {
    case PD_MIRROR_TXN:
        return txn[r->txn];
    case PD_MIRROR_SET:
        return r->set_local ? "set-local" : "set";
    case PD_MIRROR_WRITE:
        return "write";
    case PD_MIRROR_IMAGE:
        return image[r->image];
    case PD_MIRROR_SHADOW:
        return "shadow";
    default:
        return NULL;
    }
}

static void flags_text(const corpus_t *c, const pd_sql_result_t *r, char *buf, size_t size)
{
    const char *m = mirror_text(r);
    snprintf(buf, size, "%s%s%s%s%s%s", r->is_write ? "write " : "", r->ordered ? "ordered " : "",
             r->rule >= 0 ? "rule=" : "", r->rule >= 0 ? c->cfg->rules[r->rule].name : "",
             m != NULL ? " mirror=" : "", m != NULL ? m : "");
    if (buf[0] == ' ')
        memmove(buf, buf + 1, strlen(buf));
    size_t n = strlen(buf);
    while (n > 0 && buf[n - 1] == ' ')
        buf[--n] = '\0';
}

static void report(corpus_t *c, const char *what, const char *expected, const char *got)
{
    c->failures++;
    print_error("\n%s: case \"%s\" (%s, db %s): %s differs\n  input:    %s\n  expected: %s\n"
                "  got:      %s\n",
                c->file, c->name, c->views_text, c->db, what, c->input.buf, expected,
                got != NULL ? got : "(none)");
}

static void dump_case(const corpus_t *c, const pd_sql_result_t *r)
{
    char buf[64], flags[200];
    flags_text(c, r, flags, sizeof flags);
    printf("### %s\n-- views: %s\n%s\n--> %s\n", c->name, c->views_text, c->input.buf,
           action_text(r, buf, sizeof buf));
    if (r->shadow_sql != NULL)
        printf("--> shadow: %s\n", r->shadow_sql);
    if (r->image_sql != NULL)
        printf("--> image: %s\n", r->image_sql);
    if (r->action == PD_SQL_REFUSE)
        printf("--  message: %s\n--  hint: %s\n", r->message, r->hint);
    printf("--  flags: %s\n\n", flags);
}

static void run_case(corpus_t *c)
{
    str_trim(&c->expect);
    pd_sql_result_t *r = pd_sql_rewrite(c->rw, c->db, c->input.buf, c->views);
    assert_non_null(r);
    c->cases++;
    c->by_action[r->action]++;
    if (r->action == PD_SQL_REFUSE)
        c->refused_by_state[r->sqlstate[0] == '0' ? 0 : r->sqlstate[0] == '4' ? 1 : 2]++;
    char buf[64], flags[200];
    const char *got = action_text(r, buf, sizeof buf);
    if (c->dump)
        dump_case(c, r);
    else if (strcmp(got, c->expect.buf) != 0)
        report(c, "result", c->expect.buf, got);
    else if ((c->shadow.buf != NULL) != (r->shadow_sql != NULL) ||
             (c->shadow.buf != NULL && strcmp(c->shadow.buf, r->shadow_sql) != 0))
        report(c, "shadow_sql", c->shadow.buf != NULL ? c->shadow.buf : "(none)", r->shadow_sql);
    if (!c->dump && ((c->image.buf != NULL) != (r->image_sql != NULL) ||
                     (c->image.buf != NULL && strcmp(c->image.buf, r->image_sql) != 0)))
        report(c, "image_sql", c->image.buf != NULL ? c->image.buf : "(none)", r->image_sql);
    if (!c->dump && c->flags.buf != NULL) {
        flags_text(c, r, flags, sizeof flags);
        str_trim(&c->flags);
        if (strcmp(flags, c->flags.buf) != 0)
            report(c, "flags", c->flags.buf, flags);
    }
    if (r->action == PD_SQL_REFUSE &&
        (r->message == NULL || strncmp(r->message, "pgdual", 6) != 0 || r->hint == NULL))
        report(c, "refusal text", "a message starting with pgdual and a hint", r->message);
    pd_sql_result_release(r);
    str_clear(&c->expect);
    str_clear(&c->shadow);
    str_clear(&c->flags);
    str_clear(&c->image);
    c->in_expect = false;
    c->have_expect = false;
}

static void flush(corpus_t *c)
{
    if (c->have_expect)
        run_case(c);
}

static void start_case(corpus_t *c, const char *name)
{
    flush(c);
    str_clear(&c->input);
    c->have_input = false;
    c->inputs++;
    snprintf(c->name, sizeof c->name, "%.150s", name);
    snprintf(c->views_text, sizeof c->views_text, "writes=old reads=old");
    set_views(c->views, PD_WRITES_OLD, PD_READS_OLD);
    snprintf(c->db, sizeof c->db, "app");
}

static void directive_views(corpus_t *c, const char *line)
{
    flush(c);
    if (strncmp(line, "-- views:", 9) == 0) {
        pd_rule_view_t v;
        if (!parse_flag_pair(line + 9, &v))
            fail_msg("%s: bad views line: %s", c->file, line);
        set_views(c->views, v.writes, v.reads);
        snprintf(c->views_text, sizeof c->views_text, "%.100s", line + 10);
        return;
    }
    /* -- view RULE: writes=W reads=R */
    char name[64];
    int used = 0;
    pd_rule_view_t v;
    if (sscanf(line, "-- view %63[^:]: %n", name, &used) != 1 || used == 0 ||
        rule_index(c->cfg, name) < 0 || !parse_flag_pair(line + used, &v))
        fail_msg("%s: bad view line: %s", c->file, line);
    c->views[rule_index(c->cfg, name)] = v;
    size_t n = strlen(c->views_text);
    snprintf(c->views_text + n, sizeof c->views_text - n, "; %.100s", line + 8);
}

static void expect_line(corpus_t *c, const char *line)
{
    if (strncmp(line, "--> shadow: ", 12) == 0) {
        str_add(&c->shadow, line + 12);
        c->in_expect = false;
        return;
    }
    if (strncmp(line, "--> flags:", 10) == 0) {
        str_add(&c->flags, line[10] == ' ' ? line + 11 : line + 10);
        c->in_expect = false;
        return;
    }
    if (strncmp(line, "--> image: ", 11) == 0) {
        str_add(&c->image, line + 11);
        c->in_expect = false;
        return;
    }
    flush(c);
    str_trim(&c->input);
    c->have_input = true;
    str_add(&c->expect, line[3] == ' ' ? line + 4 : line + 3);
    str_add(&c->expect, "\n");
    c->in_expect = true;
    c->have_expect = true;
}

static void corpus_line(corpus_t *c, char *line)
{
    if (line[0] == '#' && line[1] == ' ')
        return; /* a comment: no SQL input starts so */
    if (strncmp(line, "### ", 4) == 0) {
        line[strcspn(line, "\n")] = '\0';
        start_case(c, line + 4);
    } else if (strncmp(line, "-- views:", 9) == 0 || strncmp(line, "-- view ", 8) == 0) {
        line[strcspn(line, "\n")] = '\0';
        directive_views(c, line);
    } else if (strncmp(line, "-- db: ", 7) == 0) {
        line[strcspn(line, "\n")] = '\0';
        snprintf(c->db, sizeof c->db, "%.60s", line + 7);
    } else if (strncmp(line, "-->", 3) == 0) {
        line[strcspn(line, "\n")] = '\0';
        expect_line(c, line);
    } else if (c->in_expect) {
        str_add(&c->expect, line);
    } else if (!c->have_input && c->name[0] != '\0') {
        str_add(&c->input, line);
    }
}

static void run_file(corpus_t *c, const char *dir, const char *file)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    c->file = file;
    c->name[0] = '\0';
    char line[8192];
    while (fgets(line, sizeof line, f) != NULL)
        corpus_line(c, line);
    flush(c);
    fclose(f);
    str_clear(&c->input);
}

static int is_txt(const struct dirent *e)
{
    size_t n = strlen(e->d_name);
    return e->d_name[0] != '.' && n > 4 && strcmp(e->d_name + n - 4, ".txt") == 0;
}

static void test_corpus(void **state)
{
    (void)state;
    corpus_t c = {0};
    c.cfg = load_config();
    c.rw = new_rewriter(c.cfg, true, 0);
    c.dump = getenv("PD_SQL_CORPUS_DUMP") != NULL;
    char *dir = source_path("tests/unit/sql_corpus");
    struct dirent **list;
    int n = scandir(dir, &list, is_txt, alphasort);
    assert_true(n > 0);
    for (int i = 0; i < n; i++) {
        run_file(&c, dir, list[i]->d_name);
        free(list[i]);
    }
    free(list);
    free(dir);
    print_message("corpus: %d inputs, %d cases, %d failures; %d passed, %d rewritten, %d refused "
                  "(0A000/F0000 %d, 42601 %d, other %d)\n",
                  c.inputs, c.cases, c.failures, c.by_action[PD_SQL_PASS],
                  c.by_action[PD_SQL_REWRITE], c.by_action[PD_SQL_REFUSE], c.refused_by_state[0],
                  c.refused_by_state[1], c.refused_by_state[2]);
    pd_sql_free(c.rw);
    pd_config_free((pd_config_t *)c.cfg);
    assert_int_equal(c.failures, 0);
    assert_true(c.inputs >= 150);
}

/* ---------------------------------------------------------------------------------------
 * The cache.
 */
static void test_cache_hits_and_skips(void **state)
{
    (void)state;
    pd_config_t *cfg = load_config();
    pd_sql_t *rw = new_rewriter(cfg, true, 8);
    pd_rule_view_t v[NRULES];
    set_views(v, PD_WRITES_DUAL, PD_READS_OLD);
    pd_sql_stats_t st;

    /* Not mentioning a rule table: passed without parsing, not cached. */
    pd_sql_result_t *a = pd_sql_rewrite(rw, "app", "SELECT 1", v);
    assert_int_equal(a->action, PD_SQL_PASS);
    pd_sql_result_release(a);
    pd_sql_stats(rw, &st);
    assert_int_equal(st.skipped_unparsed, 1);
    assert_int_equal(st.parsed, 0);
    assert_int_equal(st.misses, 0);

    const char *ins = "INSERT INTO users (email) VALUES ($1)";
    pd_sql_result_t *r1 = pd_sql_rewrite(rw, "app", ins, v);
    pd_sql_result_t *r2 = pd_sql_rewrite(rw, "app", ins, v);
    assert_ptr_equal(r1, r2);      /* a hit is the same object ... */
    assert_int_equal(r1->refs, 3); /* ... with the cache's reference and ours */
    assert_int_equal(r1->action, PD_SQL_REWRITE);
    pd_sql_stats(rw, &st);
    assert_int_equal(st.misses, 1);
    assert_int_equal(st.hits, 1);
    assert_int_equal(st.parsed, 1);
    assert_int_equal(st.entries, 1);

    /* Other views of the rules: another entry. */
    pd_rule_view_t old[NRULES];
    set_views(old, PD_WRITES_OLD, PD_READS_OLD);
    pd_sql_result_t *r3 = pd_sql_rewrite(rw, "app", ins, old);
    assert_ptr_not_equal(r3, r1);
    assert_int_equal(r3->action, PD_SQL_PASS);
    pd_sql_stats(rw, &st);
    assert_int_equal(st.misses, 2);
    assert_int_equal(st.entries, 2);

    /* Another database: another entry, and its rules do not apply. */
    pd_sql_result_t *r4 = pd_sql_rewrite(rw, "shop", ins, v);
    assert_int_equal(r4->action, PD_SQL_PASS);
    pd_sql_stats(rw, &st);
    assert_int_equal(st.skipped_unparsed, 2);

    pd_sql_result_release(r1);
    pd_sql_result_release(r2);
    pd_sql_result_release(r3);
    pd_sql_result_release(r4);
    pd_sql_cache_clear(rw);
    pd_sql_stats(rw, &st);
    assert_int_equal(st.entries, 0);
    pd_sql_free(rw);
    pd_config_free(cfg);
}

static void test_cache_lru_eviction(void **state)
{
    (void)state;
    pd_config_t *cfg = load_config();
    pd_sql_t *rw = new_rewriter(cfg, true, 3);
    pd_rule_view_t v[NRULES];
    set_views(v, PD_WRITES_DUAL, PD_READS_OLD);
    char sql[5][64];
    for (int i = 0; i < 5; i++) {
        snprintf(sql[i], sizeof sql[i], "UPDATE users SET email = $1 WHERE id = %d", i);
        pd_sql_result_release(pd_sql_rewrite(rw, "app", sql[i], v));
    }
    pd_sql_stats_t st;
    pd_sql_stats(rw, &st);
    assert_int_equal(st.entries, 3);
    assert_int_equal(st.misses, 5);

    /* 2, 3, 4 are cached; touching 2 makes 3 the least recently used. */
    pd_sql_result_release(pd_sql_rewrite(rw, "app", sql[2], v));
    pd_sql_result_release(pd_sql_rewrite(rw, "app", sql[0], v)); /* miss; evicts 3 */
    pd_sql_result_release(pd_sql_rewrite(rw, "app", sql[2], v)); /* hit */
    pd_sql_result_release(pd_sql_rewrite(rw, "app", sql[4], v)); /* hit */
    pd_sql_result_release(pd_sql_rewrite(rw, "app", sql[3], v)); /* miss */
    pd_sql_stats(rw, &st);
    assert_int_equal(st.hits, 3);
    assert_int_equal(st.misses, 7);
    assert_int_equal(st.entries, 3);

    /* A result outlives its eviction while a user holds it. */
    pd_sql_result_t *held = pd_sql_rewrite(rw, "app", sql[1], v);
    for (int i = 0; i < 5; i++)
        if (i != 1)
            pd_sql_result_release(pd_sql_rewrite(rw, "app", sql[i], v));
    assert_int_equal(held->refs, 1);
    assert_non_null(strstr(held->sql, "lower($1)"));
    pd_sql_result_release(held);
    pd_sql_free(rw);
    pd_config_free(cfg);
}

static void test_cache_disabled(void **state)
{
    (void)state;
    pd_config_t *cfg = load_config();
    pd_sql_t *rw = new_rewriter(cfg, true, 0);
    pd_rule_view_t v[NRULES];
    set_views(v, PD_WRITES_DUAL, PD_READS_OLD);
    pd_sql_result_t *a = pd_sql_rewrite(rw, "app", "DELETE FROM users WHERE id = 1", v);
    pd_sql_result_t *b = pd_sql_rewrite(rw, "app", "DELETE FROM users WHERE id = 1", v);
    assert_ptr_not_equal(a, b);
    assert_int_equal(a->refs, 1);
    assert_true(a->is_write);
    pd_sql_stats_t st;
    pd_sql_stats(rw, &st);
    assert_int_equal(st.hits, 0);
    assert_int_equal(st.misses, 2);
    assert_int_equal(st.entries, 0);
    pd_sql_result_release(a);
    pd_sql_result_release(b);
    pd_sql_free(rw);
    pd_config_free(cfg);
}

/* ---------------------------------------------------------------------------------------
 * Refusals and the rest of the contract.
 */
static pd_sql_result_t *rewrite_with(pd_sql_t *rw, const char *sql, pd_writes_t w,
                                     pd_reads_mode_t r)
{
    pd_rule_view_t v[NRULES];
    set_views(v, w, r);
    pd_sql_result_t *res = pd_sql_rewrite(rw, "app", sql, v);
    assert_non_null(res);
    return res;
}

static void test_refusal_messages(void **state)
{
    (void)state;
    pd_config_t *cfg = load_config();
    pd_sql_t *rw = new_rewriter(cfg, true, 16);

    pd_sql_result_t *r = rewrite_with(rw, "COPY users FROM STDIN", PD_WRITES_DUAL, PD_READS_OLD);
    assert_int_equal(r->action, PD_SQL_REFUSE);
    assert_string_equal(r->sqlstate, "0A000");
    assert_string_equal(r->message, "pgdual: COPY into \"public.users\" is not supported while "
                                    "rule \"users-email\" has writes=dual");
    assert_string_equal(r->hint, "Use INSERT, or set writes=old for the duration of the load "
                                 "and run pgdualctl backfill users-email afterwards.");
    assert_int_equal(r->rule, R_USERS);
    assert_true(r->is_write);
    pd_sql_result_release(r);

    r = rewrite_with(rw, "UPDATE users SET (email, id) = (SELECT 'a', 1)", PD_WRITES_DUAL_NEW,
                     PD_READS_OLD);
    assert_int_equal(r->action, PD_SQL_REFUSE);
    assert_string_equal(r->sqlstate, "0A000");
    assert_non_null(strstr(r->message, "rule \"users-email\" has writes=dual-new"));
    assert_non_null(strstr(r->message, "SET (email, ...) = (SELECT ...)"));
    pd_sql_result_release(r);

    r = rewrite_with(rw, "INSERT INTO users (email) VALUES (random()::text)", PD_WRITES_DUAL,
                     PD_READS_OLD);
    assert_int_equal(r->action, PD_SQL_REFUSE);
    assert_non_null(strstr(r->message, "random()"));
    assert_non_null(strstr(r->hint, "parameter"));
    pd_sql_result_release(r);

    /* A statement that does not parse: refused while a rule of the database is active,
       naming the rule; passed (PostgreSQL reports the error) when none is. */
    r = rewrite_with(rw, "INSERT INTO users (email) VALUES ('a'", PD_WRITES_DUAL, PD_READS_OLD);
    assert_int_equal(r->action, PD_SQL_REFUSE);
    assert_string_equal(r->sqlstate, "42601");
    assert_non_null(strstr(r->message, "could not parse"));
    assert_non_null(strstr(r->message, "\"users-email\""));
    assert_null(strstr(r->message, "'a'")); /* no literal text in the message */
    pd_sql_result_release(r);
    r = rewrite_with(rw, "INSERT INTO users (email) VALUES ('a'", PD_WRITES_NEW, PD_READS_OLD);
    assert_int_equal(r->action, PD_SQL_PASS);
    pd_sql_result_release(r);
    r = rewrite_with(rw, "SELEC email FROM users", PD_WRITES_OLD, PD_READS_SHADOW);
    assert_int_equal(r->action, PD_SQL_REFUSE);
    assert_string_equal(r->sqlstate, "42601");
    pd_sql_result_release(r);

    pd_sql_free(rw);
    pd_config_free(cfg);
}

static void test_without_facts(void **state)
{
    (void)state;
    pd_config_t *cfg = load_config();
    pd_sql_t *rw = new_rewriter(cfg, false, 0);

    pd_sql_result_t *r = rewrite_with(rw, "SELECT * FROM users", PD_WRITES_OLD, PD_READS_NEW);
    assert_int_equal(r->action, PD_SQL_REFUSE);
    assert_string_equal(r->sqlstate, "0A000");
    assert_non_null(strstr(r->message, "cannot expand *"));
    assert_non_null(strstr(r->message, "reads=new"));
    pd_sql_result_release(r);

    r = rewrite_with(rw, "INSERT INTO users VALUES (1, 'a')", PD_WRITES_DUAL, PD_READS_OLD);
    assert_int_equal(r->action, PD_SQL_REFUSE);
    assert_non_null(strstr(r->message, "without a column list"));
    pd_sql_result_release(r);

    r = rewrite_with(rw, "INSERT INTO users (email) VALUES (DEFAULT)", PD_WRITES_DUAL,
                     PD_READS_OLD);
    assert_int_equal(r->action, PD_SQL_REFUSE);
    assert_non_null(strstr(r->message, "default of column \"email\""));
    pd_sql_result_release(r);

    r = rewrite_with(rw, "COPY users TO STDOUT", PD_WRITES_OLD, PD_READS_NEW);
    assert_int_equal(r->action, PD_SQL_REFUSE);
    pd_sql_result_release(r);

    /* Without facts, what needs none still works. */
    r = rewrite_with(rw, "INSERT INTO users (id, email) VALUES (1, $1)", PD_WRITES_DUAL,
                     PD_READS_OLD);
    assert_int_equal(r->action, PD_SQL_REWRITE);
    assert_string_equal(r->sql,
                        "INSERT INTO users (id, email, email_address) VALUES (1, $1, lower($1))");
    pd_sql_result_release(r);
    r = rewrite_with(rw, "COPY users (id, email) TO STDOUT", PD_WRITES_OLD, PD_READS_NEW);
    assert_int_equal(r->action, PD_SQL_REWRITE);
    assert_string_equal(r->sql,
                        "COPY (SELECT id, email_address AS email FROM ONLY users) TO STDOUT");
    pd_sql_result_release(r);

    pd_sql_free(rw);
    pd_config_free(cfg);
}

static void test_configured_views_and_databases(void **state)
{
    (void)state;
    pd_config_t *cfg = load_config();
    cfg->rules[R_USERS].writes = PD_WRITES_DUAL;
    pd_sql_t *rw = new_rewriter(cfg, true, 4);

    /* NULL views: the configured flags. */
    pd_sql_result_t *r = pd_sql_rewrite(rw, "app", "UPDATE users SET email = $1", NULL);
    assert_int_equal(r->action, PD_SQL_REWRITE);
    assert_string_equal(r->sql, "UPDATE users SET email = $1, email_address = lower($1)");
    pd_sql_result_release(r);

    /* The tables rule of shop classifies writes to its tables: one that sets the key is
       replayed verbatim, others as row images (key positions among the image columns). */
    pd_rule_view_t v[NRULES];
    set_views(v, PD_WRITES_DUAL, PD_READS_OLD);
    r = pd_sql_rewrite(rw, "shop", "UPDATE orders SET id = id + 1 WHERE id = 1", v);
    assert_int_equal(r->action, PD_SQL_PASS);
    assert_int_equal(r->mirror, PD_MIRROR_WRITE);
    assert_int_equal(r->mirror_rule, R_ORDERS);
    pd_sql_result_release(r);
    r = pd_sql_rewrite(rw, "shop", "DELETE FROM orders WHERE id = 1", v);
    assert_int_equal(r->mirror, PD_MIRROR_IMAGE);
    assert_string_equal(r->image_table, "public.orders");
    assert_int_equal(r->image_nkey, 1);
    assert_int_equal(r->image_key[0], 0);
    pd_sql_result_release(r);
    r = pd_sql_rewrite(rw, "shop", "INSERT INTO orders (id) VALUES (1)", v);
    assert_int_equal(r->action, PD_SQL_REWRITE);
    assert_int_equal(r->mirror, PD_MIRROR_IMAGE);
    assert_int_equal(r->image_cols, 4);
    assert_int_equal(r->image_types[2], 1184);
    assert_int_equal(r->client_cols, -1);
    assert_true(r->is_write);
    assert_int_equal(r->rule, R_ORDERS);
    pd_sql_result_release(r);
    r = pd_sql_rewrite(rw, "shop", "SELECT * FROM public.orders", v);
    assert_int_equal(r->action, PD_SQL_PASS);
    assert_false(r->is_write);
    assert_int_equal(r->rule, R_ORDERS);
    pd_sql_result_release(r);

    /* An unknown database has no rules: everything passes unparsed. */
    r = pd_sql_rewrite(rw, "other", "UPDATE users SET email = $1", v);
    assert_int_equal(r->action, PD_SQL_PASS);
    assert_int_equal(r->rule, -1);
    pd_sql_result_release(r);

    pd_sql_free(rw);
    pd_config_free(cfg);
}

static void test_bad_template(void **state)
{
    (void)state;
    pd_config_t *cfg = load_config();
    free(cfg->rules[R_USERS].columns[0].up);
    cfg->rules[R_USERS].columns[0].up = strdup("lower(email");
    free(cfg->rules[R_USERS].columns[0].down);
    cfg->rules[R_USERS].columns[0].down = strdup("1; DROP TABLE users");
    pd_sql_t *rw = new_rewriter(cfg, true, 0);

    pd_sql_result_t *r =
        rewrite_with(rw, "UPDATE users SET email = 'x'", PD_WRITES_DUAL, PD_READS_OLD);
    assert_int_equal(r->action, PD_SQL_REFUSE);
    assert_string_equal(r->sqlstate, "F0000");
    assert_non_null(strstr(r->message, "up expression of rule \"users-email\""));
    pd_sql_result_release(r);
    r = rewrite_with(rw, "SELECT email FROM users", PD_WRITES_OLD, PD_READS_NEW);
    assert_int_equal(r->action, PD_SQL_REFUSE);
    assert_non_null(strstr(r->message, "down expression"));
    pd_sql_result_release(r);
    r = rewrite_with(rw, "SELECT id FROM users", PD_WRITES_OLD, PD_READS_NEW);
    assert_int_equal(r->action, PD_SQL_PASS);
    pd_sql_result_release(r);

    pd_sql_free(rw);
    pd_config_free(cfg);
}

/* A very long operator chain is not handed to the parser (whose recursion it would
   overflow); it is refused while a rule is active and passed otherwise. */
static void test_deep_statement(void **state)
{
    (void)state;
    pd_config_t *cfg = load_config();
    pd_sql_t *rw = new_rewriter(cfg, true, 0);
    size_t terms = 200000;
    char *sql = malloc(terms * 2 + 64);
    assert_non_null(sql);
    strcpy(sql, "SELECT 1");
    char *p = sql + strlen(sql);
    for (size_t i = 0; i < terms; i++) {
        *p++ = '+';
        *p++ = '1';
    }
    strcpy(p, " FROM users");
    pd_sql_result_t *r = rewrite_with(rw, sql, PD_WRITES_DUAL, PD_READS_OLD);
    assert_int_equal(r->action, PD_SQL_REFUSE);
    assert_string_equal(r->sqlstate, "54001");
    pd_sql_result_release(r);
    r = rewrite_with(rw, sql, PD_WRITES_OLD, PD_READS_OLD);
    assert_int_equal(r->action, PD_SQL_PASS);
    pd_sql_result_release(r);
    free(sql);

    /* Just under the estimate's bound: examined (the walk may still find it too deep),
       and the parser's and the passes' recursion stays within the stack. */
    terms = 1450;
    sql = malloc(terms * 2 + 64);
    assert_non_null(sql);
    p = sql + sprintf(sql, "UPDATE users SET email = $1 WHERE id = 1");
    for (size_t i = 0; i < terms; i++)
        p += sprintf(p, "+1");
    pd_rule_view_t v[NRULES];
    set_views(v, PD_WRITES_DUAL, PD_READS_NEW);
    r = pd_sql_rewrite(rw, "app", sql, v);
    assert_non_null(r);
    assert_int_not_equal(r->action, PD_SQL_PASS);
    pd_sql_result_release(r);
    free(sql);

    /* A wide statement (many rows) is not deep. */
    size_t rows = 5000;
    sql = malloc(rows * 24 + 64);
    assert_non_null(sql);
    p = sql + sprintf(sql, "INSERT INTO users (id, email) VALUES (0, 'a')");
    for (size_t i = 1; i < rows; i++)
        p += sprintf(p, ", (%zu, 'a')", i);
    r = rewrite_with(rw, sql, PD_WRITES_DUAL, PD_READS_OLD);
    assert_int_equal(r->action, PD_SQL_REWRITE);
    assert_non_null(strstr(r->sql, "(4999, 'a', lower('a'))"));
    pd_sql_result_release(r);
    free(sql);

    pd_sql_free(rw);
    pd_config_free(cfg);
}

/* ---------------------------------------------------------------------------------------
 * Normalization.
 */
static void assert_no_literals(const char *sql)
{
    char *n = pd_sql_normalize(sql);
    assert_non_null(n);
    assert_null(strchr(n, '\''));
    for (const char *p = n; *p != '\0'; p++) {
        /* A digit may only follow `$` (a parameter number) or be part of a name. */
        if (*p >= '0' && *p <= '9') {
            const char *q = p;
            while (q > n && q[-1] >= '0' && q[-1] <= '9')
                q--;
            bool param = q > n && q[-1] == '$';
            bool ident =
                q > n && (q[-1] == '_' || ((q[-1] | 0x20) >= 'a' && (q[-1] | 0x20) <= 'z'));
            if (!param && !ident)
                fail_msg("a number survived normalizing \"%s\": \"%s\"", sql, n);
        }
    }
    free(n);
}

static void test_normalize(void **state)
{
    (void)state;
    char *n = pd_sql_normalize("SELECT * FROM users WHERE email = 'bob@example.com' AND id = 42");
    assert_string_equal(n, "SELECT * FROM users WHERE email = $1 AND id = $2");
    free(n);
    n = pd_sql_normalize("INSERT INTO users (id, email) VALUES ($1, 'x'), ($2, 'y')");
    assert_string_equal(n, "INSERT INTO users (id, email) VALUES ($1, $3), ($2, $4)");
    free(n);
    n = pd_sql_normalize("SELECT 'a' 'b' FROM");
    assert_string_equal(n, "<unparseable statement>");
    free(n);

    /* pg_query_normalize glues $1 to the next word here; the result must still be safe. */
    n = pd_sql_normalize("SELECT text $$secret$$mail FROM users");
    assert_non_null(n);
    assert_null(strstr(n, "secret"));
    free(n);

    assert_no_literals("SELECT 1.5, -3, 1e10, B'101', X'ff', E'\\n', $$dollar$$, U&'\\0061'");
    assert_no_literals("CREATE USER bob PASSWORD 'secret'");
    assert_no_literals("ALTER ROLE bob WITH PASSWORD 'x' VALID UNTIL '2030-01-01'");
    assert_no_literals("COPY t FROM '/tmp/secret.csv'");
    assert_no_literals("SELECT x::varchar(255) FROM t ORDER BY 1 LIMIT 10 OFFSET 5");
    assert_no_literals("CREATE TABLE x (a int DEFAULT 5 CHECK (a > 3))");
    assert_no_literals("COMMENT ON TABLE t IS 'the secret'");
    assert_no_literals("ALTER SYSTEM SET work_mem = '64MB'");
    assert_no_literals("SET application_name = 'x'; SELECT interval '1 day' + now()");
    assert_no_literals("UPDATE users SET email = 'a@b' WHERE id = 7 RETURNING email");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_corpus),
        cmocka_unit_test(test_cache_hits_and_skips),
        cmocka_unit_test(test_cache_lru_eviction),
        cmocka_unit_test(test_cache_disabled),
        cmocka_unit_test(test_refusal_messages),
        cmocka_unit_test(test_without_facts),
        cmocka_unit_test(test_configured_views_and_databases),
        cmocka_unit_test(test_bad_template),
        cmocka_unit_test(test_deep_statement),
        cmocka_unit_test(test_normalize),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
