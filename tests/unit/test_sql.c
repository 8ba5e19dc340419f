/*
 * test_sql.c — the SQL rewriter (rules/sql.c and its parts): the corpus in
 * tests/unit/sql_corpus (every statement with its exact expected rewrite per flag setting),
 * the result cache (hits, misses, skips, LRU eviction, shared results), the literal
 * template cache (the corpus again through it, and the forms that need care), refusal
 * messages, statements that do not parse, rules without catalog facts, and pd_sql_normalize.
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
#include <pg_query.h>
#include <pg_query/pg_query.pb-c.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rules/config.h"
#include "rules/sql.h"
#include "tests/sql_facts.h"

/* ---------------------------------------------------------------------------------------
 * The test configuration: two column rules in database app and a tables rule in shop.
 */
static const char *config_yaml =
    "databases:\n"
    "  - { name: app, old: \"host=localhost dbname=app\" }\n"
    "  - { name: shop, old: \"host=localhost dbname=shop\", new: \"host=localhost "
    "dbname=shop2\" }\n"
    "  - { name: bg, old: \"host=localhost dbname=bg\", new: \"host=localhost dbname=bg2\" }\n"
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
    "    reads: old\n"
    "  - name: bg-people\n"
    "    database: bg\n"
    "    kind: tables\n"
    "    columns:\n"
    "      - { old: email, new: email_address, up: \"lower(email)\", down: \"email_address\" }\n"
    "      - { old: name, new: full_name }\n"
    "    writes: dual\n"
    "    reads: old\n";

enum { R_USERS, R_ACCOUNTS, R_ORDERS, R_BG, NRULES };

