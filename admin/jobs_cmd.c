/*
 * jobs_cmd.c — the admin commands that start, show and cancel operator jobs (jobs.h):
 * argument checks, rule lookup and the JSON replies. The jobs themselves run on their
 * own threads; nothing here waits for them.
 */
#include "admin/jobs_cmd.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "admin/jobs.h"

#define BATCH_MAX    1000000u
#define THROTTLE_MAX 600000u /* ms */

static const char *const verify_usage = "verify RULE [--repair] [--touched] [--batch N]";
static const char *const backfill_usage = "backfill RULE [--batch N] [--throttle MS]";

static json_t *reply_error(const char *error, const char *hint)
{
    json_t *r = json_pack("{s:b, s:s}", "ok", 0, "error", error);
    if (hint != NULL)
        json_object_set_new(r, "hint", json_string(hint));
    return r;
}

__attribute__((format(printf, 2, 3))) static json_t *reply_errorf(const char *hint, const char *fmt,
                                                                  ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return reply_error(msg, hint);
}

static json_t *usage_error(const char *what, const char *word, const char *usage)
{
    return reply_errorf(NULL, "%s \"%.64s\"; usage: %s", what, word, usage);
}

/* A whole decimal number in [min, max]. */
static bool parse_unsigned(const char *s, unsigned min, unsigned max, unsigned *out)
{
    if (s == NULL || *s < '0' || *s > '9')
        return false;
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (errno != 0 || *end != '\0' || v < min || v > max)
        return false;
    *out = (unsigned)v;
    return true;
}

/* The value of "--name N" or "--name=N"; advances *i past it. NULL when missing. */
static const char *option_value(int argc, char **argv, int *i, const char *name)
{
    size_t n = strlen(name);
    if (strncmp(argv[*i], name, n) != 0)
        return NULL;
    if (argv[*i][n] == '=')
        return argv[*i] + n + 1;
    if (argv[*i][n] != '\0' || *i + 1 >= argc)
        return NULL;
    return argv[++*i];
}

static bool is_option(const char *word, const char *name)
{
    size_t n = strlen(name);
    return strncmp(word, name, n) == 0 && (word[n] == '\0' || word[n] == '=');
}

/*
 * Parses "RULE [options]" (options in any order) for verify or backfill. Returns NULL and
 * fills rule/opt, or an error reply.
 */
static json_t *parse_args(int argc, char **argv, bool verify, const char **rule,
                          pd_job_options_t *opt)
{
    const char *usage = verify ? verify_usage : backfill_usage;
    *rule = NULL;
    *opt = (pd_job_options_t){0};
    for (int i = 1; i < argc; i++) {
        const char *w = argv[i];
        if (verify && strcmp(w, "--repair") == 0) {
            opt->repair = true;
        } else if (verify && strcmp(w, "--touched") == 0) {
            opt->touched = true;
        } else if (is_option(w, "--batch")) {
            if (!parse_unsigned(option_value(argc, argv, &i, "--batch"), 1, BATCH_MAX, &opt->batch))
                return reply_errorf(NULL,
                                    "--batch takes a number of rows from 1 to %u; "
                                    "usage: %s",
                                    BATCH_MAX, usage);
        } else if (!verify && is_option(w, "--throttle")) {
            if (!parse_unsigned(option_value(argc, argv, &i, "--throttle"), 0, THROTTLE_MAX,
                                &opt->throttle_ms))
                return reply_errorf(NULL,
                                    "--throttle takes milliseconds from 0 to %u; "
                                    "usage: %s",
                                    THROTTLE_MAX, usage);
        } else if (w[0] == '-') {
            return usage_error("unknown option", w, usage);
        } else if (*rule != NULL) {
            return usage_error("unexpected argument", w, usage);
        } else {
            *rule = w;
        }
    }
    if (*rule == NULL)
        return reply_errorf(NULL, "no rule given; usage: %s", usage);
    return NULL;
}

static int find_rule(const pd_server_t *srv, const char *name)
{
    for (unsigned i = 0; i < srv->cfg->rule_count; i++)
        if (strcmp(srv->cfg->rules[i].name, name) == 0)
            return (int)i;
    return -1;
}

static json_t *start_job(pd_server_t *srv, int argc, char **argv, bool verify)
{
    const char *name;
    pd_job_options_t opt;
    json_t *bad = parse_args(argc, argv, verify, &name, &opt);
    if (bad != NULL)
        return bad;
    int i = find_rule(srv, name);
    if (i < 0)
        return reply_errorf("pgdualctl rules lists them.", "rule \"%.64s\" does not exist", name);
    if (srv->jobs == NULL)
        return reply_error("jobs are not available in this pgdual", NULL);
    const pd_rule_cfg_t *rule = &srv->cfg->rules[i];
    pd_writes_t writes = srv->flags != NULL ? srv->flags[i].writes : rule->writes;
    char *err = NULL;
    int id = pd_jobs_start(srv->jobs, argv[0], srv->cfg, rule, writes, &opt, &err);
    if (id < 0) {
        json_t *r = reply_error(err ? err : "could not start the job", NULL);
        free(err);
        return r;
    }
    return json_pack("{s:b, s:i, s:s, s:s}", "ok", 1, "job", id, "kind", argv[0], "rule",
                     rule->name);
}

json_t *pd_cmd_verify(pd_server_t *srv, int argc, char **argv)
{
    return start_job(srv, argc, argv, true);
}

json_t *pd_cmd_backfill(pd_server_t *srv, int argc, char **argv)
{
    return start_job(srv, argc, argv, false);
}

static json_t *no_such_job(const char *word)
{
    return reply_errorf("pgdualctl jobs lists the jobs (the last 50 finished ones are kept).",
                        "job \"%.32s\" does not exist", word);
}

json_t *pd_cmd_jobs(pd_server_t *srv, int argc, char **argv)
{
    if (srv->jobs == NULL)
        return reply_error("jobs are not available in this pgdual", NULL);
    if (argc < 2) {
        json_t *r = json_pack("{s:b}", "ok", 1);
        json_object_set_new(r, "jobs", pd_jobs_list(srv->jobs));
        return r;
    }
    unsigned id;
    if (!parse_unsigned(argv[1], 1, 0x7fffffff, &id))
        return usage_error("not a job id", argv[1], "jobs [ID]");
    json_t *job = pd_jobs_get(srv->jobs, (int)id);
    if (job == NULL)
        return no_such_job(argv[1]);
    json_t *r = json_pack("{s:b}", "ok", 1);
    json_object_set_new(r, "job", job);
    return r;
}

json_t *pd_cmd_cancel(pd_server_t *srv, int argc, char **argv)
{
    unsigned id;
    if (argc != 2 || !parse_unsigned(argv[1], 1, 0x7fffffff, &id))
        return usage_error("not a job id", argc > 1 ? argv[1] : "", "cancel ID");
    if (srv->jobs == NULL)
        return reply_error("jobs are not available in this pgdual", NULL);
    if (pd_jobs_cancel(srv->jobs, (int)id) == 0)
        return json_pack("{s:b, s:i, s:s}", "ok", 1, "job", (int)id, "state", "cancelling");
    json_t *job = pd_jobs_get(srv->jobs, (int)id);
    if (job == NULL)
        return no_such_job(argv[1]);
    json_t *r = reply_errorf(NULL, "job %u is not running (it is %s)", id,
                             json_string_value(json_object_get(job, "state")));
    json_decref(job);
    return r;
}
