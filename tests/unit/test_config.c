/*
 * test_config.c — the configuration loader (rules/config.c): every file of
 * tests/config/valid loads, every file of tests/config/invalid fails with exactly the error
 * its first line announces (`# expect: LINE:COLUMN: message`), defaults and paths come out
 * as config.h promises, several faults are all reported, and secrets never reach messages.
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
#include <unistd.h>

#include "protocol/wire.h"
#include "rules/config.h"
#include "rules/flags.h"

/* ---------------------------------------------------------------------------------------
 * Helpers.
 */
static char *source_path(const char *rel)
{
    const char *root = getenv("PD_SOURCE_DIR");
    char *out = NULL;
    assert_non_null(root); /* set by tests/CMakeLists.txt */
    assert_true(asprintf(&out, "%s/%s", root, rel) > 0);
    return out;
}

static int is_yaml(const struct dirent *e)
{
    size_t n = strlen(e->d_name);
    return e->d_name[0] != '.' && n > 5 && strcmp(e->d_name + n - 5, ".yaml") == 0;
}

/* The sorted *.yaml file names of a tests/config folder. */
static int list_yaml(const char *dir, struct dirent ***out)
{
    int n = scandir(dir, out, is_yaml, alphasort);
    assert_true(n >= 0);
    return n;
}

static void free_list(struct dirent **list, int n)
{
    for (int i = 0; i < n; i++)
        free(list[i]);
    free(list);
}

/* The text after "# expect: " on the first line of path. */
static char *read_expectation(const char *path)
{
    char line[512];
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    assert_non_null(fgets(line, sizeof line, f));
    fclose(f);
    line[strcspn(line, "\n")] = '\0';
    const char *tag = "# expect: ";
    if (strncmp(line, tag, strlen(tag)) != 0)
        fail_msg("%s: first line must be \"# expect: LINE:COLUMN: message\"", path);
    return strdup(line + strlen(tag));
}

static bool starts_with_position(const char *s)
{
    unsigned line, col;
    int used = 0;
    return sscanf(s, "%u:%u: %n", &line, &col, &used) == 2 && used > 0 && line > 0 && col > 0;
}

static bool errors_contain(const pd_config_errors_t *errs, const char *needle)
{
    for (size_t i = 0; i < errs->count; i++)
        if (strstr(errs->msgs[i], needle) != NULL)
            return true;
    return false;
}

static void print_errors(const pd_config_errors_t *errs)
{
    for (size_t i = 0; i < errs->count; i++)
        print_message("  %s\n", errs->msgs[i]);
}

static pd_config_t *load_ok(const char *rel)
{
    pd_config_errors_t errs = {0};
    char *path = source_path(rel);
    pd_config_t *cfg = pd_config_load(path, &errs);
    if (cfg == NULL)
        print_errors(&errs);
    assert_non_null(cfg);
    assert_int_equal(errs.count, 0);
    free(path);
    return cfg;
}

static pd_config_t *load_text(const char *yaml, pd_config_errors_t *errs)
{
    return pd_config_load_string(yaml, strlen(yaml), "t.yaml", errs);
}

/* The directory relative paths of a file in rel_dir resolve against: PD_SOURCE_DIR is
   absolute, so the loader joins the same strings. */
static char *source_dir(const char *rel_dir)
{
    return source_path(rel_dir);
}

/* ---------------------------------------------------------------------------------------
 * The two folders.
 */
static void test_valid_files_load(void **state)
{
    char *dir = source_path("tests/config/valid");
    struct dirent **list;
    int n = list_yaml(dir, &list);

    assert_true(n >= 6);
    for (int i = 0; i < n; i++) {
        char *path = NULL;
        pd_config_errors_t errs = {0};
        assert_true(asprintf(&path, "%s/%s", dir, list[i]->d_name) > 0);
        pd_config_t *cfg = pd_config_load(path, &errs);
        if (cfg == NULL) {
            print_errors(&errs);
            fail_msg("%s should load", path);
        }
        assert_int_equal(errs.count, 0);
        assert_true(cfg->database_count >= 1);
        assert_string_equal(cfg->path, path);
        pd_config_free(cfg);
        free(path);
    }
    free_list(list, n);
    free(dir);
}

