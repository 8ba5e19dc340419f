/*
 * test_state.c — runtime state: flags survive a reopen, writes are atomic, a failed write
 * leaves memory unchanged, history is bounded, checkpoints and verify results persist, an
 * edit of several changes is all or nothing, a state without a file lives in memory.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "rules/state.h"

/* mkdtemp's template: it replaces the trailing Xs with a unique name. */
#define DIR_TEMPLATE "/tmp/pd-state-test-XXXXXX"

static char dir[sizeof DIR_TEMPLATE];
static char path[256];

static int setup(void **ctx)
{
    (void)ctx;
    memcpy(dir, DIR_TEMPLATE, sizeof dir);
    if (mkdtemp(dir) == NULL)
        return -1;
    snprintf(path, sizeof path, "%s/state.json", dir);
    return 0;
}

static int teardown(void **ctx)
{
    (void)ctx;
    char tmp[300];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    unlink(tmp);
    unlink(path);
    rmdir(dir);
    return 0;
}

static void test_flags_survive_reopen(void **ctx)
{
    (void)ctx;
    char *err = NULL;
    pd_state_t *st = pd_state_open(path, &err);
    assert_non_null(st);
    pd_writes_t w;
    pd_reads_t r;
    assert_false(pd_state_flags(st, "users-email", &w, &r));
    pd_reads_t want = {.mode = PD_READS_NEW, .percent = 25};
    assert_int_equal(pd_state_set_flags(st, "users-email", PD_WRITES_DUAL, &want, "uid 0", &err),
                     0);
    pd_state_free(st);

    st = pd_state_open(path, &err);
    assert_non_null(st);
    assert_true(pd_state_flags(st, "users-email", &w, &r));
    assert_int_equal(w, PD_WRITES_DUAL);
    assert_int_equal(r.mode, PD_READS_NEW);
    assert_int_equal(r.percent, 25);
    json_t *h = pd_state_history(st);
    assert_int_equal(json_array_size(h), 1);
    assert_string_equal(json_string_value(json_object_get(json_array_get(h, 0), "by")), "uid 0");
    json_decref(h);
    struct stat sb;
    assert_int_equal(stat(path, &sb), 0);
    assert_int_equal(sb.st_mode & 0777, 0600);
    pd_state_free(st);
}

static void test_failed_write_keeps_memory_and_disk_equal(void **ctx)
{
    (void)ctx;
    char *err = NULL;
    pd_state_t *st = pd_state_open(path, &err);
    pd_reads_t old = {.mode = PD_READS_OLD};
    assert_int_equal(pd_state_set_flags(st, "r", PD_WRITES_OLD, &old, "t", &err), 0);
    /* A directory where the temporary file goes makes the write fail, even for root. */
    char tmp[300];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    assert_int_equal(mkdir(tmp, 0700), 0);
    pd_reads_t newr = {.mode = PD_READS_NEW, .percent = 100};
    assert_int_equal(pd_state_set_flags(st, "r", PD_WRITES_NEW, &newr, "t", &err), -1);
    assert_non_null(err);
    free(err);
    rmdir(tmp);
    pd_writes_t w;
    pd_reads_t r;
    assert_true(pd_state_flags(st, "r", &w, &r));
    assert_int_equal(w, PD_WRITES_OLD);
    json_t *h = pd_state_history(st);
    assert_int_equal(json_array_size(h), 1);
    json_decref(h);
    pd_state_free(st);
    /* And the file still holds the first change. */
    st = pd_state_open(path, &err);
    assert_true(pd_state_flags(st, "r", &w, &r));
    assert_int_equal(w, PD_WRITES_OLD);
    pd_state_free(st);
}

static void test_unwritable_path_reports_error(void **ctx)
{
    (void)ctx;
    char *err = NULL;
    char bad[300];
    snprintf(bad, sizeof bad, "%s/no/such/dir/state.json", dir);
    pd_state_t *st = pd_state_open(bad, &err);
    assert_non_null(st); /* nothing to load yet */
    pd_reads_t r = {.mode = PD_READS_OLD};
    assert_int_equal(pd_state_set_flags(st, "x", PD_WRITES_DUAL, &r, "t", &err), -1);
    assert_non_null(strstr(err, "could not write state file"));
    free(err);
    pd_writes_t w;
    assert_false(pd_state_flags(st, "x", &w, &r));
    pd_state_free(st);
}

static void test_garbage_file_is_refused(void **ctx)
{
    (void)ctx;
    FILE *f = fopen(path, "w");
    fputs("[1, 2, 3]", f);
    fclose(f);
    char *err = NULL;
    assert_null(pd_state_open(path, &err));
    assert_non_null(strstr(err, "not a pgdual state file"));
    free(err);
    f = fopen(path, "w");
    fputs("{ not json", f);
    fclose(f);
    assert_null(pd_state_open(path, &err));
    assert_non_null(strstr(err, "could not read state file"));
    free(err);
}

static void test_history_is_bounded(void **ctx)
{
    (void)ctx;
    char *err = NULL;
    pd_state_t *st = pd_state_open(NULL, &err); /* memory only: fast */
    pd_reads_t r = {.mode = PD_READS_OLD};
    for (int i = 0; i < PD_STATE_HISTORY_MAX + 10; i++)
        assert_int_equal(
            pd_state_set_flags(st, "x", i % 2 ? PD_WRITES_DUAL : PD_WRITES_OLD, &r, "t", &err), 0);
    json_t *h = pd_state_history(st);
    assert_int_equal(json_array_size(h), PD_STATE_HISTORY_MAX);
    json_decref(h);
    pd_state_free(st);
}

