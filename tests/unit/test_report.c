/*
 * test_report.c — the pure parts of the readiness report: time parsing, bucket widths,
 * divergence bucketed per rule and kind, the readiness checks, and HTML escaping (of the
 * page too: user text from a report never reaches it raw).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "admin/report.h"
#include "admin/report_html.h"

#define T0 1714564800000LL /* 2024-05-01T12:00:00Z */

static void test_parse_time(void **ctx)
{
    (void)ctx;
    assert_int_equal(pd_report_parse_time("2024-05-01T12:00:00Z"), T0);
    assert_int_equal(pd_report_parse_time("2024-05-01T12:00:00.250Z"), T0 + 250);
    assert_int_equal(pd_report_parse_time("2024-05-01T12:00:00.5Z"), T0 + 500);
    assert_int_equal(pd_report_parse_time("2024-05-01T12:00:01.123456Z"), T0 + 1123);
    assert_int_equal(pd_report_parse_time("2024-05-01T12:00:00"), -1);
    assert_int_equal(pd_report_parse_time("2024-05-01T12:00:00.Z"), -1);
    assert_int_equal(pd_report_parse_time("2024-05-01 12:00:00Z"), -1);
    assert_int_equal(pd_report_parse_time("2024-13-01T12:00:00Z"), -1);
    assert_int_equal(pd_report_parse_time("yesterday"), -1);
    assert_int_equal(pd_report_parse_time(NULL), -1);
    char buf[32];
    pd_report_format_time(T0 + 999, buf, sizeof buf);
    assert_string_equal(buf, "2024-05-01T12:00:00Z");
}

static void test_bucket_width(void **ctx)
{
    (void)ctx;
    /* 59 s from a whole minute fit in 60 one-second buckets; 60 s need 61. */
    assert_int_equal(pd_report_bucket_width(T0, T0 + 59000, 60), 1);
    assert_int_equal(pd_report_bucket_width(T0, T0 + 60000, 60), 5);
    /* Alignment counts: 59.5 s, but from the second it starts in, 61 one-second buckets. */
    assert_int_equal(pd_report_bucket_width(T0 + 999, T0 + 59999, 60), 1);
    assert_int_equal(pd_report_bucket_width(T0 + 999, T0 + 60500, 60), 5);
    assert_int_equal(pd_report_bucket_width(T0, T0 + 3600000, 60), 120);
    assert_int_equal(pd_report_bucket_width(T0, T0 + 59 * 3600000LL, 60), 3600);
    assert_int_equal(pd_report_bucket_width(T0, T0 + 29 * 86400000LL, 60), 43200);
    /* 30 days from noon: 61 half days, or 31 whole days from midnight. */
    assert_int_equal(pd_report_bucket_width(T0, T0 + 30 * 86400000LL, 60), 86400);
    assert_int_equal(pd_report_bucket_width(T0, T0 + 100 * 86400000LL, 60), 2 * 86400);
    assert_int_equal(pd_report_bucket_width(T0, T0, 60), 1);
    assert_int_equal(pd_report_bucket_width(T0, T0 + 10000, 0), 30); /* at least one bucket */
}

static json_t *event(const char *time, const char *rule, const char *kind)
{
    return json_pack("{s:s, s:s, s:s, s:s}", "time", time, "rule", rule, "kind", kind, "statement",
                     "UPDATE t SET v = $1");
}

static json_int_t count_at(json_t *series, size_t i, size_t bucket)
{
    return json_integer_value(
        json_array_get(json_object_get(json_array_get(series, i), "counts"), bucket));
}

