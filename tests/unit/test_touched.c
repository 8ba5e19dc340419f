/*
 * test_touched.c — the touched-key sets of rules/touched.h: tables start unknown, a take
 * hands over what was added and starts a fresh known set, duplicates and NULLs, the
 * bound (overflow), unknown marks, restoring after an unfinished verify, separate
 * (rule, table) pairs, and adds from several threads at once.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rules/touched.h"

static void add1(pd_touched_t *t, const char *table, const char *v)
{
    const char *key[1] = {v};
    assert_int_equal(pd_touched_add(t, "r", table, 1, key), 0);
}

/* Takes the set of ("r", table) and checks its status and its single-value keys. */
static void expect_take(pd_touched_t *t, const char *table, pd_touched_status_t status,
                        const char *const *want, size_t n)
{
    pd_touched_set_t *s = pd_touched_take(t, "r", table);
    assert_non_null(s);
    assert_int_equal(pd_touched_set_status(s), status);
    assert_int_equal(pd_touched_set_count(s), n);
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(pd_touched_set_nkey(s), 1);
        assert_string_equal(pd_touched_set_key(s, i)[0], want[i]);
    }
    assert_null(pd_touched_set_key(s, n));
    pd_touched_set_free(s);
}

static void test_unknown_until_taken(void **ctx)
{
    (void)ctx;
    pd_touched_t *t = pd_touched_new(0);
    size_t n = 99;
    assert_int_equal(pd_touched_peek(t, "r", "public.a", &n), PD_TOUCHED_UNKNOWN);
    assert_int_equal(n, 0);
    /* Writes before the first verify are not worth keeping: a full verify comes first. */
    add1(t, "public.a", "1");
    assert_int_equal(pd_touched_peek(t, "r", "public.a", &n), PD_TOUCHED_UNKNOWN);
    expect_take(t, "public.a", PD_TOUCHED_UNKNOWN, NULL, 0);
    /* After the take the set is known: writes from now on are kept, in order, once. */
    assert_int_equal(pd_touched_peek(t, "r", "public.a", &n), PD_TOUCHED_KEYS);
    assert_int_equal(n, 0);
    add1(t, "public.a", "7");
    add1(t, "public.a", "3");
    add1(t, "public.a", "7");
    add1(t, "public.a", "10");
    assert_int_equal(pd_touched_peek(t, "r", "public.a", &n), PD_TOUCHED_KEYS);
    assert_int_equal(n, 3);
    const char *want[] = {"7", "3", "10"};
    expect_take(t, "public.a", PD_TOUCHED_KEYS, want, 3);
    expect_take(t, "public.a", PD_TOUCHED_KEYS, NULL, 0);
    assert_int_equal(pd_touched_status_name(PD_TOUCHED_OVERFLOW)[0], 'o');
    pd_touched_free(t);
}

static void test_composite_keys_and_nulls(void **ctx)
{
    (void)ctx;
    pd_touched_t *t = pd_touched_new(0);
    pd_touched_set_free(pd_touched_take(t, "r", "public.c"));
    const char *k1[] = {"1", NULL}, *k2[] = {"1", ""}, *k3[] = {"1", NULL}, *k4[] = {NULL, "1"};
    assert_int_equal(pd_touched_add(t, "r", "public.c", 2, k1), 0);
    assert_int_equal(pd_touched_add(t, "r", "public.c", 2, k2), 0);
    assert_int_equal(pd_touched_add(t, "r", "public.c", 2, k3), 0);
    assert_int_equal(pd_touched_add(t, "r", "public.c", 2, k4), 0);
    pd_touched_set_t *s = pd_touched_take(t, "r", "public.c");
    assert_int_equal(pd_touched_set_status(s), PD_TOUCHED_KEYS);
    assert_int_equal(pd_touched_set_count(s), 3); /* NULL and "" are different values */
    assert_int_equal(pd_touched_set_nkey(s), 2);
    assert_null(pd_touched_set_key(s, 0)[1]);
    assert_string_equal(pd_touched_set_key(s, 1)[1], "");
    assert_null(pd_touched_set_key(s, 2)[0]);
    assert_string_equal(pd_touched_set_key(s, 2)[1], "1");
    pd_touched_set_free(s);
    pd_touched_free(t);
}

static void test_overflow_is_bounded(void **ctx)
{
    (void)ctx;
    pd_touched_t *t = pd_touched_new(3);
    pd_touched_set_free(pd_touched_take(t, "r", "public.o"));
    add1(t, "public.o", "a");
    add1(t, "public.o", "b");
    add1(t, "public.o", "c");
    add1(t, "public.o", "c"); /* a key already there does not count */
    size_t n;
    assert_int_equal(pd_touched_peek(t, "r", "public.o", &n), PD_TOUCHED_KEYS);
    assert_int_equal(n, 3);
    add1(t, "public.o", "d");
    assert_int_equal(pd_touched_peek(t, "r", "public.o", &n), PD_TOUCHED_OVERFLOW);
    assert_int_equal(n, 0); /* the keys are dropped */
    add1(t, "public.o", "e");
    expect_take(t, "public.o", PD_TOUCHED_OVERFLOW, NULL, 0);
    /* A lower maximum applies from the next add. */
    add1(t, "public.o", "x");
    add1(t, "public.o", "y");
    pd_touched_set_max(t, 1);
    add1(t, "public.o", "z");
    assert_int_equal(pd_touched_peek(t, "r", "public.o", NULL), PD_TOUCHED_OVERFLOW);
    pd_touched_free(t);
}