static void check_invalid_file(const char *path)
{
    pd_config_errors_t errs = {0};
    char *expect = read_expectation(path);
    pd_config_t *cfg = pd_config_load(path, &errs);
    size_t plen = strlen(path);

    /* A file that loads must have initial flags the server refuses (as --check says). */
    if (cfg != NULL && pd_flags_check_config(cfg, &errs) == 0)
        fail_msg("%s should not load", path);
    pd_config_free(cfg);
    assert_true(starts_with_position(expect));
    /* One fault per file, so one error: no cascades of follow-up messages. */
    if (errs.count != 1 || strstr(errs.msgs[0], expect) == NULL) {
        print_errors(&errs);
        fail_msg("%s: expected exactly one error containing: %s", path, expect);
    }
    /* The error names the file, then line and column. */
    assert_memory_equal(errs.msgs[0], path, plen);
    assert_int_equal(errs.msgs[0][plen], ':');
    assert_true(starts_with_position(errs.msgs[0] + plen + 1));
    pd_config_errors_free(&errs);
    free(expect);
}

static void test_invalid_files_fail_with_expected_error(void **state)
{
    char *dir = source_path("tests/config/invalid");
    struct dirent **list;
    int n = list_yaml(dir, &list);

    assert_true(n >= 40);
    for (int i = 0; i < n; i++) {
        char *path = NULL;
        assert_true(asprintf(&path, "%s/%s", dir, list[i]->d_name) > 0);
        check_invalid_file(path);
        free(path);
    }
    free_list(list, n);
    free(dir);
}

/* ---------------------------------------------------------------------------------------
 * Values.
 */
static void test_full_example_values(void **state)
{
    pd_config_t *cfg = load_ok("tests/config/valid/full.yaml");
    char *dir = source_dir("tests/config/valid");
    char *expect = NULL;

    assert_string_equal(cfg->listen_host, "127.0.0.1");
    assert_int_equal(cfg->listen_port, 6432);
    assert_true(cfg->tls_configured);
    assert_int_equal(cfg->tls_mode, PD_TLS_ALLOW);
    assert_true(asprintf(&expect, "%s/server.crt", dir) > 0);
    assert_string_equal(cfg->tls_cert, expect);
    free(expect);
    assert_true(asprintf(&expect, "%s/server.key", dir) > 0);
    assert_string_equal(cfg->tls_key, expect);
    free(expect);
    assert_int_equal(cfg->auth_mode, PD_AUTH_SCRAM);
    assert_true(asprintf(&expect, "%s/users.txt", dir) > 0);
    assert_string_equal(cfg->users_file, expect);
    free(expect);
    assert_string_equal(cfg->admin_socket, "/run/pgdual/admin.sock");
    assert_string_equal(cfg->admin_metrics, "127.0.0.1:9187");
    assert_string_equal(cfg->state, "/var/lib/pgdual/state.json");
    assert_null(cfg->state_conninfo);
    assert_string_equal(cfg->divergence_log, "/var/lib/pgdual/divergence.jsonl");
    assert_true(cfg->shadow_sample > 0.0999 && cfg->shadow_sample < 0.1001);
    assert_int_equal(cfg->shadow_budget_ms, 1000);

    assert_int_equal(cfg->database_count, 1);
    assert_string_equal(cfg->databases[0].name, "app");
    assert_string_equal(cfg->databases[0].old, "host=10.0.0.5 dbname=app");
    assert_string_equal(cfg->databases[0].new, "host=10.0.0.6 dbname=app");

    assert_int_equal(cfg->rule_count, 2);
    const pd_rule_cfg_t *r = &cfg->rules[0];
    assert_string_equal(r->name, "users-email");
    assert_string_equal(r->database, "app");
    assert_int_equal(r->kind, PD_RULE_COLUMNS);
    assert_string_equal(r->table, "public.users");
    assert_int_equal(r->key_count, 1);
    assert_string_equal(r->key[0], "id");
    assert_int_equal(r->column_count, 1);
    assert_string_equal(r->columns[0].old, "email");
    assert_string_equal(r->columns[0].new, "email_address");
    assert_string_equal(r->columns[0].up, "lower(email)");
    assert_string_equal(r->columns[0].down, "email_address");
    assert_int_equal(r->table_count, 0);
    assert_int_equal(r->writes, PD_WRITES_DUAL);
    assert_int_equal(r->reads.mode, PD_READS_OLD);
    assert_int_equal(r->commit, PD_COMMIT_ASYNC);
    assert_int_equal(r->on_failure, PD_ON_FAILURE_RECORD);
    assert_int_equal(r->line, 13);

    r = &cfg->rules[1];
    assert_string_equal(r->name, "orders-to-green");
    assert_int_equal(r->kind, PD_RULE_TABLES);
    assert_null(r->table);
    assert_int_equal(r->key_count, 0);
    assert_int_equal(r->column_count, 0);
    assert_int_equal(r->table_count, 2);
    assert_string_equal(r->tables[0], "public.orders");
    assert_string_equal(r->tables[1], "public.order_items");
    assert_int_equal(r->line, 22);

    free(dir);
    pd_config_free(cfg);
}