static void test_divergence_buckets(void **ctx)
{
    (void)ctx;
    json_t *events = json_array();
    json_array_append_new(events, event("2024-05-01T12:00:00.100Z", "b-rule", "shadow_read"));
    json_array_append_new(events, event("2024-05-01T12:00:00.900Z", "a-rule", "write_outcome"));
    json_array_append_new(events, event("2024-05-01T12:00:04.999Z", "b-rule", "shadow_read"));
    json_array_append_new(events, event("2024-05-01T12:00:05.000Z", "b-rule", "shadow_read"));
    json_array_append_new(events, event("garbage", "b-rule", "shadow_read"));
    json_array_append_new(events, json_pack("{s:s}", "time", "2024-05-01T12:00:01Z"));
    /* now is 70 s after the first event: 5 s buckets, 15 of them. */
    json_t *d = pd_report_divergence(events, T0 + 70000, 60);
    assert_int_equal(json_integer_value(json_object_get(d, "events")), 4);
    assert_int_equal(json_integer_value(json_object_get(d, "undated")), 1);
    assert_int_equal(json_integer_value(json_object_get(d, "bucket_s")), 5);
    assert_int_equal(json_integer_value(json_object_get(d, "buckets")), 15);
    assert_string_equal(json_string_value(json_object_get(d, "start")), "2024-05-01T12:00:00Z");
    assert_string_equal(json_string_value(json_object_get(d, "end")), "2024-05-01T12:01:15Z");
    json_t *series = json_object_get(d, "series");
    assert_int_equal(json_array_size(series), 2);
    /* Sorted by rule, then kind. */
    assert_string_equal(json_string_value(json_object_get(json_array_get(series, 0), "rule")),
                        "a-rule");
    assert_string_equal(json_string_value(json_object_get(json_array_get(series, 1), "kind")),
                        "shadow_read");
    assert_int_equal(json_integer_value(json_object_get(json_array_get(series, 1), "total")), 3);
    assert_int_equal(count_at(series, 0, 0), 1);
    assert_int_equal(count_at(series, 1, 0), 2); /* .100 and 4.999 */
    assert_int_equal(count_at(series, 1, 1), 1); /* 5.000 starts the second bucket */
    assert_int_equal(count_at(series, 1, 14), 0);
    assert_int_equal(json_array_size(json_object_get(json_array_get(series, 1), "counts")), 15);
    json_decref(d);
    json_decref(events);

    json_t *none = json_array();
    d = pd_report_divergence(none, T0, 60);
    assert_int_equal(json_integer_value(json_object_get(d, "buckets")), 0);
    assert_true(json_is_null(json_object_get(d, "start")));
    assert_int_equal(json_array_size(json_object_get(d, "series")), 0);
    json_decref(d);
    json_decref(none);
}

/* The check named `name` of a verdict. */
static json_t *check(json_t *ready, const char *name)
{
    size_t i;
    json_t *c;
    json_array_foreach(json_object_get(ready, "checks"), i, c)
    {
        if (strcmp(json_string_value(json_object_get(c, "name")), name) == 0)
            return c;
    }
    fail_msg("no check %s", name);
    return NULL;
}

static bool passes(json_t *ready, const char *name)
{
    return json_is_true(json_object_get(check(ready, name), "pass"));
}

static const char *value(json_t *ready, const char *name)
{
    return json_string_value(json_object_get(check(ready, name), "value"));
}

static pd_report_inputs_t ready_inputs(pd_report_rule_t *rules, unsigned n)
{
    for (unsigned i = 0; i < n; i++)
        rules[i] = (pd_report_rule_t){.name = i ? "orders" : "users-email",
                                      .writes = PD_WRITES_DUAL,
                                      .verified = true,
                                      .verify_ok = true,
                                      .verify_time = "2024-05-01T12:00:00Z",
                                      .diverged_since = 0};
    return (pd_report_inputs_t){.rules = rules,
                                .nrules = n,
                                .want = PD_WRITES_DUAL,
                                .mirrored = true,
                                .mirrors = {.open = 2},
                                .max_queued = 100};
}