static void test_unknown_marks(void **ctx)
{
    (void)ctx;
    pd_touched_t *t = pd_touched_new(0);
    const char *tables[] = {"public.m", "public.n", "public.l", "public.z"};
    for (int i = 0; i < 4; i++) {
        pd_touched_set_free(pd_touched_take(t, "r", tables[i]));
        add1(t, tables[i], "1");
    }
    pd_touched_mark_unknown(t, "r", "public.m");
    const char *two[] = {"1", "2"};
    assert_int_equal(pd_touched_add(t, "r", "public.n", 2, two), 0); /* another length */
    char long_value[PD_TOUCHED_KEY_BYTES_MAX + 1];
    memset(long_value, 'x', sizeof long_value - 1);
    long_value[sizeof long_value - 1] = '\0';
    add1(t, "public.l", long_value);
    assert_int_equal(pd_touched_add(t, "r", "public.z", 0, NULL), 0); /* a keyless write */
    for (int i = 0; i < 4; i++)
        expect_take(t, tables[i], PD_TOUCHED_UNKNOWN, NULL, 0);
    pd_touched_free(t);
}

static void test_restore_after_an_unfinished_verify(void **ctx)
{
    (void)ctx;
    pd_touched_t *t = pd_touched_new(0);
    pd_touched_set_free(pd_touched_take(t, "r", "public.r"));
    add1(t, "public.r", "1");
    add1(t, "public.r", "2");
    pd_touched_set_t *taken = pd_touched_take(t, "r", "public.r");
    add1(t, "public.r", "2"); /* written again during the verify */
    add1(t, "public.r", "3");
    pd_touched_restore(t, "r", "public.r", taken);
    const char *want[] = {"2", "3", "1"};
    expect_take(t, "public.r", PD_TOUCHED_KEYS, want, 3);

    /* A taken unknown status comes back, whatever was added meanwhile. */
    pd_touched_mark_unknown(t, "r", "public.r");
    taken = pd_touched_take(t, "r", "public.r");
    add1(t, "public.r", "4");
    pd_touched_restore(t, "r", "public.r", taken);
    expect_take(t, "public.r", PD_TOUCHED_UNKNOWN, NULL, 0);
    pd_touched_restore(t, "r", "public.r", NULL);
    pd_touched_free(t);
}

static void test_rules_and_tables_are_separate(void **ctx)
{
    (void)ctx;
    pd_touched_t *t = pd_touched_new(0);
    pd_touched_set_free(pd_touched_take(t, "r", "public.a"));
    pd_touched_set_free(pd_touched_take(t, "s", "public.a"));
    add1(t, "public.a", "1");
    const char *k[] = {"2"};
    pd_touched_add(t, "s", "public.a", 1, k);
    pd_touched_add(t, "r", "public.b", 1, k); /* never taken: stays unknown */
    const char *want[] = {"1"};
    expect_take(t, "public.a", PD_TOUCHED_KEYS, want, 1);
    expect_take(t, "public.b", PD_TOUCHED_UNKNOWN, NULL, 0);
    size_t n;
    assert_int_equal(pd_touched_peek(t, "s", "public.a", &n), PD_TOUCHED_KEYS);
    assert_int_equal(n, 1);
    pd_touched_free(t);
}

#define THREADS    4
#define PER_THREAD 5000

static pd_touched_t *shared;

static void *adder(void *arg)
{
    int id = (int)(intptr_t)arg;
    for (int i = 0; i < PER_THREAD; i++) {
        char a[16], b[16];
        /* Half the keys are common to all threads, half are the thread's own. */
        snprintf(a, sizeof a, "%d", i % 2 ? id : -1);
        snprintf(b, sizeof b, "%d", i);
        const char *key[] = {a, b};
        if (pd_touched_add(shared, "r", "public.t", 2, key) != 0)
            return (void *)1;
    }
    return NULL;
}

static void test_threads(void **ctx)
{
    (void)ctx;
    shared = pd_touched_new(0);
    pd_touched_set_free(pd_touched_take(shared, "r", "public.t"));
    pthread_t th[THREADS];
    for (int i = 0; i < THREADS; i++)
        assert_int_equal(pthread_create(&th[i], NULL, adder, (void *)(intptr_t)i), 0);
    for (int i = 0; i < THREADS; i++) {
        void *rc;
        pthread_join(th[i], &rc);
        assert_null(rc);
    }
    size_t n;
    assert_int_equal(pd_touched_peek(shared, "r", "public.t", &n), PD_TOUCHED_KEYS);
    assert_int_equal(n, PER_THREAD / 2 + THREADS * PER_THREAD / 2);
    pd_touched_free(shared);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_unknown_until_taken),
        cmocka_unit_test(test_composite_keys_and_nulls),
        cmocka_unit_test(test_overflow_is_bounded),
        cmocka_unit_test(test_unknown_marks),
        cmocka_unit_test(test_restore_after_an_unfinished_verify),
        cmocka_unit_test(test_rules_and_tables_are_separate),
        cmocka_unit_test(test_threads),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