/* The commented example shipped in deploy/ must stay loadable, and say what it shows. */
static void test_deploy_example_loads(void **state)
{
    pd_config_t *cfg = load_ok("deploy/pgdual.example.yaml");

    assert_int_equal(cfg->tls_mode, PD_TLS_ALLOW);
    assert_int_equal(cfg->auth_mode, PD_AUTH_SCRAM);
    assert_int_equal(cfg->max_message_size, 67108864);
    assert_int_equal(cfg->database_count, 2);
    assert_null(cfg->databases[1].new);
    assert_int_equal(cfg->rule_count, 2);
    assert_int_equal(cfg->rules[1].reads.mode, PD_READS_SHADOW);
    assert_int_equal(cfg->shutdown_grace_ms, 30000);
    pd_config_free(cfg);

    /* The /etc/pgdual/pgdual.yaml of deploy/systemd: writes only where the unit lets it. */
    cfg = load_ok("deploy/pgdual.yaml");
    assert_string_equal(cfg->admin_socket, "/run/pgdual/admin.sock");
    assert_string_equal(cfg->state, "/var/lib/pgdual/state.json");
    assert_string_equal(cfg->divergence_log, "/var/lib/pgdual/divergence.jsonl");
    assert_int_equal(cfg->shutdown_grace_ms, 30000);
    assert_int_equal(cfg->rule_count, 0);
    pd_config_free(cfg);
}

static void test_defaults(void **state)
{
    pd_config_t *cfg = load_ok("tests/config/valid/minimal.yaml");

    assert_string_equal(cfg->listen_host, "127.0.0.1");
    assert_int_equal(cfg->listen_port, 6432);
    assert_false(cfg->tls_configured);
    assert_int_equal(cfg->tls_mode, PD_TLS_DISABLE);
    assert_null(cfg->tls_cert);
    assert_null(cfg->tls_key);
    assert_int_equal(cfg->auth_mode, PD_AUTH_TRUST);
    assert_null(cfg->users_file);
    assert_null(cfg->admin_socket);
    assert_null(cfg->admin_metrics);
    assert_null(cfg->state);
    assert_null(cfg->state_conninfo);
    assert_null(cfg->divergence_log);
    assert_true(cfg->shadow_sample > 0.0999 && cfg->shadow_sample < 0.1001);
    assert_int_equal(cfg->max_clients, 1000);
    assert_int_equal(cfg->max_message_size, PD_MSG_MAX_LEN);
    assert_int_equal(cfg->startup_timeout_ms, 60000);
    assert_int_equal(cfg->shutdown_grace_ms, 30000);
    assert_int_equal(cfg->relay_threads, 1);
    assert_int_equal(cfg->log_level, PD_LOG_INFO);
    assert_int_equal(cfg->database_count, 1);
    assert_null(cfg->databases[0].new);
    assert_int_equal(cfg->rule_count, 0);
    assert_null(cfg->rules);
    pd_config_free(cfg);
}