static void test_checks_ready(void **ctx)
{
    (void)ctx;
    pd_report_rule_t rules[2];
    pd_report_inputs_t in = ready_inputs(rules, 2);
    json_t *r = pd_report_checks(&in);
    assert_true(json_is_true(json_object_get(r, "ok")));
    assert_int_equal(json_array_size(json_object_get(r, "checks")), 5);
    static const char *const order[] = {"writes", "mirrors_connected", "mirrors_caught_up",
                                        "verify_ok", "no_divergence_since_verify"};
    for (size_t i = 0; i < 5; i++)
        assert_string_equal(json_string_value(json_object_get(
                                json_array_get(json_object_get(r, "checks"), i), "name")),
                            order[i]);
    assert_string_equal(value(r, "writes"), "users-email: dual, orders: dual");
    assert_string_equal(value(r, "mirrors_connected"), "2 open, 0 connecting, 0 detached");
    assert_string_equal(value(r, "verify_ok"),
                        "users-email: ok at 2024-05-01T12:00:00Z, orders: ok at "
                        "2024-05-01T12:00:00Z");
    assert_string_equal(value(r, "no_divergence_since_verify"),
                        "users-email: 0 since 2024-05-01T12:00:00Z, orders: 0 since "
                        "2024-05-01T12:00:00Z");
    json_decref(r);
}

/* Each failing input fails its own check, and the verdict, and nothing else. */
static void test_checks_each_failure(void **ctx)
{
    (void)ctx;
    pd_report_rule_t rules[2];
    struct {
        const char *check, *value;
    } cases[] = {
        {"writes", "users-email: dual, orders: dual-new"},
        {"mirrors_connected", "2 open, 0 connecting, 1 detached"},
        {"mirrors_caught_up", "101 statements queued (at most 100)"},
        {"verify_ok", "users-email: ok at 2024-05-01T12:00:00Z, orders: never verified"},
        {"verify_ok", "users-email: ok at 2024-05-01T12:00:00Z, orders: divergence left at "
                      "2024-05-01T12:00:00Z"},
        {"no_divergence_since_verify",
         "users-email: 0 since 2024-05-01T12:00:00Z, orders: 3 since 2024-05-01T12:00:00Z"},
        {"no_divergence_since_verify",
         "users-email: 0 since 2024-05-01T12:00:00Z, orders: unknown (no divergence log)"},
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        pd_report_inputs_t in = ready_inputs(rules, 2);
        switch (k) {
        case 0:
            rules[1].writes = PD_WRITES_DUAL_NEW;
            break;
        case 1:
            in.mirrors.detached = 1;
            break;
        case 2:
            in.mirrors.queued = 101;
            break;
        case 3:
            rules[1].verified = false;
            rules[1].verify_ok = false;
            break;
        case 4:
            rules[1].verify_ok = false;
            break;
        case 5:
            rules[1].diverged_since = 3;
            break;
        case 6:
            rules[1].diverged_since = -1;
            break;
        }
        json_t *r = pd_report_checks(&in);
        assert_false(json_is_true(json_object_get(r, "ok")));
        size_t i;
        json_t *c;
        json_array_foreach(json_object_get(r, "checks"), i, c)
        {
            bool mine = strcmp(json_string_value(json_object_get(c, "name")), cases[k].check) == 0;
            assert_int_equal(json_is_true(json_object_get(c, "pass")), !mine);
        }
        assert_string_equal(value(r, cases[k].check), cases[k].value);
        json_decref(r);
    }
}

static void test_checks_edges(void **ctx)
{
    (void)ctx;
    pd_report_rule_t rules[1];
    /* No rules: nothing to cut over. */
    pd_report_inputs_t in = ready_inputs(rules, 0);
    json_t *r = pd_report_checks(&in);
    assert_false(json_is_true(json_object_get(r, "ok")));
    assert_false(passes(r, "writes"));
    assert_string_equal(value(r, "writes"), "the database has no rules");
    json_decref(r);
    /* Nothing mirrored: the mirror checks pass whatever the (server-wide) totals say. */
    in = ready_inputs(rules, 1);
    in.mirrored = false;
    in.mirrors.detached = 4;
    in.mirrors.queued = 1000;
    r = pd_report_checks(&in);
    assert_true(json_is_true(json_object_get(r, "ok")));
    assert_string_equal(value(r, "mirrors_caught_up"), "nothing mirrored (no tables rules)");
    json_decref(r);
    /* Never verified: every event counts. */
    rules[0].verified = false;
    rules[0].diverged_since = 0;
    r = pd_report_checks(&in);
    assert_true(passes(r, "no_divergence_since_verify"));
    assert_string_equal(value(r, "no_divergence_since_verify"), "users-email: 0 (never verified)");
    assert_false(passes(r, "verify_ok"));
    json_decref(r);
    /* The flag wanted is an input (rollback would want dual-new). */
    in = ready_inputs(rules, 1);
    in.want = PD_WRITES_DUAL_NEW;
    r = pd_report_checks(&in);
    assert_false(passes(r, "writes"));
    assert_string_equal(json_string_value(json_object_get(check(r, "writes"), "title")),
                        "every rule at writes=dual-new");
    json_decref(r);
}

