/*
 * pgdualctl — the operator's command line, a thin client over pgdual's admin socket:
 * one command line out, one JSON reply back. Prints the reply for people, or as is with
 * --json. Exit codes: 0 success, 1 the command was refused or failed, 2 usage or
 * connection errors.
 *
 * `verify` and `backfill` start a job in pgdual and then follow it (unless --detach is
 * given): `jobs ID` is polled over the same connection, progress goes to stderr (a bar on
 * a terminal, a line every few seconds otherwise), and the outcome decides the exit code.
 */
#include <errno.h>
#include <jansson.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "admin/report_html.h"

#define REPLY_MAX          (16 * 1024 * 1024)
#define POLL_MS            250  /* how often a followed job is asked for its progress */
#define PROGRESS_LINE_MS   2000 /* progress lines when stderr is not a terminal */
#define PROGRESS_BAR_WIDTH 30

static void usage(FILE *out)
{
    fprintf(out,
            "Usage: pgdualctl [-s SOCKET] [--json] COMMAND [ARGS]\n"
            "\n"
            "The admin socket is -s SOCKET, else $PGDUAL_ADMIN.\n"
            "Commands: status, sessions, rules, flag RULE reads=V|writes=V,\n"
            "          divergence [RULE] [--limit N],\n"
            "          verify RULE [--repair] [--touched] [--batch N],\n"
            "          backfill RULE [--batch N] [--throttle MS], jobs [ID], cancel ID,\n"
            "          pause DB [--timeout MS], resume DB,\n"
            "          switchover DB [--timeout MS] [--force] [--dry-run] [--max-verify-age S]\n"
            "                     [--watch DURATION [--max-divergence N] [--max-error-rate R]],\n"
            "          rollback DB [--timeout MS] [--force] [--dry-run], reload,\n"
            "          report DB [--html FILE], fleet [forget INSTANCE]\n"
            "fleet lists the instances sharing `state: postgres` (heartbeats, state version);\n"
            "forget removes one that is gone for good. With a shared state, switchover and\n"
            "rollback pause and flip every live instance together.\n"
            "verify and backfill follow their job to the end with a progress display;\n"
            "--detach (after the command) only starts it.\n"
            "report prints the cutover readiness of a database; --html FILE also writes\n"
            "it as one self-contained HTML page.\n"
            "switchover --watch DURATION (90s, 10m, 1h) keeps watching after the switch and\n"
            "rolls back on its own when, within DURATION, more than N divergence events are\n"
            "recorded (--max-divergence N) or, after 100 requests, the clients' errors per\n"
            "request exceed the rate before the switch plus R (--max-error-rate 0.05 or 5%%);\n"
            "status and report show the watch and the last automatic rollback.\n");
}

static int connect_admin(const char *path)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path) {
        fprintf(stderr, "pgdualctl: admin socket path is too long: %s\n", path);
        return -1;
    }
    strcpy(addr.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        fprintf(stderr,
                "pgdualctl: could not connect to the admin socket \"%s\": %s\n"
                "HINT:  Is pgdual running with admin.socket set to this path? Pass it with -s "
                "or $PGDUAL_ADMIN.\n",
                path, strerror(errno));
        if (fd >= 0)
            close(fd);
        return -1;
    }
    return fd;
}