static void test_tls_without_mode_is_allow_and_paths_resolve(void **state)
{
    pd_config_t *cfg = load_ok("tests/config/valid/tls-default-mode.yaml");
    char *dir = source_dir("tests/config/valid");
    char *cert = NULL, *key = NULL;

    assert_true(asprintf(&cert, "%s/certs/server.crt", dir) > 0);
    assert_true(asprintf(&key, "%s/certs/server.key", dir) > 0); /* "./" dropped */
    assert_true(cfg->tls_configured);
    assert_int_equal(cfg->tls_mode, PD_TLS_ALLOW);
    assert_string_equal(cfg->tls_cert, cert);
    assert_string_equal(cfg->tls_key, key);
    free(cert);
    free(key);
    free(dir);
    pd_config_free(cfg);

    cfg = load_ok("tests/config/valid/tls.yaml");
    assert_int_equal(cfg->tls_mode, PD_TLS_REQUIRE);
    assert_string_equal(cfg->tls_cert, "/etc/pgdual/tls/server.crt"); /* absolute: kept */
    assert_string_equal(cfg->listen_host, "0.0.0.0");
    assert_int_equal(cfg->listen_port, 5433);
    pd_config_free(cfg);
}

static void test_state_limits_log_and_flags(void **state)
{
    pd_config_t *cfg = load_ok("tests/config/valid/state-postgres.yaml");

    assert_string_equal(cfg->state, "postgres");
    assert_string_equal(cfg->state_conninfo, "host=10.0.0.9 dbname=pgdual_flags");
    assert_int_equal(cfg->max_clients, 5000);
    assert_int_equal(cfg->max_message_size, 1048576);
    assert_int_equal(cfg->startup_timeout_ms, 15000);
    assert_int_equal(cfg->shutdown_grace_ms, 0);
    assert_int_equal(cfg->relay_threads, 4);
    assert_int_equal(cfg->log_level, PD_LOG_WARNING);
    assert_true(cfg->shadow_sample == 1.0);
    assert_int_equal(cfg->shadow_budget_ms, 250);
    assert_int_equal(cfg->rule_count, 1);
    assert_int_equal(cfg->rules[0].writes, PD_WRITES_DUAL_NEW);
    assert_int_equal(cfg->rules[0].reads.mode, PD_READS_NEW);
    assert_int_equal(cfg->rules[0].reads.percent, 100);
    assert_int_equal(cfg->rules[0].commit, PD_COMMIT_LOCKSTEP);
    assert_int_equal(cfg->rules[0].on_failure, PD_ON_FAILURE_FAIL);
    assert_int_equal(cfg->rules[0].table_count, 0); /* omitted: every table */
    pd_config_free(cfg);
}

static void test_anchors_and_state_word(void **state)
{
    pd_config_t *cfg = load_ok("tests/config/valid/anchors.yaml");

    assert_string_equal(cfg->state, "postgres");
    assert_null(cfg->state_conninfo);
    assert_int_equal(cfg->database_count, 2);
    assert_string_equal(cfg->databases[1].old, "host=10.0.0.5 dbname=app");
    assert_string_equal(cfg->databases[1].new, "host=10.0.0.6 dbname=app");
    assert_int_equal(cfg->rule_count, 2);
    assert_int_equal(cfg->rules[0].writes, PD_WRITES_NEW);
    assert_int_equal(cfg->rules[0].reads.mode, PD_READS_NEW);
    assert_int_equal(cfg->rules[0].reads.percent, 100);
    assert_string_equal(cfg->rules[0].columns[0].up, "lower(email)");
    assert_null(cfg->rules[0].columns[0].down);
    assert_int_equal(cfg->rules[1].key_count, 1);
    assert_string_equal(cfg->rules[1].key[0], "id");
    assert_int_equal(cfg->rules[1].writes, PD_WRITES_OLD); /* default */
    assert_int_equal(cfg->rules[1].reads.mode, PD_READS_SHADOW);
    assert_null(cfg->rules[1].columns[0].up);
    assert_int_equal(cfg->rules[1].line, 22);
    pd_config_free(cfg);
}

