/*
 * test_users.c — the users file (rules/users.c), pgbouncer's auth_file format: quoting,
 * comments and blank lines, SCRAM verifiers, lookups, and errors that name file and line
 * but never a secret.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "rules/config.h"

#define VERIFIER "SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0$dGVzdHN0b3JlZGtleXRlc3RzdG9yZWQ=:c2VydmVya2V5"

/* Writes content (len bytes) to a fresh temporary file; returns its path. */
static char *write_temp(const char *content, size_t len)
{
    char *path = strdup("/tmp/pd-users-XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, content, len), (ssize_t)len);
    close(fd);
    return path;
}

static pd_users_t *load_text(const char *content, char **path, pd_config_errors_t *errs)
{
    *path = write_temp(content, strlen(content));
    return pd_users_load(*path, errs);
}

static void test_users_parse(void **state)
{
    static const char text[] = "; pgbouncer-style comment\n"
                               "# another comment\n"
                               "\n"
                               "   \t\n"
                               "\"alice\" \"s3cret\"\n"
                               "\"bob\"\t\"" VERIFIER "\"\n"
                               "  \"o\"\"brien\"   \"pa\"\"ss\"\"\"  \r\n"
                               "\"carol\" \"x y z\" trailing fields are ignored\n"
                               "\"dave\" \"last line without newline\"";
    pd_config_errors_t errs = {0};
    char *path;
    pd_users_t *u = load_text(text, &path, &errs);

    assert_non_null(u);
    assert_int_equal(errs.count, 0);
    assert_int_equal(u->count, 5);

    const pd_user_t *a = pd_users_find(u, "alice");
    assert_non_null(a);
    assert_string_equal(a->secret, "s3cret");
    assert_false(a->is_scram);

    const pd_user_t *b = pd_users_find(u, "bob");
    assert_non_null(b);
    assert_string_equal(b->secret, VERIFIER);
    assert_true(b->is_scram);

    const pd_user_t *o = pd_users_find(u, "o\"brien");
    assert_non_null(o);
    assert_string_equal(o->secret, "pa\"ss\"");
    assert_false(o->is_scram);

    assert_string_equal(pd_users_find(u, "carol")->secret, "x y z");
    assert_string_equal(pd_users_find(u, "dave")->secret, "last line without newline");
    assert_null(pd_users_find(u, "mallory"));
    assert_null(pd_users_find(u, "Alice")); /* names are case-sensitive, as in PostgreSQL */
    assert_null(pd_users_find(NULL, "alice"));

    pd_users_free(u);
    unlink(path);
    free(path);
}

static void test_users_errors_name_line_not_secret(void **state)
{
    static const char text[] = "\"ok\" \"fine\"\n"       /* 1 */
                               "alice \"hunter1\"\n"     /* 2: name not quoted */
                               "\"bob\" \"hunter2\n"     /* 3: unterminated secret */
                               "\"carol\"\"hunter3\"\n"  /* 4: no space: one odd name */
                               "\"dave\" \"hunter4\"x\n" /* 5: text glued to the secret */
                               "\"erin\"\n"              /* 6: no secret */
                               "\"\" \"hunter6\"\n"      /* 7: empty name */
                               "\"frank\" \"\"\n"        /* 8: empty secret */
                               "\"gus\" hunter9\n";      /* 9: secret not quoted */
    pd_config_errors_t errs = {0};
    char *path;

    assert_null(load_text(text, &path, &errs));
    assert_int_equal(errs.count, 8);
    for (size_t i = 0; i < errs.count; i++) {
        char prefix[64];
        snprintf(prefix, sizeof prefix, "%s:%zu: ", path, i + 2);
        if (strncmp(errs.msgs[i], prefix, strlen(prefix)) != 0)
            fail_msg("error %zu is \"%s\", expected to start with \"%s\"", i, errs.msgs[i], prefix);
        if (strstr(errs.msgs[i], "hunter") != NULL)
            fail_msg("secret shown: %s", errs.msgs[i]);
    }
    assert_non_null(strstr(errs.msgs[1], "unterminated quoted secret"));
    assert_non_null(strstr(errs.msgs[4], "missing quoted secret"));
    assert_non_null(strstr(errs.msgs[6], "empty secret"));
    pd_config_errors_free(&errs);
    unlink(path);
    free(path);
}

static void test_users_duplicate(void **state)
{
    pd_config_errors_t errs = {0};
    char *path;

    assert_null(load_text("\"alice\" \"one\"\n\"alice\" \"two\"\n", &path, &errs));
    assert_int_equal(errs.count, 1);
    char *expected = NULL;
    assert_true(asprintf(&expected, "%s:2: duplicate entry for user \"alice\"", path) > 0);
    assert_string_equal(errs.msgs[0], expected);
    free(expected);
    pd_config_errors_free(&errs);
    unlink(path);
    free(path);
}

static void test_users_nul_byte(void **state)
{
    static const char text[] = "\"alice\" \"a\0b\"\n\"bob\" \"c\"\n";
    pd_config_errors_t errs = {0};
    char *path = write_temp(text, sizeof text - 1);

    assert_null(pd_users_load(path, &errs));
    assert_int_equal(errs.count, 1);
    assert_non_null(strstr(errs.msgs[0], ":1: line contains a NUL byte"));
    pd_config_errors_free(&errs);
    unlink(path);
    free(path);
}

static void test_users_empty_file_and_missing_file(void **state)
{
    pd_config_errors_t errs = {0};
    char *path;
    pd_users_t *u = load_text("", &path, &errs);

    assert_non_null(u);
    assert_int_equal(u->count, 0);
    assert_null(pd_users_find(u, "alice"));
    pd_users_free(u);
    unlink(path);
    free(path);

    assert_null(pd_users_load("/nonexistent/users.txt", &errs));
    assert_int_equal(errs.count, 1);
    assert_string_equal(errs.msgs[0],
                        "/nonexistent/users.txt: cannot open: No such file or directory");
    pd_config_errors_free(&errs);

    assert_null(pd_users_load("/tmp", &errs)); /* a directory */
    assert_int_equal(errs.count, 1);
    pd_config_errors_free(&errs);

    pd_users_free(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_users_parse),
        cmocka_unit_test(test_users_errors_name_line_not_secret),
        cmocka_unit_test(test_users_duplicate),
        cmocka_unit_test(test_users_nul_byte),
        cmocka_unit_test(test_users_empty_file_and_missing_file),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
