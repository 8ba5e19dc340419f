/*
 * test_tmpl.c — literal templates: the fast path for plain text (pd__lits_take_plain)
 * answers exactly as PostgreSQL's lexer (pd__lits_take) wherever it answers, answers for
 * the statements clients that inline values send, and leaves every lexer corner case to
 * the lexer. Every line of the SQL corpus is checked the same way.
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

#include "rules/sql_internal.h"

/* Where the plain path answers, the lexer's answer must be the same, byte for byte. */
static bool same_as_lexer(const char *sql)
{
    pd__lits_t fast, full;
    pd__lits_status_t fs = pd__lits_take_plain(sql, &fast);
    if (fs != PD__LITS_OK)
        return false;
    pd__lits_status_t ls = pd__lits_take(sql, &full);
    if (ls != PD__LITS_OK)
        fail_msg("plain path found %zu literals in [%s]; the lexer none", fast.n, sql);
    if (fast.n != full.n)
        fail_msg("[%s]: %zu literals, the lexer %zu", sql, fast.n, full.n);
    for (size_t i = 0; i < full.n; i++) {
        if (fast.start[i] != full.start[i] || fast.end[i] != full.end[i] ||
            fast.at[i] != full.at[i])
            fail_msg("[%s]: literal %zu at %zu..%zu, the lexer %zu..%zu", sql, i, fast.start[i],
                     fast.end[i], full.start[i], full.end[i]);
    }
    assert_string_equal(fast.kinds, full.kinds);
    assert_int_equal(fast.tmpl.len, full.tmpl.len);
    assert_memory_equal(fast.tmpl.buf, full.tmpl.buf, full.tmpl.len);
    pd__lits_free(&fast);
    pd__lits_free(&full);
    return true;
}

static void test_plain_statements_match_the_lexer(void **ctx)
{
    (void)ctx;
    static const char *const plain[] = {
        "UPDATE users SET email = 'user42@example.com' WHERE id = 42",
        "INSERT INTO users (id, email) VALUES (123, 'A@B.example') ON CONFLICT (id) DO UPDATE "
        "SET email = EXCLUDED.email",
        "SELECT email FROM users WHERE id = 7",
        "SELECT 2147483647, 2147483648, 007, 1.5, 0.25, 10.0",
        "SELECT 'it''s', '', ''''",
        "SELECT \"t1\".\"a\"\"b\" FROM \"T 2\" \"t1\" WHERE x = 3",
        "SELECT date '2020-01-01', '5'::int, -5, x-1, a.b = 3, c IN (1, 2, 3)",
        "UPDATE pgbench_accounts SET abalance = abalance + -4711 WHERE aid = 99999;",
        "SELECT 'a'\n, 'b'",
        "SELECT 1+2*3/4%5, 6<=7, 8<>9, 'x'||'y'",
    };
    for (size_t i = 0; i < sizeof plain / sizeof *plain; i++)
        if (!same_as_lexer(plain[i]))
            fail_msg("the plain path did not answer for [%s]", plain[i]);
}

static void test_corner_cases_go_to_the_lexer(void **ctx)
{
    (void)ctx;
    static const char *const corner[] = {
        "SELECT E'a\\nb'",
        "SELECT B'0101'",
        "SELECT X'1f'",
        "SELECT N'x'",
        "SELECT U&'d\\0061t'",
        "SELECT 'a'\n'b'",
        "SELECT 'a' \n 'b'",
        "SELECT $1",
        "SELECT 1 -- c",
        "SELECT /* c */ 1",
        "SELECT 1e5",
        "SELECT .5",
        "SELECT 1.",
        "SELECT 1..2",
        "SELECT 'a\\'",
        "SELECT 'caf\xc3\xa9'",
        "SELECT 123abc",
        "SELECT 0x1F",
        "SELECT 1_000",
        "SELECT $$x$$",
        "SELECT 'unterminated",
        "SELECT \"unterminated",
        "SELECT 1.5.6",
        "SELECT x&'a'",
        "SELECT U&\"x\"",
        "SELECT a$b",
        /* found by fuzz_sql: the lexer rejects or reads these otherwise */
        "SELECT u W````````````````````````````````````````````````````````````````HERE - 0",
        "\"a\"&\"\"&M users uCOP 'x'\025",
        "/4 c */* SAM users UNIOFROM arasu\ntn 1",
        "SELECT 1 <<<<<<<< 2",
    };
    for (size_t i = 0; i < sizeof corner / sizeof *corner; i++) {
        pd__lits_t l;
        pd__lits_status_t st = pd__lits_take_plain(corner[i], &l);
        if (st == PD__LITS_OK) {
            pd__lits_free(&l);
            fail_msg("the plain path answered for [%s]", corner[i]);
        }
    }
    /* No literal: nothing to template, on either path. */
    pd__lits_t l;
    assert_int_equal(pd__lits_take_plain("SELECT a FROM t", &l), PD__LITS_NONE);
}

/* Every line of the corpus, statements and the rest alike. */
static void test_corpus_lines_match_the_lexer(void **ctx)
{
    (void)ctx;
    const char *src = getenv("PD_SOURCE_DIR");
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/tests/unit/sql_corpus", src ? src : ".");
    DIR *d = opendir(dir);
    assert_non_null(d);
    struct dirent *e;
    size_t answered = 0, lines = 0;
    while ((e = readdir(d)) != NULL) {
        if (strstr(e->d_name, ".txt") == NULL)
            continue;
        char path[2048];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        FILE *f = fopen(path, "r");
        assert_non_null(f);
        char line[8192];
        while (fgets(line, sizeof line, f) != NULL) {
            line[strcspn(line, "\n")] = '\0';
            lines++;
            answered += same_as_lexer(line);
            if (strncmp(line, "--> ", 4) == 0) /* the expected rewrites too */
                answered += same_as_lexer(line + 4);
        }
        fclose(f);
    }
    closedir(d);
    assert_true(lines > 300);
    assert_true(answered > 50); /* the plain path is not a path nobody takes */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_plain_statements_match_the_lexer),
        cmocka_unit_test(test_corner_cases_go_to_the_lexer),
        cmocka_unit_test(test_corpus_lines_match_the_lexer),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