static void test_scram_and_log_level(void **state)
{
    pd_config_t *cfg = load_ok("tests/config/valid/scram.yaml");
    char *dir = source_dir("tests/config/valid");
    char *users = NULL;

    assert_true(asprintf(&users, "%s/secrets/users.txt", dir) > 0);
    assert_int_equal(cfg->auth_mode, PD_AUTH_SCRAM);
    assert_string_equal(cfg->users_file, users);
    assert_int_equal(cfg->log_level, PD_LOG_DEBUG);
    free(users);
    free(dir);
    pd_config_free(cfg);
}

/* ---------------------------------------------------------------------------------------
 * Faults.
 */
static const char several_faults[] = "lisen: { port: 6432 }\n"
                                     "listen: { port: 0 }\n"
                                     "tls: { mode: require }\n"
                                     "auth: { mode: scram }\n"
                                     "divergence: { shadow_sample: 2, shadow_budget_ms: 0 }\n"
                                     "limits: { max_message_size: 10 }\n"
                                     "databases:\n"
                                     "  - { name: app, old: \"host=x password=hunter2\" }\n"
                                     "  - { name: app, old: \"dbname=b\" }\n"
                                     "rules:\n"
                                     "  - name: a\n"
                                     "    database: nope\n"
                                     "    kind: columns\n"
                                     "    writes: sometimes\n"
                                     "    reads: later\n"
                                     "  - name: a\n"
                                     "    database: app\n"
                                     "    kind: tables\n"
                                     "    mirror: { commit: sync, on_failure: shrug }\n";

static void test_several_faults_all_reported_in_file_order(void **state)
{
    static const char *const expected[] = {
        "t.yaml:1:1: unknown key \"lisen\" at the top level (did you mean \"listen\"?)",
        "t.yaml:2:17: invalid value \"0\" for \"port\"",
        "t.yaml:3:14: tls mode require needs \"cert\" and \"key\"",
        "t.yaml:4:15: auth mode scram needs \"users_file\"",
        "t.yaml:5:30: invalid value \"2\" for \"shadow_sample\" (expected a number from 0 to 1)",
        "t.yaml:5:51: invalid value \"0\" for \"shadow_budget_ms\" (expected a whole number of "
        "milliseconds from 1 to 4294967295)",
        "t.yaml:6:29: invalid value \"10\" for \"max_message_size\"",
        "t.yaml:9:13: duplicate database name \"app\" (first defined on line 8)",
        "t.yaml:11:5: rule \"a\" is kind columns and needs \"table\"",
        "t.yaml:11:5: rule \"a\" is kind columns and needs \"key\"",
        "t.yaml:11:5: rule \"a\" is kind columns and needs \"columns\"",
        "t.yaml:12:15: rule \"a\" names database \"nope\", which is not in \"databases\"",
        "t.yaml:14:13: invalid value \"sometimes\" for \"writes\"",
        "t.yaml:15:12: invalid value \"later\" for \"reads\"",
        "t.yaml:16:11: duplicate rule name \"a\" (first defined on line 11)",
        "t.yaml:18:11: rule \"a\" is kind tables, which moves data to a second database",
        "t.yaml:19:23: invalid value \"sync\" for \"commit\" (expected async or lockstep)",
        "t.yaml:19:41: invalid value \"shrug\" for \"on_failure\" (expected record or fail)",
    };
    pd_config_errors_t errs = {0};

    assert_null(load_text(several_faults, &errs));
    if (errs.count != sizeof expected / sizeof expected[0])
        print_errors(&errs);
    assert_int_equal(errs.count, sizeof expected / sizeof expected[0]);
    for (size_t i = 0; i < errs.count; i++)
        if (strncmp(errs.msgs[i], expected[i], strlen(expected[i])) != 0)
            fail_msg("error %zu is \"%s\", expected \"%s...\"", i, errs.msgs[i], expected[i]);
    assert_false(errors_contain(&errs, "hunter2"));
    pd_config_errors_free(&errs);
    assert_int_equal(errs.count, 0);
    assert_null(errs.msgs);
}