/* The tables rule's table: a serial key, a plain column, a now() default, a generated one. */
static char *orders_cols[] = {"id", "total", "created_at", "note", "total_cents"};
static char *orders_defaults[] = {"nextval('orders_id_seq'::regclass)", NULL, "now()",
                                  "'none'::text", NULL};
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
    const pd_table_facts_t *facts[NRULES] = {NULL, NULL, NULL, NULL};
    if (with_facts) {
        facts[R_USERS] = &users_facts;
        facts[R_ACCOUNTS] = &accounts_facts;
        facts[R_ORDERS] = &orders_facts;
        facts[R_BG] = &people_facts;
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

typedef struct corpus corpus_t;

struct corpus {
    const pd_config_t *cfg;
    pd_sql_t *rw;
    void (*run)(corpus_t *c); /* non-NULL: runs each case instead of checking expectations */
    void *arg;                /* run's state */
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
};

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
    case PD_MIRROR_COPY:
        return "copy";
    default:
        return r->read_new ? "read-new" : NULL;
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

static void end_case(corpus_t *c)
{
    str_clear(&c->expect);
    str_clear(&c->shadow);
    str_clear(&c->flags);
    str_clear(&c->image);
    c->in_expect = false;
    c->have_expect = false;
}

static void run_case(corpus_t *c)
{
    str_trim(&c->expect);
    if (c->run != NULL) {
        c->cases++;
        c->run(c);
        end_case(c);
        return;
    }
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
    end_case(c);
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

static void run_corpus(corpus_t *c)
{
    char *dir = source_path("tests/unit/sql_corpus");
    struct dirent **list;
    int n = scandir(dir, &list, is_txt, alphasort);
    assert_true(n > 0);
    for (int i = 0; i < n; i++) {
        run_file(c, dir, list[i]->d_name);
        free(list[i]);
    }
    free(list);
    free(dir);
}

static void corpus_open(corpus_t *c, size_t cache)
{
    c->cfg = load_config();
    c->rw = new_rewriter(c->cfg, true, cache);
}

static void corpus_close(corpus_t *c)
{
    pd_sql_free(c->rw);
    pd_config_free((pd_config_t *)c->cfg);
}

static void test_corpus(void **state)
{
    (void)state;
    corpus_t c = {0};
    corpus_open(&c, 0);
    c.dump = getenv("PD_SQL_CORPUS_DUMP") != NULL;
    run_corpus(&c);
    print_message("corpus: %d inputs, %d cases, %d failures; %d passed, %d rewritten, %d refused "
                  "(0A000/F0000 %d, 42601 %d, other %d)\n",
                  c.inputs, c.cases, c.failures, c.by_action[PD_SQL_PASS],
                  c.by_action[PD_SQL_REWRITE], c.by_action[PD_SQL_REFUSE], c.refused_by_state[0],
                  c.refused_by_state[1], c.refused_by_state[2]);
    corpus_close(&c);
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
 * Literal templates: a statement served from the template of its shape must mean exactly
 * what its direct rewrite (cache off) means.
 *
 * Texts are compared byte for byte first. Where they differ, both are parsed again and
 * deparsed, and those canonical texts must be equal. Byte equality is not always possible:
 * a template's rewrite keeps each literal's original bytes where the direct rewrite prints
 * the deparser's form of the constant (E'a\tb' against 'a<TAB>b'; 't'::boolean against
 * true), and a negative number is the constant -1 in a statement but "- $1" in its
 * template, so its rewrite reads "- 1". Parsing folds each pair into the same tree (the
 * grammar folds the minus into the constant), and the deparser prints every value of a
 * tree but no location or comment, so the canonical texts differ exactly when the trees
 * do: a literal in the wrong slot, a lost or changed value, another column still fail.
 * (The parse trees as JSON would not do: libpg_query 15 writes every negative integer
 * constant as {}, so -1 and -2 would compare equal.)
 */
/* Corpus cases served from a template (67 when this was written: the others have no
   literal, a $n, or are utility statements, syntax errors and other unusable shapes). */
#define TEMPLATE_HITS_MIN 60

static char *canonical(const char *sql)
{
    PgQueryProtobufParseResult pr = pg_query_parse_protobuf(sql);
    char *out = NULL;
    if (pr.error == NULL) {
        PgQueryDeparseResult d = pg_query_deparse_protobuf(pr.parse_tree);
        if (d.error == NULL && d.query != NULL)
            out = strdup(d.query);
        pg_query_free_deparse_result(d);
    }
    pg_query_free_protobuf_parse_result(pr);
    return out;
}

typedef struct {
    int exact, canonical; /* texts compared equal byte for byte, or once canonical */
} compare_t;

static bool same_text(const char *want, const char *got, compare_t *cmp)
{
    if (want == NULL || got == NULL)
        return want == got;
    if (strcmp(want, got) == 0) {
        cmp->exact++;
        return true;
    }
    char *a = canonical(want), *b = canonical(got);
    bool same = a != NULL && b != NULL && strcmp(a, b) == 0;
    free(a);
    free(b);
    cmp->canonical += same;
    return same;
}

static bool same_str(const char *a, const char *b)
{
    return a == b || (a != NULL && b != NULL && strcmp(a, b) == 0);
}

/* Everything a result says, its texts by meaning; prints what differs. */
static bool same_result(const char *sql, const pd_sql_result_t *want, const pd_sql_result_t *got,
                        compare_t *cmp)
{
    const char *what = NULL;
    if (want->action != got->action)
        what = "action";
    else if (!same_str(want->sqlstate, got->sqlstate) || !same_str(want->message, got->message) ||
             !same_str(want->hint, got->hint))
        what = "refusal";
    else if (want->is_write != got->is_write || want->ordered != got->ordered ||
             want->rule != got->rule)
        what = "flags";
    else if (!same_text(want->sql, got->sql, cmp))
        what = "sql";
    else if (!same_text(want->shadow_sql, got->shadow_sql, cmp))
        what = "shadow_sql";
    if (what == NULL)
        return true;
    print_error("\ntemplate rewrite differs in %s\n  input:    %s\n  direct:   %d %s | %s | %s\n"
                "  template: %d %s | %s | %s\n",
                what, sql, want->action, want->sql ? want->sql : "-",
                want->shadow_sql ? want->shadow_sql : "-", want->message ? want->message : "-",
                got->action, got->sql ? got->sql : "-", got->shadow_sql ? got->shadow_sql : "-",
                got->message ? got->message : "-");
    return false;
}

/* One literal token, changed but of the same kind (so that the statement keeps its
   template): a number's last digit moves by one (downwards, so that an integer never
   overflows into another kind), a string or bit string gains a character before its
   closing quote or dollar tag. */
static size_t vary_token(const char *tok, size_t n, PgQuery__Token kind, char *out)
{
    memcpy(out, tok, n);
    if (kind == PG_QUERY__TOKEN__ICONST || kind == PG_QUERY__TOKEN__FCONST) {
        for (size_t i = n; i-- > 0;)
            if (out[i] >= '0' && out[i] <= '9') {
                out[i] = out[i] == '0' ? '1' : (char)(out[i] - 1);
                break;
            }
        return n;
    }
    if (kind == PG_QUERY__TOKEN__USCONST)
        return n; /* libpg_query reports no span for it: left as it is */
    size_t close = 1;
    if (tok[n - 1] == '$') /* $tag$...$tag$ */
        close = (size_t)(strchr(tok + 1, '$') - tok) + 1;
    char extra = kind == PG_QUERY__TOKEN__BCONST   ? '1'
                 : kind == PG_QUERY__TOKEN__XCONST ? 'a'
                                                   : 'z';
    memmove(out + n - close + 1, out + n - close, close);
    out[n - close] = extra;
    return n + 1;
}

/* The statement with every literal varied (see vary_token), else the same bytes. */
static char *vary_literals(const char *sql)
{
    size_t len = strlen(sql);
    char *out = malloc(len * 2 + 1);
    assert_non_null(out);
    PgQueryScanResult sr = pg_query_scan(sql);
    PgQuery__ScanResult *scan =
        sr.error == NULL
            ? pg_query__scan_result__unpack(NULL, sr.pbuf.len, (const uint8_t *)sr.pbuf.data)
            : NULL;
    size_t at = 0, copied = 0;
    for (size_t i = 0; scan != NULL && i < scan->n_tokens; i++) {
        const PgQuery__ScanToken *t = scan->tokens[i];
        bool literal = t->token == PG_QUERY__TOKEN__SCONST || t->token == PG_QUERY__TOKEN__BCONST ||
                       t->token == PG_QUERY__TOKEN__XCONST || t->token == PG_QUERY__TOKEN__ICONST ||
                       t->token == PG_QUERY__TOKEN__FCONST;
        if (!literal || t->end <= t->start)
            continue;
        memcpy(out + at, sql + copied, (size_t)t->start - copied);
        at += (size_t)t->start - copied;
        at += vary_token(sql + t->start, (size_t)(t->end - t->start), t->token, out + at);
        copied = (size_t)t->end;
    }
    memcpy(out + at, sql + copied, len - copied + 1);
    if (scan != NULL)
        pg_query__scan_result__free_unpacked(scan, NULL);
    pg_query_free_scan_result(sr);
    return out;
}

typedef struct {
    pd_sql_t *direct; /* cache off: the reference */
    compare_t cmp;
    int failures;
} twice_t;

static void compare_one(corpus_t *c, twice_t *t, const char *sql)
{
    pd_sql_result_t *want = pd_sql_rewrite(t->direct, c->db, sql, c->views);
    pd_sql_result_t *got = pd_sql_rewrite(c->rw, c->db, sql, c->views);
    assert_non_null(want);
    assert_non_null(got);
    if (!same_result(sql, want, got, &t->cmp)) {
        t->failures++;
        print_error("  (%s: case \"%s\", %s, db %s)\n", c->file, c->name, c->views_text, c->db);
    }
    pd_sql_result_release(want);
    pd_sql_result_release(got);
}

/* The case with other literal values first (which makes the template, or finds the shape
   unusable), then the case itself (served from the template). */
static void run_twice(corpus_t *c)
{
    char *variant = vary_literals(c->input.buf);
    compare_one(c, c->arg, variant);
    compare_one(c, c->arg, c->input.buf);
    free(variant);
}

static void test_corpus_through_templates(void **state)
{
    (void)state;
    corpus_t c = {0};
    corpus_open(&c, 4096);
    twice_t t = {.direct = new_rewriter(c.cfg, true, 0)};
    c.run = run_twice;
    c.arg = &t;
    run_corpus(&c);
    pd_sql_stats_t st;
    pd_sql_stats(c.rw, &st);
    print_message("corpus through templates: %d cases, %d differ; texts %d equal, %d equal once "
                  "canonical; templates: %llu hits, %llu made, %llu unusable\n",
                  c.cases, t.failures, t.cmp.exact, t.cmp.canonical,
                  (unsigned long long)st.template_hits, (unsigned long long)st.template_misses,
                  (unsigned long long)st.template_unusable);
    pd_sql_free(t.direct);
    corpus_close(&c);
    assert_int_equal(t.failures, 0);
    assert_true(c.cases >= 250);
    /* The comparisons above are only worth something if templates served the cases. */
    assert_true(st.template_hits >= TEMPLATE_HITS_MIN);
}

/* A statement of a known shape is served without parsing, and its exact text is not
   cached (it would only push templates out). */
/* A statement served from its template keeps the mirror plan of a tables rule: row-image
   statement, key positions and types come with it (without them a write with other
   literals would not be mirrored at all). */
static void test_template_keeps_mirror_plan(void **state)
{
    (void)state;
    pd_config_t *cfg = load_config();
    pd_sql_t *rw = new_rewriter(cfg, true, 64);
    pd_rule_view_t v[NRULES];
    set_views(v, PD_WRITES_DUAL, PD_READS_OLD);
    pd_sql_result_t *first =
        pd_sql_rewrite(rw, "shop", "UPDATE orders SET total = 1 WHERE id = 7", v);
    pd_sql_result_t *r = pd_sql_rewrite(rw, "shop", "UPDATE orders SET total = 2 WHERE id = 8", v);
    pd_sql_stats_t st;
    pd_sql_stats(rw, &st);
    assert_int_equal(st.template_hits, 1);
    assert_int_equal(r->action, PD_SQL_REWRITE);
    assert_string_equal(r->sql, "UPDATE orders SET total = 2 WHERE id = 8 RETURNING orders.id, "
                                "orders.total, orders.created_at, orders.note");
    assert_int_equal(r->mirror, PD_MIRROR_IMAGE);
    assert_int_equal(r->image, PD_IMAGE_UPDATE);
    assert_int_equal(r->mirror_rule, R_ORDERS);
    assert_string_equal(r->image_sql, first->image_sql);
    assert_string_equal(r->image_table, "public.orders");
    assert_int_equal(r->image_cols, 4);
    assert_int_equal(r->image_types[1], 1700);
    assert_int_equal(r->image_nkey, 1);
    assert_int_equal(r->image_key[0], 0);
    assert_int_equal(r->client_cols, -1);
    pd_sql_result_release(first);
    pd_sql_result_release(r);
    /* Transaction control from a template keeps its kind too. */
    r = pd_sql_rewrite(rw, "shop", "SAVEPOINT s1", v);
    assert_int_equal(r->mirror, PD_MIRROR_TXN);
    assert_int_equal(r->txn, PD_TXN_INNER);
    pd_sql_result_release(r);
    pd_sql_free(rw);
    pd_config_free(cfg);
}

/* A tables rule that maps columns, with new authoritative: the translated statement goes
   to new, the mirror (old) replays the client's own text or row images read back through
   `down`, and the client's RETURNING columns are counted after a `*` was expanded. Under
   writes=dual nothing is translated and images carry old's values to `up` on new. */
static void test_translate_plan(void **state)
{
    (void)state;
    pd_config_t *cfg = load_config();
    pd_sql_t *rw = new_rewriter(cfg, true, 64);
    pd_rule_view_t v[NRULES];
    set_views(v, PD_WRITES_DUAL_NEW, PD_READS_NEW);
    pd_sql_result_t *r =
        pd_sql_rewrite(rw, "bg", "DELETE FROM people WHERE email = $1 RETURNING *", v);
    assert_int_equal(r->action, PD_SQL_REWRITE);
    assert_int_equal(r->mirror, PD_MIRROR_IMAGE);
    assert_true(r->mirror_original);
    assert_int_equal(r->client_cols, 4);
    assert_int_equal(r->image_cols, 1);
    pd_sql_result_release(r);
    r = pd_sql_rewrite(rw, "bg", "TRUNCATE tags", v);
    assert_int_equal(r->mirror, PD_MIRROR_WRITE);
    assert_true(r->mirror_original);
    pd_sql_result_release(r);
    /* writes=new: translated, nothing mirrored. */
    set_views(v, PD_WRITES_NEW, PD_READS_NEW);
    r = pd_sql_rewrite(rw, "bg", "UPDATE people SET name = 'x' WHERE email = 'a'", v);
    assert_int_equal(r->action, PD_SQL_REWRITE);
    assert_string_equal(r->sql, "UPDATE people SET full_name = 'x' WHERE email_address = 'a'");
    assert_int_equal(r->mirror, PD_MIRROR_NONE);
    pd_sql_result_release(r);
    /* writes=dual: old authoritative, nothing translated; the image applies `up` on new. */
    set_views(v, PD_WRITES_DUAL, PD_READS_OLD);
    r = pd_sql_rewrite(rw, "bg", "UPDATE people SET name = 'x' WHERE email = 'a'", v);
    assert_string_equal(r->sql, "UPDATE people SET name = 'x' WHERE email = 'a' RETURNING "
                                "people.id, people.email, people.name, people.created");
    assert_false(r->mirror_original);
    assert_non_null(strstr(r->image_sql, "(lower(email))"));
    pd_sql_result_release(r);
    /* A MERGE into a mapped table cannot be replayed on new as the client wrote it. */
    r = pd_sql_rewrite(rw, "bg",
                       "MERGE INTO people p USING tags t ON p.id = t.id WHEN MATCHED THEN "
                       "UPDATE SET name = t.label",
                       v);
    assert_int_equal(r->action, PD_SQL_REFUSE);
    assert_string_equal(r->sqlstate, "0A000");
    assert_non_null(strstr(r->message, "public.people"));
    pd_sql_result_release(r);
    pd_sql_free(rw);
    pd_config_free(cfg);
}

/* reads=aa (writes=old): reads of the rule's tables get a shadow plan (run again on old),
   transaction control and settings are kept in step, and writes are not replayed at all,
   nor is two-phase commit refused (nothing is written on the second connection). */
static void test_aa_plans_reads_only(void **state)
{
    (void)state;
    pd_config_t *cfg = load_config();
    pd_sql_t *rw = new_rewriter(cfg, true, 64);
    pd_rule_view_t v[NRULES];
    set_views(v, PD_WRITES_OLD, PD_READS_OLD);
    v[R_ORDERS].reads = PD_READS_AA;
    static const struct {
        const char *sql;
        pd_mirror_kind_t mirror;
    } cases[] = {
        {"SELECT id, total FROM orders WHERE id = 7", PD_MIRROR_SHADOW},
        {"BEGIN", PD_MIRROR_TXN},
        {"SET search_path = public", PD_MIRROR_SET},
        {"UPDATE orders SET total = 1 WHERE id = 7", PD_MIRROR_NONE},
        {"INSERT INTO orders (total) VALUES (3)", PD_MIRROR_NONE},
        {"PREPARE TRANSACTION 'x'", PD_MIRROR_NONE},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        pd_sql_result_t *r = pd_sql_rewrite(rw, "shop", cases[i].sql, v);
        assert_non_null(r);
        if (r->mirror != cases[i].mirror || r->action == PD_SQL_REFUSE)
            fail_msg("%s: mirror %d action %d", cases[i].sql, r->mirror, r->action);
        pd_sql_result_release(r);
    }
    pd_sql_free(rw);
    pd_config_free(cfg);
}

static void test_template_hit_skips_parsing(void **state)
{
    (void)state;
    pd_config_t *cfg = load_config();
    pd_sql_t *rw = new_rewriter(cfg, true, 64);
    pd_rule_view_t v[NRULES];
    set_views(v, PD_WRITES_DUAL, PD_READS_OLD);
    pd_sql_stats_t a, b;

    pd_sql_result_t *r =
        pd_sql_rewrite(rw, "app", "UPDATE users SET email = 'A@X' WHERE id = 1", v);
    assert_string_equal(
        r->sql, "UPDATE users SET email = 'A@X', email_address = lower('A@X') WHERE id = 1");
    pd_sql_result_release(r);
    pd_sql_stats(rw, &a);
    assert_int_equal(a.template_misses, 1);
    assert_int_equal(a.template_hits, 0);
    assert_int_equal(a.entries, 1);

    r = pd_sql_rewrite(rw, "app", "UPDATE users SET email = 'b@y.org' WHERE id = 22", v);
    assert_int_equal(r->action, PD_SQL_REWRITE);
    assert_true(r->is_write);
    assert_int_equal(r->rule, R_USERS);
    assert_string_equal(
        r->sql,
        "UPDATE users SET email = 'b@y.org', email_address = lower('b@y.org') WHERE id = 22");
    pd_sql_result_release(r);
    pd_sql_stats(rw, &b);
    assert_int_equal(b.template_hits, 1);
    assert_int_equal(b.template_misses, 1);
    assert_int_equal(b.parsed, a.parsed); /* no second parse */
    assert_int_equal(b.entries, 1);
    assert_int_equal(b.misses, a.misses + 1);

    /* Other views of the rules: another template. */
    pd_rule_view_t old[NRULES];
    set_views(old, PD_WRITES_OLD, PD_READS_OLD);
    r = pd_sql_rewrite(rw, "app", "UPDATE users SET email = 'c' WHERE id = 3", old);
    assert_int_equal(r->action, PD_SQL_PASS);
    pd_sql_result_release(r);
    pd_sql_stats(rw, &b);
    assert_int_equal(b.template_misses, 2);
    assert_int_equal(b.entries, 2);

    pd_sql_free(rw);
    pd_config_free(cfg);
}

typedef enum { VIA_HIT, VIA_UNUSABLE, VIA_NONE } via_t;

typedef struct {
    const char *name;
    pd_writes_t writes;
    pd_reads_mode_t reads;
    const char *warm; /* the same shape with other literals: makes the template */
    const char *sql;
    via_t via;
    const char *contains; /* the rewrite (or its shadow form) must contain this, if set */
} form_t;

static const form_t forms[] = {
    {"negative numbers", PD_WRITES_DUAL, PD_READS_OLD,
     "INSERT INTO users (id, email) VALUES (-7, -70)",
     "INSERT INTO users (id, email) VALUES (-1, -2)", VIA_HIT, "lower(- 2)"},
    {"negative in WHERE", PD_WRITES_DUAL, PD_READS_OLD,
     "UPDATE users SET email = 'a' WHERE id = -7", "UPDATE users SET email = 'b' WHERE id = -1",
     VIA_HIT, "lower('b')"},
    {"ORDER BY position", PD_WRITES_DUAL, PD_READS_NEW,
     "SELECT email, id FROM users WHERE id > 3 ORDER BY 2",
     "SELECT email, id FROM users WHERE id > 5 ORDER BY 1", VIA_HIT,
     "SELECT email_address AS email, id FROM users WHERE id > 5 ORDER BY 1"},
    {"string continuation", PD_WRITES_DUAL, PD_READS_OLD,
     "UPDATE users SET email = 'x' WHERE id = 1", "UPDATE users SET email = 'a'\n'b' WHERE id = 2",
     VIA_HIT, "email_address = lower('a'\n'b')"},
    {"E string", PD_WRITES_DUAL, PD_READS_OLD, "UPDATE users SET email = E'x' WHERE id = 1",
     "UPDATE users SET email = E'A\\tB\\'' WHERE id = 2", VIA_HIT, "lower(E'A\\tB\\'')"},
    {"dollar quoting with $1 inside", PD_WRITES_DUAL, PD_READS_OLD,
     "UPDATE users SET email = 'x' WHERE id = 1",
     "UPDATE users SET email = $q$it's $1$q$ WHERE id = 2", VIA_HIT, "lower($q$it's $1$q$)"},
    {"U& string with UESCAPE", PD_WRITES_DUAL, PD_READS_OLD,
     "UPDATE users SET email = U&'x!0061' UESCAPE '!' WHERE id = 1",
     "UPDATE users SET email = U&'d!0061t!+000061' UESCAPE '!' WHERE id = 2", VIA_NONE, NULL},
    {"cast of a literal", PD_WRITES_DUAL, PD_READS_NEW, "SELECT email FROM users WHERE id = 9::int",
     "SELECT email FROM users WHERE id = 1::int", VIA_HIT,
     "SELECT email_address AS email FROM users WHERE id = 1::int"},
    {"multi-statement", PD_WRITES_DUAL, PD_READS_OLD,
     "UPDATE users SET email = 'w' WHERE id = 3; SELECT 'o' ,  9 /* kept */;\n"
     "UPDATE accounts SET name = 'n' WHERE id = 4",
     "UPDATE users SET email = 'A' WHERE id = 1; SELECT 'keep' ,  2 /* kept */;\n"
     "UPDATE accounts SET name = ' N ' WHERE id = 7",
     VIA_HIT,
     "UPDATE users SET email = 'A', email_address = lower('A') WHERE id = 1; SELECT 'keep' ,  2 "
     "/* kept */;\nUPDATE accounts SET name = ' N ', full_name = "},
    {"shadow read", PD_WRITES_DUAL, PD_READS_SHADOW, "SELECT email FROM users WHERE id = 70",
     "SELECT email FROM users WHERE id = 7", VIA_HIT,
     "SELECT email_address AS email FROM users WHERE id = 7"},
    {"refusal", PD_WRITES_DUAL, PD_READS_OLD,
     "UPDATE users SET email = 'x' || random()::text WHERE id = 1",
     "UPDATE users SET email = 'y' || random()::text WHERE id = 2", VIA_HIT, NULL},
    {"type-prefixed literal", PD_WRITES_DUAL, PD_READS_NEW,
     "SELECT email FROM users WHERE created_at > date '2019-12-31'",
     "SELECT email FROM users WHERE created_at > date '2020-01-01'", VIA_HIT, "'2020-01-01'"},
    {"interval literal", PD_WRITES_DUAL, PD_READS_NEW,
     "SELECT email FROM users WHERE created_at > now() - interval '2' day",
     "SELECT email FROM users WHERE created_at > now() - interval '1' day", VIA_HIT, "'1'"},
    {"type modifiers", PD_WRITES_DUAL, PD_READS_NEW,
     "SELECT id::numeric(12, 3), email FROM users WHERE id = 2",
     "SELECT id::numeric(10, 2), email FROM users WHERE id = 1", VIA_HIT, "numeric(10, 2)"},
    {"type modifier the grammar wants literal", PD_WRITES_DUAL, PD_READS_NEW,
     "SELECT email::varchar(30) FROM users WHERE id = 2",
     "SELECT email::varchar(20) FROM users WHERE id = 1", VIA_UNUSABLE, "(20)"},
    {"bit strings", PD_WRITES_DUAL, PD_READS_NEW,
     "SELECT email FROM users WHERE id = 1 AND b'1' = x'F'",
     "SELECT email FROM users WHERE id = 1 AND b'101' = x'5'", VIA_HIT, "b'101' = x'5'"},
    {"upsert", PD_WRITES_DUAL, PD_READS_OLD,
     "INSERT INTO users (id, email) VALUES (3, 'C'), (-4, 'D') ON CONFLICT (id) DO UPDATE SET "
     "email = EXCLUDED.email",
     "INSERT INTO users (id, email) VALUES (1, 'A'), (-2, 'B') ON CONFLICT (id) DO UPDATE SET "
     "email = EXCLUDED.email",
     VIA_HIT, "lower('B')"},
    {"$1 in a comment", PD_WRITES_DUAL, PD_READS_NEW,
     "/* $1 */ SELECT email /* $1 */ FROM users WHERE id = 3",
     "/* $1 */ SELECT email /* $1 */ FROM users WHERE id = 4", VIA_HIT, "/* $1 */ SELECT"},
    {"literal kind the grammar rejects", PD_WRITES_DUAL, PD_READS_NEW,
     "SELECT email FROM users WHERE created_at > date '2020-01-01'",
     "SELECT email FROM users WHERE created_at > date 1", VIA_UNUSABLE, NULL},
    {"literal glued to its neighbour", PD_WRITES_DUAL, PD_READS_NEW,
     "SELECT N'x' AS n, email FROM users", "SELECT N'y' AS n, email FROM users", VIA_UNUSABLE,
     NULL},
    {"SET", PD_WRITES_DUAL, PD_READS_OLD, "SET application_name = 'users1'",
     "SET application_name = 'users'", VIA_UNUSABLE, NULL},
    {"DDL", PD_WRITES_DUAL, PD_READS_OLD, "ALTER TABLE users ALTER COLUMN email SET DEFAULT 'y'",
     "ALTER TABLE users ALTER COLUMN email SET DEFAULT 'x'", VIA_UNUSABLE, NULL},
    {"DO block", PD_WRITES_DUAL, PD_READS_OLD, "DO 'BEGIN UPDATE users SET email = 2; END'",
     "DO 'BEGIN UPDATE users SET email = 1; END'", VIA_UNUSABLE, NULL},
    {"syntax error", PD_WRITES_DUAL, PD_READS_OLD, "UPDATE users SET email = 'x' WHER id = 1",
     "UPDATE users SET email = 'y' WHER id = 2", VIA_UNUSABLE, NULL},
    {"a parameter already", PD_WRITES_DUAL, PD_READS_OLD,
     "UPDATE users SET email = $1 WHERE id = 5", "UPDATE users SET email = $1 WHERE id = 6",
     VIA_NONE, "lower($1)"},
};

static void check_form(pd_sql_t *rw, pd_sql_t *direct, const form_t *f)
{
    pd_rule_view_t v[NRULES];
    set_views(v, f->writes, f->reads);
    compare_t cmp = {0};
    pd_sql_result_t *want = pd_sql_rewrite(direct, "app", f->warm, v);
    pd_sql_result_t *got = pd_sql_rewrite(rw, "app", f->warm, v);
    if (!same_result(f->warm, want, got, &cmp))
        fail_msg("form \"%s\": the statement that made the template", f->name);
    pd_sql_result_release(want);
    pd_sql_result_release(got);

    pd_sql_stats_t a, b;
    pd_sql_stats(rw, &a);
    want = pd_sql_rewrite(direct, "app", f->sql, v);
    got = pd_sql_rewrite(rw, "app", f->sql, v);
    pd_sql_stats(rw, &b);
    if (!same_result(f->sql, want, got, &cmp))
        fail_msg("form \"%s\"", f->name);
    uint64_t hits = b.template_hits - a.template_hits;
    uint64_t unusable = b.template_unusable - a.template_unusable;
    uint64_t made = b.template_misses - a.template_misses;
    if ((f->via == VIA_HIT && (hits != 1 || b.parsed != a.parsed)) ||
        (f->via == VIA_UNUSABLE && (unusable != 1 || hits != 0)) ||
        (f->via == VIA_NONE && hits + unusable + made != 0))
        fail_msg("form \"%s\": template hits %llu, unusable %llu, made %llu, parses %llu", f->name,
                 (unsigned long long)hits, (unsigned long long)unusable, (unsigned long long)made,
                 (unsigned long long)(b.parsed - a.parsed));
    const char *text = got->sql != NULL ? got->sql : got->shadow_sql;
    if (f->contains != NULL && (text == NULL || strstr(text, f->contains) == NULL))
        fail_msg("form \"%s\": \"%s\" not in \"%s\"", f->name, f->contains, text ? text : "-");
    pd_sql_result_release(want);
    pd_sql_result_release(got);
}

/* SELECT email, (SELECT (SELECT ... lit)) FROM users: shallow for the token estimate, but
   each level is several nodes deep in the tree. */
static char *nested_selects(int levels, const char *lit)
{
    char *sql = malloc((size_t)levels * 9 + strlen(lit) + 32);
    assert_non_null(sql);
    char *p = sql + sprintf(sql, "SELECT email, ");
    for (int i = 0; i < levels; i++)
        p += sprintf(p, "(SELECT ");
    p += sprintf(p, "%s", lit);
    for (int i = 0; i < levels; i++)
        *p++ = ')';
    strcpy(p, " FROM users");
    return sql;
}

static void test_template_forms(void **state)
{
    (void)state;
    pd_config_t *cfg = load_config();
    pd_sql_t *rw = new_rewriter(cfg, true, 256);
    pd_sql_t *direct = new_rewriter(cfg, true, 0);
    for (size_t i = 0; i < sizeof forms / sizeof *forms; i++) {
        pd_sql_cache_clear(rw);
        check_form(rw, direct, &forms[i]);
    }

    /* The passes refuse trees deeper than they walk, and a template can be deeper than its
       statements (- $1 is one node more than the constant -1): a template refused so is not
       used. */
    char *warm = nested_selects(500, "2"), *sql = nested_selects(500, "1");
    const form_t deep = {"nested too deeply for the passes",
                         PD_WRITES_DUAL,
                         PD_READS_NEW,
                         warm,
                         sql,
                         VIA_UNUSABLE,
                         NULL};
    check_form(rw, direct, &deep);
    free(warm);
    free(sql);
    pd_sql_free(direct);
    pd_sql_free(rw);
    pd_config_free(cfg);
}

/* An up expression with a $n of its own: its $1 in a rewrite would be taken for the
   statement's first literal, so templates are off and every statement takes the exact
   path. */
static void test_template_off_for_params_in_rules(void **state)
{
    (void)state;
    pd_config_t *cfg = load_config();
    free(cfg->rules[R_USERS].columns[0].up);
    cfg->rules[R_USERS].columns[0].up = strdup("coalesce(lower(email), $1)");
    pd_sql_t *rw = new_rewriter(cfg, true, 64);
    pd_rule_view_t v[NRULES];
    set_views(v, PD_WRITES_DUAL, PD_READS_OLD);
    const char *sql[] = {"UPDATE users SET email = 'a' WHERE id = 1",
                         "UPDATE users SET email = 'b' WHERE id = 2"};
    for (int i = 0; i < 2; i++) {
        pd_sql_result_t *r = pd_sql_rewrite(rw, "app", sql[i], v);
        assert_int_equal(r->action, PD_SQL_REWRITE);
        assert_non_null(strstr(r->sql, i == 0 ? "COALESCE(lower('a'), $1)" : "lower('b'), $1)"));
        pd_sql_result_release(r);
    }
    pd_sql_stats_t st;
    pd_sql_stats(rw, &st);
    assert_int_equal(st.template_hits + st.template_misses + st.template_unusable, 0);
    assert_int_equal(st.parsed, 2);
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
 * The name a DEALLOCATE drops, as PostgreSQL reads it.
 */
/* names: the expected names, space-separated ("" none). */
static void expect_deallocated(const char *sql, const char *names)
{
    char **got = pd_sql_deallocated_names(sql);
    char joined[256] = "";
    for (size_t i = 0; got != NULL && got[i] != NULL; i++) {
        if (i > 0)
            strcat(joined, " ");
        strcat(joined, got[i]);
    }
    if (strcmp(joined, names) != 0)
        fail_msg("\"%s\" named \"%s\", not \"%s\"", sql, joined, names);
    pd_sql_names_free(got);
}

static void test_deallocated_name(void **state)
{
    (void)state;
    expect_deallocated("DEALLOCATE r", "r");
    expect_deallocated("  deallocate PREPARE Stmt1 ;", "stmt1");
    expect_deallocated("DEALLOCATE \"Mixed \"\"Name\"\"\"", "Mixed \"Name\"");
    expect_deallocated("/* c */ DEALLOCATE -- x\n s_1", "s_1");
    expect_deallocated("DEALLOCATE ALL", "");
    expect_deallocated("DEALLOCATE PREPARE ALL", "");
    expect_deallocated("DEALLOCATE \"all\"", "all");
    expect_deallocated("DEALLOCATE a; DEALLOCATE b", "a b");
    expect_deallocated("SELECT 1; DEALLOCATE b", "b");
    expect_deallocated("DEALLOCATE ALL; DEALLOCATE b", "b");
    expect_deallocated("DISCARD ALL", "");
    expect_deallocated("DEALLOCATE", "");
    expect_deallocated("DEALLOCATE 'r'", "");
    expect_deallocated("SELECT 'DEALLOCATE r'", "");
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
        cmocka_unit_test(test_corpus_through_templates),
        cmocka_unit_test(test_template_hit_skips_parsing),
        cmocka_unit_test(test_template_keeps_mirror_plan),
        cmocka_unit_test(test_aa_plans_reads_only),
        cmocka_unit_test(test_translate_plan),
        cmocka_unit_test(test_template_forms),
        cmocka_unit_test(test_template_off_for_params_in_rules),
        cmocka_unit_test(test_cache_hits_and_skips),
        cmocka_unit_test(test_cache_lru_eviction),
        cmocka_unit_test(test_cache_disabled),
        cmocka_unit_test(test_refusal_messages),
        cmocka_unit_test(test_without_facts),
        cmocka_unit_test(test_configured_views_and_databases),
        cmocka_unit_test(test_bad_template),
        cmocka_unit_test(test_deep_statement),
        cmocka_unit_test(test_deallocated_name),
        cmocka_unit_test(test_normalize),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