static void test_html_escape(void **ctx)
{
    (void)ctx;
    char *s = pd_html_escape("<script>alert('x&y')</script>\"");
    assert_string_equal(s, "&lt;script&gt;alert(&#39;x&amp;y&#39;)&lt;/script&gt;&quot;");
    free(s);
    s = pd_html_escape("&amp; plain ünïcode");
    assert_string_equal(s, "&amp;amp; plain ünïcode");
    free(s);
    s = pd_html_escape("");
    assert_string_equal(s, "");
    free(s);
}

/* A whole page from a report whose every text is hostile: none of it appears raw. */
static void test_html_page_escapes_user_text(void **ctx)
{
    (void)ctx;
    const char *evil = "<img src=x onerror=alert(1)>&'\"";
    json_t *events = json_array();
    json_t *ev = event("2024-05-01T12:00:01Z", evil, "shadow_read");
    json_object_set_new(ev, "statement", json_string(evil));
    json_array_append_new(events, ev);
    json_t *div = pd_report_divergence(events, T0 + 30000, 60);
    json_object_set_new(div, "logged", json_true());
    json_object_set_new(div, "recent", events);
    pd_report_rule_t rules[1];
    pd_report_inputs_t in = ready_inputs(rules, 1);
    rules[0].name = evil;
    json_t *report = json_pack(
        "{s:s, s:s, s:o, s:[{s:s, s:s, s:s, s:s, s:n, s:n, s:{}}], s:{s:i}, s:o, "
        "s:[{s:s, s:s, s:s, s:s, s:s}]}",
        "database", evil, "generated_at", "2024-05-01T12:00:30Z", "ready", pd_report_checks(&in),
        "rules", "name", evil, "kind", "tables", "writes", "dual", "reads", "old", "error",
        "last_verify", "counters", "mirrors", "open", 1, "divergence", div, "history", "time",
        "2024-05-01T12:00:02Z", "rule", evil, "writes", "dual", "reads", "old", "by", evil);
    assert_non_null(report);
    char *page = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&page, &len);
    assert_int_equal(pd_report_html(f, report), 0);
    fclose(f);
    assert_non_null(strstr(page, "<svg"));
    assert_non_null(strstr(page, "<rect"));
    assert_null(strstr(page, "<img"));
    assert_null(strstr(page, "<script"));
    assert_null(strstr(page, "http-equiv"));
    char *escaped = pd_html_escape(evil);
    /* Database (title, heading), rule (checks, chart, legend, tables), statement, by. */
    size_t seen = 0;
    for (const char *p = page; (p = strstr(p, escaped)) != NULL; p++)
        seen++;
    assert_true(seen >= 8);
    /* Self-contained: the SVG namespace is the only URL on the page. */
    size_t urls = 0;
    for (const char *p = page; (p = strstr(p, "http")) != NULL; p++)
        urls++;
    assert_int_equal(urls, 1);
    free(escaped);
    free(page);
    json_decref(report);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_time),
        cmocka_unit_test(test_bucket_width),
        cmocka_unit_test(test_divergence_buckets),
        cmocka_unit_test(test_checks_ready),
        cmocka_unit_test(test_checks_each_failure),
        cmocka_unit_test(test_checks_edges),
        cmocka_unit_test(test_html_escape),
        cmocka_unit_test(test_html_page_escapes_user_text),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