static void test_errors_never_show_secrets(void **state)
{
    static const char *const texts[] = {
        /* a conninfo under an enum key */
        "databases: [{ name: app, old: \"dbname=app\" }]\n"
        "log: { level: \"host=db password=hunter2\" }\n",
        /* a URI with credentials where a port belongs */
        "listen: { port: \"postgres://u:hunter2@db/app\" }\n"
        "databases: [{ name: app, old: \"dbname=app\" }]\n",
        /* a conninfo pasted as a key */
        "databases: [{ name: app, old: \"dbname=app\" }]\n"
        "\"host=db password=hunter2\": 1\n",
        /* a conninfo as a rule name */
        "databases: [{ name: app, old: \"dbname=app\", new: \"dbname=b\" }]\n"
        "rules: [{ name: \"user=x password=hunter2\", database: app, kind: tables }]\n",
    };
    for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++) {
        pd_config_errors_t errs = {0};
        assert_null(load_text(texts[i], &errs));
        assert_int_equal(errs.count, 1);
        assert_true(starts_with_position(errs.msgs[0] + strlen("t.yaml:")));
        if (strstr(errs.msgs[0], "hunter2") != NULL)
            fail_msg("secret shown: %s", errs.msgs[0]);
        pd_config_errors_free(&errs);
    }
}

static void test_many_faults_are_capped(void **state)
{
    char *text = NULL;
    size_t size = 0;
    FILE *f = open_memstream(&text, &size);
    pd_config_errors_t errs = {0};

    assert_non_null(f);
    fprintf(f, "databases: [{ name: app, old: \"dbname=app\" }]\n");
    for (int i = 0; i < 150; i++)
        fprintf(f, "junk%d: 1\n", i);
    fclose(f);
    assert_null(pd_config_load_string(text, size, "t.yaml", &errs));
    assert_int_equal(errs.count, 101);
    assert_string_equal(errs.msgs[0], "t.yaml:2:1: unknown key \"junk0\" at the top level "
                                      "(valid keys: listen, tls, auth, admin, state, "
                                      "divergence, limits, log, databases, rules)");
    assert_string_equal(errs.msgs[100], "t.yaml:102:1: 50 more errors from here on are not shown");
    pd_config_errors_free(&errs);
    free(text);
}

/* Values are quoted with escapes, so a message stays one unambiguous line. */
static void test_echoed_values_are_escaped(void **state)
{
    static const char text[] = "databases: [{ name: app, old: \"dbname=app\", new: \"x=y\" }]\n"
                               "rules: [{ name: 'a\"b', database: app, kind: tables }]\n";
    pd_config_errors_t errs = {0};

    assert_null(load_text(text, &errs));
    assert_int_equal(errs.count, 1);
    assert_string_equal(errs.msgs[0], "t.yaml:2:17: invalid value \"a\\\"b\" for \"name\" "
                                      "(expected a name without spaces, quotes or backslashes)");
    pd_config_errors_free(&errs);
}

static void test_errors_are_appended(void **state)
{
    pd_config_errors_t errs = {0};

    assert_null(load_text("databases: []\n", &errs));
    assert_int_equal(errs.count, 1);
    assert_null(load_text("listen: 1\ndatabases: []\n", &errs));
    assert_int_equal(errs.count, 3);
    assert_string_equal(errs.msgs[0], "t.yaml:1:12: \"databases\" needs at least one entry");
    assert_string_equal(errs.msgs[1],
                        "t.yaml:1:9: \"listen\" must be a mapping, not a single value");
    pd_config_errors_free(&errs);
    assert_int_equal(errs.count, 0);
    pd_config_errors_free(&errs); /* twice is harmless */

    /* Without an error list the result is still NULL. */
    assert_null(load_text("databases: []\n", NULL));
}

static void test_missing_file(void **state)
{
    pd_config_errors_t errs = {0};

    assert_null(pd_config_load("/nonexistent/pgdual.yaml", &errs));
    assert_int_equal(errs.count, 1);
    assert_string_equal(errs.msgs[0], "/nonexistent/pgdual.yaml: No such file or directory");
    pd_config_errors_free(&errs);
}

