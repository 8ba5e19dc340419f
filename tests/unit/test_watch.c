/*
 * test_watch.c — the options of switchover --watch (admin/watch.h): durations, divergence
 * counts and error rates accepted and refused, the combinations refused with what to do,
 * and the plan step a dry run shows.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <string.h>

#include "admin/watch.h"

static int opt(pd_watch_opts_t *o, const char *flag, const char *value, char *msg)
{
    return pd_watch_option(flag, value, o, msg, 256);
}

static void test_durations(void **ctx)
{
    (void)ctx;
    static const struct {
        const char *text;
        uint64_t ms;
    } ok[] = {{"90s", 90000}, {"10m", 600000}, {"1h", 3600000},
              {"45", 45000},  {"1", 1000},     {"168h", 7 * 24 * 3600 * 1000ULL}};
    char msg[256];
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        pd_watch_opts_t o;
        pd_watch_opts_init(&o);
        assert_int_equal(opt(&o, "--watch", ok[i].text, msg), 1);
        assert_int_equal(o.window_ms, ok[i].ms);
    }
    static const char *const bad[] = {"0", "0s", "10x", "", "-5", "1.5m", "169h", "10 m", "m"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        pd_watch_opts_t o;
        pd_watch_opts_init(&o);
        assert_int_equal(opt(&o, "--watch", bad[i], msg), -1);
        assert_non_null(strstr(msg, "--watch takes a duration such as 90s, 10m or 1h"));
        assert_int_equal(o.window_ms, 0);
    }
}

static void test_thresholds(void **ctx)
{
    (void)ctx;
    pd_watch_opts_t o;
    pd_watch_opts_init(&o);
    char msg[256];
    assert_int_equal(o.max_divergence, -1);
    assert_true(o.max_error_rate < 0);
    assert_int_equal(opt(&o, "--max-divergence", "0", msg), 1);
    assert_int_equal(o.max_divergence, 0);
    assert_int_equal(opt(&o, "--max-divergence", "25", msg), 1);
    assert_int_equal(o.max_divergence, 25);
    assert_int_equal(opt(&o, "--max-divergence", "-1", msg), -1);
    assert_int_equal(opt(&o, "--max-divergence", "3x", msg), -1);
    assert_non_null(strstr(msg, "--max-divergence takes a whole number"));
    assert_int_equal(opt(&o, "--max-error-rate", "0.05", msg), 1);
    assert_true(o.max_error_rate > 0.0499 && o.max_error_rate < 0.0501);
    assert_int_equal(opt(&o, "--max-error-rate", "5%", msg), 1);
    assert_true(o.max_error_rate > 0.0499 && o.max_error_rate < 0.0501);
    assert_int_equal(opt(&o, "--max-error-rate", "0", msg), 1);
    assert_true(o.max_error_rate == 0);
    assert_int_equal(opt(&o, "--max-error-rate", "1", msg), 1);
    static const char *const bad[] = {"1.5", "101%", "-0.1", "nan", "inf", "0.1x", "", "%"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(opt(&o, "--max-error-rate", bad[i], msg), -1);
        assert_non_null(strstr(msg, "--max-error-rate takes errors per request from 0 to 1"));
    }
    assert_int_equal(opt(&o, "--timeout", "5", msg), 0); /* not ours */
    assert_true(pd_watch_is_option("--max-error-rate"));
    assert_false(pd_watch_is_option("--force"));
}

static void test_combinations(void **ctx)
{
    (void)ctx;
    pd_watch_opts_t o;
    const char *hint = NULL;
    pd_watch_opts_init(&o);
    assert_null(pd_watch_opts_error(&o, &hint)); /* no watch at all */
    o.max_divergence = 0;
    assert_non_null(strstr(pd_watch_opts_error(&o, &hint), "give --watch DURATION too"));
    assert_non_null(strstr(hint, "--watch 10m"));
    pd_watch_opts_init(&o);
    o.window_ms = 60000;
    assert_string_equal(pd_watch_opts_error(&o, &hint), "--watch needs a threshold to watch");
    assert_string_equal(hint, "Add --max-divergence N, --max-error-rate R, or both.");
    o.max_error_rate = 0.1;
    assert_null(pd_watch_opts_error(&o, &hint));
}

static void test_plan(void **ctx)
{
    (void)ctx;
    pd_watch_opts_t o;
    pd_watch_opts_init(&o);
    o.window_ms = 600000;
    o.max_divergence = 0;
    o.max_error_rate = 0.02;
    char buf[512];
    pd_watch_plan(&o, buf, sizeof buf);
    assert_string_equal(buf, "watch for 600 s after the flip: roll back on more than 0 "
                             "divergence events, or an error rate above the rate before plus "
                             "0.02 (after 100 requests)");
    o.max_error_rate = -1;
    pd_watch_plan(&o, buf, sizeof buf);
    assert_string_equal(
        buf, "watch for 600 s after the flip: roll back on more than 0 divergence events");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_durations),
        cmocka_unit_test(test_thresholds),
        cmocka_unit_test(test_combinations),
        cmocka_unit_test(test_plan),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