static int send_all(int fd, const char *buf, size_t n)
{
    while (n > 0) {
        ssize_t w = send(fd, buf, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        buf += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Reads one reply line; returns a malloc'd NUL-terminated string or NULL. */
static char *read_line(int fd)
{
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    while (buf != NULL) {
        if (len + 1 >= cap) {
            if (cap >= REPLY_MAX)
                break;
            char *nbuf = realloc(buf, cap * 2);
            if (nbuf == NULL)
                break;
            buf = nbuf;
            cap *= 2;
        }
        ssize_t r = recv(fd, buf + len, cap - len - 1, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        len += (size_t)r;
        buf[len] = '\0';
        char *nl = memchr(buf, '\n', len);
        if (nl != NULL) {
            *nl = '\0';
            return buf;
        }
    }
    free(buf);
    return NULL;
}

/* A scalar as text, for tables and "key: value" lines. */
static char *scalar_text(json_t *v)
{
    if (json_is_string(v))
        return strdup(json_string_value(v));
    if (json_is_null(v) || v == NULL)
        return strdup("");
    return json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY | JSON_REAL_PRECISION(15));
}

/* An array of objects as an aligned table, columns in the order of the first object. */
static void print_table(json_t *rows)
{
    json_t *first = json_array_get(rows, 0);
    size_t ncols = json_object_size(first);
    if (ncols == 0 || ncols > 32)
        return;
    const char *names[32];
    size_t width[32];
    size_t c = 0;
    const char *key;
    json_t *value;
    json_object_foreach(first, key, value)
    {
        names[c] = key;
        width[c] = strlen(key);
        c++;
    }
    size_t i;
    json_t *row;
    json_array_foreach(rows, i, row)
    {
        for (c = 0; c < ncols; c++) {
            char *t = scalar_text(json_object_get(row, names[c]));
            if (t != NULL && strlen(t) > width[c])
                width[c] = strlen(t);
            free(t);
        }
    }
    for (c = 0; c < ncols; c++)
        printf("%-*s%s", (int)width[c], names[c], c + 1 < ncols ? " | " : "\n");
    for (c = 0; c < ncols; c++) {
        for (size_t k = 0; k < width[c]; k++)
            putchar('-');
        printf("%s", c + 1 < ncols ? "-+-" : "\n");
    }
    json_array_foreach(rows, i, row)
    {
        for (c = 0; c < ncols; c++) {
            char *t = scalar_text(json_object_get(row, names[c]));
            printf("%-*s%s", (int)width[c], t ? t : "", c + 1 < ncols ? " | " : "\n");
            free(t);
        }
    }
    printf("(%zu %s)\n", json_array_size(rows), json_array_size(rows) == 1 ? "row" : "rows");
}

/* People's form of a reply: "key: value" lines; arrays of objects as tables. */
static bool is_object_of_objects(json_t *v)
{
    const char *k;
    json_t *m;
    if (!json_is_object(v) || json_object_size(v) == 0)
        return false;
    json_object_foreach(v, k, m)
    {
        if (!json_is_object(m))
            return false;
    }
    return true;
}

static void print_human(json_t *reply)
{
    const char *key;
    json_t *value;
    json_object_foreach(reply, key, value)
    {
        if (strcmp(key, "ok") == 0)
            continue;
        if (json_is_array(value) && json_array_size(value) > 0 &&
            json_is_object(json_array_get(value, 0))) {
            printf("%s:\n", key);
            print_table(value);
            continue;
        }
        if (is_object_of_objects(value)) {
            /* {"users-email": {...}, ...}: one row per member, its name first. */
            json_t *rows = json_array();
            const char *k2;
            json_t *v2;
            json_object_foreach(value, k2, v2)
            {
                json_t *row = json_pack("{s:s}", "name", k2);
                json_object_update(row, v2);
                json_array_append_new(rows, row);
            }
            printf("%s:\n", key);
            print_table(rows);
            json_decref(rows);
            continue;
        }
        if (json_is_object(value)) {
            const char *k2;
            json_t *v2;
            printf("%s:\n", key);
            json_object_foreach(value, k2, v2)
            {
                char *t = scalar_text(v2);
                printf("  %s: %s\n", k2, t ? t : "");
                free(t);
            }
            continue;
        }
        char *t = scalar_text(value);
        printf("%s: %s\n", key, t ? t : "");
        free(t);
    }
}

/* ---------------------------------------------------------------------------------------
 * Following a job
 */

static volatile sig_atomic_t interrupted;

static void on_sigint(int sig)
{
    (void)sig;
    interrupted = 1;
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void sleep_ms(unsigned ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL); /* a signal cuts it short; the caller checks `interrupted` */
}

/* Sends one command and parses its reply; NULL on a connection or protocol error. */
static json_t *exchange(int fd, const char *line)
{
    if (send_all(fd, line, strlen(line)) != 0)
        return NULL;
    char *text = read_line(fd);
    if (text == NULL)
        return NULL;
    json_t *reply = json_loads(text, 0, NULL);
    free(text);
    if (!json_is_object(reply)) {
        json_decref(reply);
        return NULL;
    }
    return reply;
}

static json_int_t int_of(json_t *obj, const char *key)
{
    return json_integer_value(json_object_get(obj, key));
}

static const char *str_of(json_t *obj, const char *key, const char *dflt)
{
    const char *s = json_string_value(json_object_get(obj, key));
    return s ? s : dflt;
}

static void format_eta(json_t *eta, char *buf, size_t size)
{
    if (!json_is_integer(eta)) {
        snprintf(buf, size, "?");
        return;
    }
    long long s = (long long)json_integer_value(eta);
    if (s >= 3600)
        snprintf(buf, size, "%lldh%02lldm", s / 3600, s % 3600 / 60);
    else if (s >= 60)
        snprintf(buf, size, "%lldm%02llds", s / 60, s % 60);
    else
        snprintf(buf, size, "%llds", s);
}

/* Percent done (0..100), or -1 when the total is unknown. */
static int percent_of(json_t *job)
{
    json_int_t done = int_of(job, "rows_done"), total = int_of(job, "rows_total");
    if (strcmp(str_of(job, "state", ""), "done") == 0)
        return 100;
    if (total <= 0)
        return -1;
    return done >= total ? 99 : (int)(done * 100 / total);
}

/* "420000/1000000 rows, 85000 rows/s, ETA 7s[; public.orders: full]" */
static void progress_text(json_t *job, char *buf, size_t size)
{
    char eta[32];
    format_eta(json_object_get(job, "eta_s"), eta, sizeof eta);
    json_int_t done = int_of(job, "rows_done"), total = int_of(job, "rows_total");
    if (total < done)
        total = done;
    const char *phase = str_of(job, "phase", NULL);
    snprintf(buf, size, "%lld/%lld rows, %lld rows/s, ETA %s%s%s", (long long)done,
             (long long)total, (long long)int_of(job, "rows_per_s"), eta, phase ? "; " : "",
             phase ? phase : "");
}

static void draw_bar(json_t *job)
{
    int pct = percent_of(job);
    int filled = pct < 0 ? 0 : pct * PROGRESS_BAR_WIDTH / 100;
    char bar[PROGRESS_BAR_WIDTH + 1], text[400];
    for (int k = 0; k < PROGRESS_BAR_WIDTH; k++)
        bar[k] = k < filled ? '#' : '.';
    bar[PROGRESS_BAR_WIDTH] = '\0';
    progress_text(job, text, sizeof text);
    fprintf(stderr, "\r\033[K%s %s [%s] %3d%%  %s", str_of(job, "kind", "job"),
            str_of(job, "rule", ""), bar, pct < 0 ? 0 : pct, text);
    fflush(stderr);
}

static void print_progress_line(json_t *job)
{
    char text[400];
    progress_text(job, text, sizeof text);
    int pct = percent_of(job);
    if (pct < 0)
        fprintf(stderr, "%s %s: %s\n", str_of(job, "kind", "job"), str_of(job, "rule", ""), text);
    else
        fprintf(stderr, "%s %s: %d%% (%s)\n", str_of(job, "kind", "job"), str_of(job, "rule", ""),
                pct, text);
    fflush(stderr);
}

/* " id=5 tenant=2" */
static void print_key(json_t *key)
{
    const char *col;
    json_t *v;
    json_object_foreach(key, col, v)
    {
        printf(" %s=%s", col, json_is_string(v) ? json_string_value(v) : "NULL");
    }
}

static void print_keys(json_t *keys)
{
    size_t i;
    json_t *key;
    printf("first divergent keys:\n");
    json_array_foreach(keys, i, key)
    {
        printf(" ");
        print_key(key);
        printf("\n");
    }
}

/* A tables rule's verify: one row per table, its notes, its divergent keys by table. */
static void print_tables_verify(json_t *res)
{
    json_t *rows = json_array(), *t;
    size_t i;
    json_array_foreach(json_object_get(res, "tables"), i, t)
    {
        json_array_append_new(
            rows,
            json_pack("{s:O, s:O, s:O, s:O, s:O, s:O, s:O, s:O}", "table",
                      json_object_get(t, "table"), "mode", json_object_get(t, "mode"),
                      "rows_checked", json_object_get(t, "rows_checked"), "divergent",
                      json_object_get(t, "divergent"), "missing", json_object_get(t, "missing"),
                      "extra", json_object_get(t, "extra"), "different",
                      json_object_get(t, "different"), "repaired", json_object_get(t, "repaired")));
    }
    print_table(rows);
    json_decref(rows);
    json_array_foreach(json_object_get(res, "tables"), i, t)
    {
        if (json_is_string(json_object_get(t, "note")))
            printf("%s: %s\n", str_of(t, "table", ""), str_of(t, "note", ""));
        if (json_is_false(json_object_get(t, "checksum_match")))
            printf("%s: %lld rows on old, %lld on new, checksums differ\n", str_of(t, "table", ""),
                   (long long)int_of(t, "rows_old"), (long long)int_of(t, "rows_new"));
        if (json_integer_value(json_object_get(t, "repair_failed")) > 0)
            printf("%s: %lld rows could not be repaired: %s\n", str_of(t, "table", ""),
                   (long long)int_of(t, "repair_failed"), str_of(t, "repair_error", ""));
    }
    const char *table;
    json_t *keys;
    json_object_foreach(json_object_get(res, "keys"), table, keys)
    {
        printf("first divergent keys of %s:\n", table);
        json_t *k;
        json_array_foreach(keys, i, k)
        {
            printf("  %-9s", str_of(k, "kind", ""));
            print_key(json_object_get(k, "key"));
            printf("\n");
        }
    }
}

/* The end of a job for people; returns the exit code. */
static int report_human(json_t *job)
{
    const char *state = str_of(job, "state", "?"), *kind = str_of(job, "kind", "job");
    const char *rule = str_of(job, "rule", "");
    json_t *res = json_object_get(job, "result");
    if (strcmp(state, "failed") == 0) {
        fprintf(stderr, "pgdualctl: %s of rule \"%s\" (job %lld) failed: %s\n", kind, rule,
                (long long)int_of(job, "id"), str_of(job, "error", "no reason given"));
        if (json_is_string(json_object_get(job, "hint")))
            fprintf(stderr, "HINT:  %s\n", str_of(job, "hint", ""));
        return 1;
    }
    if (strcmp(state, "cancelled") == 0) {
        fprintf(stderr, "pgdualctl: %s of rule \"%s\" (job %lld) was cancelled after %lld rows\n",
                kind, rule, (long long)int_of(job, "id"), (long long)int_of(job, "rows_done"));
        if (strcmp(kind, "backfill") == 0)
            fprintf(stderr, "HINT:  Run the backfill again: it resumes from its checkpoint.\n");
        return 1;
    }
    bool tables = json_is_array(json_object_get(res, "tables"));
    if (strcmp(kind, "backfill") == 0) {
        printf("backfill of rule \"%s\" done: %lld rows in %.1f s, %lld %s", rule,
               (long long)int_of(res, "rows_done"), (double)int_of(job, "elapsed_ms") / 1000,
               (long long)int_of(res, tables ? "rows_copied" : "rows_updated"),
               tables ? "copied" : "updated");
        if (int_of(res, "resumed_from") > 0)
            printf(" (resumed after %lld rows)", (long long)int_of(res, "resumed_from"));
        printf("\n");
        if (tables)
            print_table(json_object_get(res, "tables"));
        return 0;
    }
    bool ok = json_is_true(json_object_get(res, "ok"));
    printf("verify of rule \"%s\" done: %lld rows checked, %lld divergent", rule,
           (long long)int_of(res, "rows_checked"), (long long)int_of(res, "divergent"));
    if (tables)
        printf(" (%lld missing on new, %lld extra on new, %lld different)",
               (long long)int_of(res, "missing"), (long long)int_of(res, "extra"),
               (long long)int_of(res, "different"));
    printf(", %lld repaired\n", (long long)int_of(res, "repaired"));
    if (tables)
        print_tables_verify(res);
    else if (json_array_size(json_object_get(res, "keys")) > 0)
        print_keys(json_object_get(res, "keys"));
    if (!ok)
        fprintf(stderr,
                "pgdualctl: divergence remains in rule \"%s\"\n"
                "HINT:  pgdualctl verify %s --repair sets the rows right from the "
                "authoritative side.\n",
                rule, rule);
    return ok ? 0 : 1;
}

static int exit_code_of(json_t *job)
{
    if (strcmp(str_of(job, "state", ""), "done") != 0)
        return 1;
    if (strcmp(str_of(job, "kind", ""), "verify") != 0)
        return 0;
    return json_is_true(json_object_get(json_object_get(job, "result"), "ok")) ? 0 : 1;
}

/* Polls `jobs ID` until the job ends, showing progress; NULL on a connection error. */
static json_t *poll_until_done(int fd, json_int_t id, bool tty)
{
    char line[64];
    snprintf(line, sizeof line, "jobs %lld\n", (long long)id);
    uint64_t last_line = 0;
    for (bool first = true; !interrupted; first = false) {
        sleep_ms(POLL_MS);
        json_t *reply = interrupted ? NULL : exchange(fd, line);
        json_t *job = json_incref(json_object_get(reply, "job"));
        json_decref(reply);
        if (job == NULL)
            return NULL;
        bool running = strcmp(str_of(job, "state", ""), "running") == 0;
        if (tty) {
            draw_bar(job);
        } else if (running && (first || now_ms() - last_line >= PROGRESS_LINE_MS)) {
            print_progress_line(job);
            last_line = now_ms();
        }
        if (!running) {
            if (tty)
                fprintf(stderr, "\n");
            return job;
        }
        json_decref(job);
    }
    return NULL;
}

static int follow_job(int fd, json_int_t id, bool as_json)
{
    bool tty = isatty(STDERR_FILENO);
    struct sigaction sa = {.sa_handler = on_sigint};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    json_t *job = poll_until_done(fd, id, tty);
    if (job == NULL) {
        if (tty)
            fprintf(stderr, "\n");
        if (interrupted) {
            fprintf(stderr,
                    "pgdualctl: stopped following job %lld; it keeps running in pgdual\n"
                    "HINT:  pgdualctl jobs %lld shows it; pgdualctl cancel %lld stops "
                    "it.\n",
                    (long long)id, (long long)id, (long long)id);
            return 1;
        }
        fprintf(stderr,
                "pgdualctl: lost the connection to pgdual while following job %lld\n"
                "HINT:  Is pgdual still running? A backfill resumes from its "
                "checkpoint when started again.\n",
                (long long)id);
        return 2;
    }
    int rc = exit_code_of(job);
    if (as_json) {
        char *text = json_dumps(job, JSON_COMPACT);
        printf("%s\n", text ? text : "{}");
        free(text);
    } else {
        report_human(job);
    }
    json_decref(job);
    return rc;
}

/* ---------------------------------------------------------------------------------------
 * The readiness report
 */

#define REPORT_HISTORY_SHOWN 10

static void print_report_rules(json_t *rules)
{
    json_t *flags = json_array(), *counts = json_array(), *r;
    size_t i;
    json_array_foreach(rules, i, r)
    {
        json_t *v = json_object_get(r, "last_verify");
        json_array_append_new(
            flags,
            json_pack("{s:O, s:O, s:O, s:O, s:s, s:O?, s:O?}", "rule", json_object_get(r, "name"),
                      "kind", json_object_get(r, "kind"), "writes", json_object_get(r, "writes"),
                      "reads", json_object_get(r, "reads"), "last_verify",
                      str_of(v, "time", "never"), "verify_ok", json_object_get(v, "ok"),
                      "divergence_since", json_object_get(r, "divergence_since_verify")));
        json_t *row = json_pack("{s:O}", "rule", json_object_get(r, "name"));
        json_object_update(row, json_object_get(r, "counters"));
        json_array_append_new(counts, row);
    }
    printf("\nrules:\n");
    print_table(flags);
    printf("\nstatements since pgdual started:\n");
    print_table(counts);
    json_decref(flags);
    json_decref(counts);
}

static void print_report_divergence(json_t *div)
{
    printf("\ndivergence in the log: %lld events", (long long)int_of(div, "events"));
    if (int_of(div, "events") > 0)
        printf(" from %s to %s (%lld buckets of %lld s)", str_of(div, "start", "?"),
               str_of(div, "end", "?"), (long long)int_of(div, "buckets"),
               (long long)int_of(div, "bucket_s"));
    printf("%s\n", json_is_true(json_object_get(div, "logged"))
                       ? (json_is_true(json_object_get(div, "window_cut"))
                              ? " (newest part of the log only)"
                              : "")
                       : " (no divergence.log configured)");
    json_t *rows = json_array(), *s;
    size_t i;
    json_array_foreach(json_object_get(div, "series"), i, s)
    {
        json_array_append_new(rows, json_pack("{s:O, s:O, s:O}", "rule", json_object_get(s, "rule"),
                                              "kind", json_object_get(s, "kind"), "events",
                                              json_object_get(s, "total")));
    }
    if (json_array_size(rows) > 0)
        print_table(rows);
    json_decref(rows);
}

/* switchover --watch: the watch running (or none) and the newest watch events. */
static void print_report_watch(json_t *watch)
{
    json_t *w = json_array_get(json_object_get(watch, "active"), 0);
    if (w == NULL) {
        printf("\nrollback watch: none running\n");
    } else {
        printf("\nrollback watch: %s until %s (started by %s)\n", str_of(w, "state", "?"),
               str_of(w, "until", "?"), str_of(w, "started_by", "?"));
        printf("  divergence events since the switch: %lld", (long long)int_of(w, "divergence"));
        if (json_is_integer(json_object_get(w, "max_divergence")))
            printf(" (rolls back above %lld)", (long long)int_of(w, "max_divergence"));
        printf("\n  client errors since the switch: %lld in %lld requests (rate %.4f, before %.4f)",
               (long long)int_of(w, "errors"), (long long)int_of(w, "requests"),
               json_number_value(json_object_get(w, "error_rate")),
               json_number_value(json_object_get(w, "rate_before")));
        if (json_is_number(json_object_get(w, "max_error_rate")))
            printf(" (rolls back above before + %g)",
                   json_number_value(json_object_get(w, "max_error_rate")));
        printf("\n");
        if (json_is_string(json_object_get(w, "reason")))
            printf("  triggered: %s\n", str_of(w, "reason", ""));
        if (json_is_string(json_object_get(w, "last_failure")))
            printf("  last rollback attempt failed: %s\n", str_of(w, "last_failure", ""));
    }
    json_t *events = json_object_get(watch, "events");
    json_t *rows = pd_report_history_rows(events, REPORT_HISTORY_SHOWN);
    if (json_array_size(rows) > 0) {
        printf("watch events (newest %zu of %zu):\n", json_array_size(rows),
               json_array_size(events));
        print_table(rows);
    }
    json_decref(rows);
}

/* The report for people: the verdict and its checks first, then the evidence. */
static void print_report(json_t *rep)
{
    json_t *ready = json_object_get(rep, "ready");
    printf("Cutover readiness of database \"%s\": %s (at %s)\n", str_of(rep, "database", ""),
           json_is_true(json_object_get(ready, "ok")) ? "READY" : "NOT READY",
           str_of(rep, "generated_at", "?"));
    size_t i;
    json_t *c;
    json_array_foreach(json_object_get(ready, "checks"), i, c)
    {
        printf("  %-4s  %-27s %s\n", json_is_true(json_object_get(c, "pass")) ? "ok" : "FAIL",
               str_of(c, "name", ""), str_of(c, "value", ""));
    }
    print_report_rules(json_object_get(rep, "rules"));
    json_t *m = json_object_get(rep, "mirrors");
    printf("\nmirrors (whole server): %lld open, %lld connecting, %lld detached, %lld statements "
           "queued\n",
           (long long)int_of(m, "open"), (long long)int_of(m, "connecting"),
           (long long)int_of(m, "detached"), (long long)int_of(m, "queued"));
    print_report_divergence(json_object_get(rep, "divergence"));
    print_report_watch(json_object_get(rep, "watch"));
    json_t *history = json_object_get(rep, "history");
    json_t *rows = pd_report_history_rows(history, REPORT_HISTORY_SHOWN);
    printf("\nhistory (newest %zu of %zu):\n", json_array_size(rows), json_array_size(history));
    if (json_array_size(rows) > 0)
        print_table(rows);
    json_decref(rows);
}

/* Writes the HTML page next to its final name and renames it there; 0 or -1 (said). */
static int write_html(const char *path, json_t *report)
{
    char *tmp = NULL;
    if (asprintf(&tmp, "%s.tmp", path) < 0)
        return -1;
    FILE *f = fopen(tmp, "w");
    int rc = f != NULL ? pd_report_html(f, report) : -1;
    if (f != NULL && fclose(f) != 0)
        rc = -1;
    if (rc == 0 && rename(tmp, path) != 0)
        rc = -1;
    if (rc != 0) {
        fprintf(stderr,
                "pgdualctl: could not write the HTML report \"%s\": %s\n"
                "HINT:  Check that the directory exists and is writable.\n",
                path, strerror(errno));
        unlink(tmp);
    }
    free(tmp);
    return rc;
}

/* ---------------------------------------------------------------------------------------
 * Main
 */

/* The command words as one line. For commands that start a job, --detach is ours, not
 * pgdual's, and is left out. */
static char *command_line(int argc, char **argv, bool starts_job, bool *detach)
{
    size_t len = 2;
    for (int j = 0; j < argc; j++)
        len += strlen(argv[j]) + 1;
    char *line = malloc(len);
    if (line == NULL)
        return NULL;
    line[0] = '\0';
    *detach = false;
    for (int j = 0; j < argc; j++) {
        if (strchr(argv[j], '\n') != NULL) {
            fprintf(stderr, "pgdualctl: arguments cannot contain newlines\n");
            free(line);
            return NULL;
        }
        if (starts_job && j > 0 && strcmp(argv[j], "--detach") == 0) {
            *detach = true;
            continue;
        }
        if (line[0] != '\0')
            strcat(line, " ");
        strcat(line, argv[j]);
    }
    strcat(line, "\n");
    return line;
}

static void print_failure(json_t *reply)
{
    json_t *err = json_object_get(reply, "error");
    json_t *hint = json_object_get(reply, "hint");
    json_t *errors = json_object_get(reply, "errors");
    fprintf(stderr, "pgdualctl: %s\n",
            json_is_string(err) ? json_string_value(err) : "the command failed");
    size_t k;
    json_t *e;
    json_array_foreach(errors, k, e) fprintf(stderr, "  %s\n", json_string_value(e));
    if (json_is_string(hint))
        fprintf(stderr, "HINT:  %s\n", json_string_value(hint));
    /* switchover's guardrails, pause's busy sessions: what the operator acts on */
    static const char *const lists[] = {"checks", "busy"};
    for (size_t i = 0; i < sizeof lists / sizeof lists[0]; i++) {
        json_t *rows = json_object_get(reply, lists[i]);
        if (json_array_size(rows) > 0) {
            printf("%s:\n", lists[i]);
            print_table(rows);
        }
    }
}

/* Global options before the command; returns the index of the command word, or -exit. */
static int parse_options(int argc, char **argv, const char **sock, bool *as_json)
{
    int i = 1;
    for (; i < argc && argv[i][0] == '-'; i++) {
        if (strcmp(argv[i], "-s") == 0 && i + 1 < argc) {
            *sock = argv[++i];
        } else if (strcmp(argv[i], "--json") == 0) {
            *as_json = true;
        } else if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            usage(stdout);
            return 0;
        } else {
            fprintf(stderr, "pgdualctl: unknown option \"%s\"\n", argv[i]);
            usage(stderr);
            return -2;
        }
    }
    if (i >= argc) {
        usage(stderr);
        return -2;
    }
    if (*sock == NULL) {
        fprintf(stderr, "pgdualctl: no admin socket given\n"
                        "HINT:  Pass -s PATH or set PGDUAL_ADMIN to pgdual's admin.socket.\n");
        return -2;
    }
    return i;
}

/* `report DB --html FILE`: --html and FILE are ours, not pgdual's; they are taken out of
 * argv. Returns 0, or 2 when FILE is missing. */
static int take_html_option(int *argc, char **argv, const char **html)
{
    for (int j = 1; j < *argc; j++) {
        if (strcmp(argv[j], "--html") != 0)
            continue;
        if (j + 1 >= *argc) {
            fprintf(stderr, "pgdualctl: --html needs a file name\n");
            usage(stderr);
            return 2;
        }
        *html = argv[j + 1];
        memmove(argv + j, argv + j + 2, (size_t)(*argc - j - 2) * sizeof *argv);
        *argc -= 2;
        j--;
    }
    return 0;
}

int main(int argc, char **argv)
{
    const char *sock = getenv("PGDUAL_ADMIN"), *html = NULL;
    bool as_json = false, detach;
    int i = parse_options(argc, argv, &sock, &as_json);
    if (i <= 0)
        return -i;
    bool starts_job = strcmp(argv[i], "verify") == 0 || strcmp(argv[i], "backfill") == 0;
    bool report = strcmp(argv[i], "report") == 0;
    int nwords = argc - i;
    if (report && take_html_option(&nwords, argv + i, &html) != 0)
        return 2;
    char *line = command_line(nwords, argv + i, starts_job, &detach);
    if (line == NULL)
        return 2;
    int fd = connect_admin(sock);
    if (fd < 0) {
        free(line);
        return 2;
    }
    json_t *reply = exchange(fd, line);
    free(line);
    if (reply == NULL) {
        fprintf(stderr, "pgdualctl: no reply (or not a JSON object) from pgdual on \"%s\"\n", sock);
        close(fd);
        return 2;
    }
    bool ok = json_is_true(json_object_get(reply, "ok"));
    json_t *job = json_object_get(reply, "job");
    json_t *rep = json_object_get(reply, "report");
    int rc = ok ? 0 : 1;
    if (ok && starts_job && !detach && json_is_integer(job)) {
        rc = follow_job(fd, json_integer_value(job), as_json);
    } else if (as_json) {
        char *text = json_dumps(reply, JSON_COMPACT | JSON_REAL_PRECISION(15));
        printf("%s\n", text ? text : "{}");
        free(text);
    } else if (!ok) {
        print_failure(reply);
    } else if (report && json_is_object(rep)) {
        print_report(rep);
    } else {
        print_human(reply);
    }
    if (ok && html != NULL && json_is_object(rep)) {
        if (write_html(html, rep) != 0)
            rc = 1;
        else if (!as_json)
            printf("\nHTML report written to %s\n", html);
    }
    close(fd);
    json_decref(reply);
    return rc;
}