static void test_load_string_resolves_against_cwd(void **state)
{
    static const char text[] = "tls: { cert: certs/a.crt, key: /etc/ssl/a.key }\n"
                               "auth: { mode: scram, users_file: users.txt }\n"
                               "databases: [{ name: app, old: \"dbname=app\" }]\n";
    pd_config_errors_t errs = {0};
    char *cwd = getcwd(NULL, 0);
    char *cert = NULL, *users = NULL;
    pd_config_t *cfg = load_text(text, &errs);

    assert_non_null(cfg);
    assert_true(asprintf(&cert, "%s/certs/a.crt", cwd) > 0);
    assert_true(asprintf(&users, "%s/users.txt", cwd) > 0);
    assert_string_equal(cfg->tls_cert, cert);
    assert_string_equal(cfg->tls_key, "/etc/ssl/a.key");
    assert_string_equal(cfg->users_file, users);
    assert_string_equal(cfg->path, "t.yaml");
    free(cert);
    free(users);
    free(cwd);
    pd_config_free(cfg);
}

static void test_config_database_lookup(void **state)
{
    pd_config_t *cfg = load_ok("tests/config/valid/anchors.yaml");

    const pd_database_cfg_t *db = pd_config_database(cfg, "reporting");
    assert_non_null(db);
    assert_ptr_equal(db, &cfg->databases[1]);
    assert_null(pd_config_database(cfg, "nope"));
    assert_null(pd_config_database(NULL, "app"));
    pd_config_free(cfg);
    pd_config_free(NULL);
}

/* ---------------------------------------------------------------------------------------
 * Flag values.
 */
static void test_reads_parse_and_format(void **state)
{
    static const struct {
        const char *text;
        pd_reads_mode_t mode;
        unsigned percent;
        const char *formatted;
    } good[] = {
        {"old", PD_READS_OLD, 0, "old"},       {"shadow", PD_READS_SHADOW, 0, "shadow"},
        {"aa", PD_READS_AA, 0, "aa"},          {"new", PD_READS_NEW, 100, "new"},
        {"new@0", PD_READS_NEW, 0, "new@0"},   {"new@25", PD_READS_NEW, 25, "new@25"},
        {"new@100", PD_READS_NEW, 100, "new"},
    };
    static const char *const bad[] = {"",       "NEW",      "new@",    "new@101", "new@-1",
                                      "new@+5", "new@05",   "new@25x", "new@ 5",  "shadow@5",
                                      "old ",   "new@1000", "dual"};
    char buf[16];
    pd_reads_t r;

    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        assert_true(pd_reads_parse(good[i].text, &r));
        assert_int_equal(r.mode, good[i].mode);
        assert_int_equal(r.percent, good[i].percent);
        assert_string_equal(pd_reads_format(&r, buf, sizeof buf), good[i].formatted);
    }
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        if (pd_reads_parse(bad[i], &r))
            fail_msg("reads \"%s\" should be refused", bad[i]);
    assert_false(pd_reads_parse(NULL, &r));
}

static void test_writes_parse_and_name(void **state)
{
    static const char *const names[] = {"old", "dual", "dual-new", "new"};
    static const pd_writes_t values[] = {PD_WRITES_OLD, PD_WRITES_DUAL, PD_WRITES_DUAL_NEW,
                                         PD_WRITES_NEW};
    pd_writes_t w;

    for (size_t i = 0; i < 4; i++) {
        assert_true(pd_writes_parse(names[i], &w));
        assert_int_equal(w, values[i]);
        assert_string_equal(pd_writes_name(values[i]), names[i]);
    }
    assert_false(pd_writes_parse("Dual", &w));
    assert_false(pd_writes_parse("dual_new", &w));
    assert_false(pd_writes_parse("", &w));
    assert_false(pd_writes_parse(NULL, &w));
}

/* ---------------------------------------------------------------------------------------
 * Initial flags the server would refuse at start (pgdual --check reports them).
 */