static void test_checkpoints_and_verify_persist(void **ctx)
{
    (void)ctx;
    char *err = NULL;
    pd_state_t *st = pd_state_open(path, &err);
    json_t *cp = json_pack("{s:s, s:i}", "last_key", "[42]", "rows", 42);
    assert_int_equal(pd_state_set_checkpoint(st, "backfill/users-email", cp, &err), 0);
    json_decref(cp);
    json_t *vr = json_pack("{s:i, s:i}", "rows_checked", 100, "divergent", 3);
    assert_int_equal(pd_state_record_verify(st, "users-email", vr, &err), 0);
    json_decref(vr);
    const char *keep[] = {"other"};
    pd_state_prune(st, keep, 1);
    pd_state_free(st);

    st = pd_state_open(path, &err);
    json_t *got = pd_state_checkpoint(st, "backfill/users-email");
    assert_int_equal(json_integer_value(json_object_get(got, "rows")), 42);
    json_decref(got);
    got = pd_state_verify(st, "users-email");
    assert_int_equal(json_integer_value(json_object_get(got, "divergent")), 3);
    json_decref(got);
    assert_int_equal(pd_state_set_checkpoint(st, "backfill/users-email", NULL, &err), 0);
    assert_null(pd_state_checkpoint(st, "backfill/users-email"));
    pd_state_free(st);
}

/* One edit that flips two rules and records the event: all of it, or (failing) none. */
static int flip_two(json_t *doc, void *arg)
{
    const pd_reads_t *reads = arg;
    if (pd_state_doc_set_flags(doc, "a", PD_WRITES_DUAL_NEW, reads, "uid 0") != 0 ||
        pd_state_doc_set_flags(doc, "b", PD_WRITES_DUAL_NEW, reads, "uid 0") != 0)
        return -1;
    json_t *fields = json_pack("{s:s}", "database", "shop");
    int rc = pd_state_doc_event(doc, "switchover", "uid 0", fields); /* copies the fields */
    json_decref(fields);
    return rc;
}

static int half_then_fail(json_t *doc, void *arg)
{
    const pd_reads_t *reads = arg;
    pd_state_doc_set_flags(doc, "a", PD_WRITES_NEW, reads, "uid 0");
    return -1; /* e.g. out of memory midway */
}

static void test_edit_is_all_or_nothing(void **ctx)
{
    (void)ctx;
    char *err = NULL;
    pd_state_t *st = pd_state_open(path, &err);
    assert_non_null(st);
    assert_false(pd_state_shared(st));
    pd_reads_t reads = {.mode = PD_READS_NEW, .percent = 100};
    assert_int_equal(pd_state_edit(st, NULL, NULL, flip_two, &reads, &err), 0);
    pd_writes_t w;
    pd_reads_t r;
    assert_true(pd_state_flags(st, "a", &w, &r));
    assert_int_equal(w, PD_WRITES_DUAL_NEW);
    assert_true(pd_state_flags(st, "b", &w, &r));
    assert_int_equal(r.mode, PD_READS_NEW);
    json_t *h = pd_state_history(st);
    assert_int_equal(json_array_size(h), 3);
    assert_string_equal(json_string_value(json_object_get(json_array_get(h, 2), "event")),
                        "switchover");
    assert_string_equal(json_string_value(json_object_get(json_array_get(h, 2), "database")),
                        "shop");
    json_decref(h);
    /* A failing edit changes nothing, in memory or on disk, even what it did before failing. */
    assert_int_equal(pd_state_edit(st, NULL, NULL, half_then_fail, &reads, &err), -1);
    assert_non_null(err);
    free(err);
    err = NULL;
    assert_true(pd_state_flags(st, "a", &w, &r));
    assert_int_equal(w, PD_WRITES_DUAL_NEW);
    pd_state_free(st);
    st = pd_state_open(path, &err);
    assert_non_null(st);
    assert_true(pd_state_flags(st, "a", &w, &r));
    assert_int_equal(w, PD_WRITES_DUAL_NEW);
    h = pd_state_history(st);
    assert_int_equal(json_array_size(h), 3);
    json_decref(h);
    assert_int_equal(pd_state_version(st), 0); /* versions are the shared state's */
    assert_int_equal(pd_state_refresh(st, &err), 0);
    pd_state_free(st);
}

static void test_memory_only_state(void **ctx)
{
    (void)ctx;
    char *err = NULL;
    pd_state_t *st = pd_state_open(NULL, &err);
    assert_non_null(st);
    pd_reads_t reads = {.mode = PD_READS_OLD};
    assert_int_equal(pd_state_set_flags(st, "r", PD_WRITES_DUAL, &reads, "t", &err), 0);
    pd_writes_t w;
    pd_reads_t r;
    assert_true(pd_state_flags(st, "r", &w, &r));
    assert_int_equal(w, PD_WRITES_DUAL);
    assert_int_equal(access(path, F_OK), -1); /* nothing written anywhere */
    pd_state_free(st);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_flags_survive_reopen, setup, teardown),
        cmocka_unit_test_setup_teardown(test_failed_write_keeps_memory_and_disk_equal, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_unwritable_path_reports_error, setup, teardown),
        cmocka_unit_test_setup_teardown(test_garbage_file_is_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_history_is_bounded, setup, teardown),
        cmocka_unit_test_setup_teardown(test_checkpoints_and_verify_persist, setup, teardown),
        cmocka_unit_test_setup_teardown(test_edit_is_all_or_nothing, setup, teardown),
        cmocka_unit_test_setup_teardown(test_memory_only_state, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
