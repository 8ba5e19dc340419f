/*
 * touched_verify.c — runs verify jobs of a `tables` rule in-process through the jobs
 * registry (admin/jobs.h) and records touched keys with pd_touched_add(), the call the
 * proxy's mirror makes for each key it writes, so that test_tables_jobs.py can check
 * `verify --touched` against real databases before the mirror exists. A test program,
 * not part of pgdual.
 *
 *   touched_verify CONFIG RULE, then commands on stdin, one a line, answers on stdout:
 *     verify [--touched] [--repair]   runs a verify to its end; the job as one JSON line
 *     touch TABLE V1[,V2...]          records a key of TABLE ("schema.table") as written
 *     unknown TABLE                   marks TABLE as written with keys not captured
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "admin/jobs.h"
#include "rules/config.h"
#include "rules/state.h"
#include "rules/touched.h"

#define WORDS_MAX 8
#define KEY_MAX   8

static void answer(json_t *reply)
{
    char *text = json_dumps(reply, JSON_COMPACT);
    printf("%s\n", text ? text : "{}");
    fflush(stdout);
    free(text);
    json_decref(reply);
}

static json_t *run_verify(pd_jobs_t *jobs, const pd_config_t *cfg, const pd_rule_cfg_t *rule,
                          char **words, int n)
{
    pd_job_options_t opt = {0};
    for (int i = 1; i < n; i++) {
        opt.touched |= strcmp(words[i], "--touched") == 0;
        opt.repair |= strcmp(words[i], "--repair") == 0;
    }
    char *err = NULL;
    int id = pd_jobs_start(jobs, "verify", cfg, rule, rule->writes, &opt, &err);
    if (id < 0) {
        json_t *r = json_pack("{s:b, s:s}", "ok", 0, "error", err ? err : "?");
        free(err);
        return r;
    }
    for (;;) {
        json_t *job = pd_jobs_get(jobs, id);
        if (strcmp(json_string_value(json_object_get(job, "state")), "running") != 0)
            return job;
        json_decref(job);
        struct timespec ts = {.tv_sec = 0, .tv_nsec = 20 * 1000000L};
        nanosleep(&ts, NULL);
    }
}

static json_t *touch(pd_touched_t *t, const char *rule, char **words, int n)
{
    if (n != 3)
        return json_pack("{s:b, s:s}", "ok", 0, "error", "usage: touch TABLE V1[,V2...]");
    const char *key[KEY_MAX];
    unsigned nkey = 0;
    for (char *save = NULL, *v = strtok_r(words[2], ",", &save); v && nkey < KEY_MAX;
         v = strtok_r(NULL, ",", &save))
        key[nkey++] = v;
    return json_pack("{s:b}", "ok", pd_touched_add(t, rule, words[1], nkey, key) == 0);
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: touched_verify CONFIG RULE (commands on stdin)\n");
        return 2;
    }
    pd_config_errors_t errs = {0};
    pd_config_t *cfg = pd_config_load(argv[1], &errs);
    for (size_t i = 0; i < errs.count; i++)
        fprintf(stderr, "%s\n", errs.msgs[i]);
    pd_config_errors_free(&errs);
    const pd_rule_cfg_t *rule = NULL;
    for (unsigned i = 0; cfg != NULL && i < cfg->rule_count; i++)
        if (strcmp(cfg->rules[i].name, argv[2]) == 0)
            rule = &cfg->rules[i];
    char *err = NULL;
    pd_state_t *state = rule ? pd_state_open(NULL, &err) : NULL;
    pd_jobs_t *jobs = state ? pd_jobs_new(state) : NULL;
    if (jobs == NULL) {
        fprintf(stderr, "touched_verify: no config, no rule %s, or out of memory\n", argv[2]);
        return 2;
    }
    char line[4096];
    while (fgets(line, sizeof line, stdin) != NULL) {
        char *words[WORDS_MAX];
        int n = 0;
        for (char *save = NULL, *w = strtok_r(line, " \t\r\n", &save); w && n < WORDS_MAX;
             w = strtok_r(NULL, " \t\r\n", &save))
            words[n++] = w;
        if (n == 0)
            continue;
        if (strcmp(words[0], "verify") == 0)
            answer(run_verify(jobs, cfg, rule, words, n));
        else if (strcmp(words[0], "touch") == 0)
            answer(touch(pd_jobs_touched(jobs), rule->name, words, n));
        else if (strcmp(words[0], "unknown") == 0 && n == 2) {
            pd_touched_mark_unknown(pd_jobs_touched(jobs), rule->name, words[1]);
            answer(json_pack("{s:b}", "ok", 1));
        } else {
            answer(json_pack("{s:b, s:s}", "ok", 0, "error", "unknown command"));
        }
    }
    pd_jobs_free(jobs);
    pd_state_free(state);
    pd_config_free(cfg);
    return 0;
}