static void test_initial_flags_checked(void **state)
{
    static const char text[] = "databases:\n"
                               "  - { name: app, old: \"dbname=app\", new: \"dbname=app2\" }\n"
                               "rules:\n"
                               "  - name: orders\n"
                               "    database: app\n"
                               "    kind: tables\n"
                               "    writes: old\n"
                               "    reads: new\n"
                               "  - name: users-email\n"
                               "    database: app\n"
                               "    kind: columns\n"
                               "    table: users\n"
                               "    key: [id]\n"
                               "    columns: [{ old: email, new: email_address }]\n"
                               "    writes: new\n"
                               "  - name: items\n"
                               "    database: app\n"
                               "    kind: tables\n"
                               "    tables: [items]\n"
                               "    writes: dual\n";
    pd_config_errors_t errs = {0};
    pd_config_t *cfg = load_text(text, &errs);

    assert_non_null(cfg);
    assert_int_equal(pd_flags_check_config(cfg, &errs), 2);
    assert_int_equal(errs.count, 2);
    assert_string_equal(errs.msgs[0],
                        "t.yaml:8:12: rule \"orders\": reads: new cannot be served with writes: "
                        "old: reads=new of a kind: tables rule needs new written: set "
                        "writes=dual first (or pgdualctl switchover, which flips reads and "
                        "writes together)");
    assert_string_equal(errs.msgs[1],
                        "t.yaml:15:13: rule \"users-email\": writes: new cannot be served with "
                        "reads: old: writes=new leaves the old columns unwritten: reads must be "
                        "new (new@100)");
    pd_config_errors_free(&errs);
    pd_config_free(cfg);

    /* A tables rule mapping columns may have new authoritative (its statements are then
       translated for new), but not beside an active columns rule of the same database. */
    static const char mapped[] = "databases:\n"
                                 "  - { name: app, old: \"dbname=app\", new: \"dbname=app2\" }\n"
                                 "rules:\n"
                                 "  - name: green\n"
                                 "    database: app\n"
                                 "    kind: tables\n"
                                 "    columns: [{ old: email, new: email_address }]\n"
                                 "    writes: dual-new\n"
                                 "    reads: new\n"
                                 "  - name: users-email\n"
                                 "    database: app\n"
                                 "    kind: columns\n"
                                 "    table: users\n"
                                 "    key: [id]\n"
                                 "    columns: [{ old: name, new: full_name }]\n"
                                 "    writes: %s\n";
    static const char *const second[] = {"old", "dual"};
    for (int i = 0; i < 2; i++) {
        char buf[sizeof mapped + 8];
        snprintf(buf, sizeof buf, mapped, second[i]);
        cfg = load_text(buf, &errs);
        assert_non_null(cfg);
        assert_int_equal(pd_flags_check_config(cfg, &errs), (size_t)(2 * i)); /* both rules */
        if (i == 1)
            assert_non_null(strstr(errs.msgs[0], "cannot run beside an active kind: columns rule"));
        pd_config_errors_free(&errs);
        pd_config_free(cfg);
    }

    /* Every valid file's flags are served. */
    char *dir = source_path("tests/config/valid");
    struct dirent **list;
    int n = list_yaml(dir, &list);
    for (int i = 0; i < n; i++) {
        char *path = NULL;
        assert_true(asprintf(&path, "%s/%s", dir, list[i]->d_name) > 0);
        cfg = pd_config_load(path, &errs);
        assert_non_null(cfg);
        if (pd_flags_check_config(cfg, &errs) != 0) {
            print_errors(&errs);
            fail_msg("%s has flags the server refuses", path);
        }
        pd_config_free(cfg);
        free(path);
    }
    free_list(list, n);
    free(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_valid_files_load),
        cmocka_unit_test(test_invalid_files_fail_with_expected_error),
        cmocka_unit_test(test_full_example_values),
        cmocka_unit_test(test_deploy_example_loads),
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_tls_without_mode_is_allow_and_paths_resolve),
        cmocka_unit_test(test_state_limits_log_and_flags),
        cmocka_unit_test(test_anchors_and_state_word),
        cmocka_unit_test(test_scram_and_log_level),
        cmocka_unit_test(test_several_faults_all_reported_in_file_order),
        cmocka_unit_test(test_errors_never_show_secrets),
        cmocka_unit_test(test_many_faults_are_capped),
        cmocka_unit_test(test_echoed_values_are_escaped),
        cmocka_unit_test(test_errors_are_appended),
        cmocka_unit_test(test_missing_file),
        cmocka_unit_test(test_load_string_resolves_against_cwd),
        cmocka_unit_test(test_config_database_lookup),
        cmocka_unit_test(test_reads_parse_and_format),
        cmocka_unit_test(test_writes_parse_and_name),
        cmocka_unit_test(test_initial_flags_checked),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
