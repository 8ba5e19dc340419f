/*
 * fuzz_config.c — libFuzzer target for the configuration loader: any input either loads
 * into a config that can be walked and freed, or fails with errors that each carry a
 * line and column (a message without one would mean the libyaml walk let through
 * something libcyaml then refused). Also feeds the input to the flag parsers.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rules/config.h"

#define NAME "fuzz.yaml"

static void check_error(const char *msg)
{
    unsigned line, col;
    int used = 0;
    if (strncmp(msg, NAME ":", strlen(NAME ":")) != 0 ||
        sscanf(msg + strlen(NAME ":"), "%u:%u: %n", &line, &col, &used) != 2 || used == 0) {
        fprintf(stderr, "error without a position: %s\n", msg);
        abort();
    }
}

static void walk_config(const pd_config_t *cfg)
{
    char buf[16];
    for (unsigned i = 0; i < cfg->database_count; i++)
        if (pd_config_database(cfg, cfg->databases[i].name) == NULL)
            abort();
    for (unsigned i = 0; i < cfg->rule_count; i++) {
        const pd_rule_cfg_t *r = &cfg->rules[i];
        pd_reads_t back;
        if (pd_config_database(cfg, r->database) == NULL)
            abort(); /* the checks guarantee every rule names a database */
        if (!pd_reads_parse(pd_reads_format(&r->reads, buf, sizeof buf), &back) ||
            back.mode != r->reads.mode || back.percent != r->reads.percent)
            abort();
        if (strcmp(pd_writes_name(r->writes), "?") == 0)
            abort();
    }
}

static void fuzz_flags(const uint8_t *data, size_t size)
{
    char text[32];
    pd_reads_t r;
    pd_writes_t w;
    size_t n = size < sizeof text - 1 ? size : sizeof text - 1;
    memcpy(text, data, n);
    text[n] = '\0';
    if (pd_reads_parse(text, &r) && r.percent > 100)
        abort();
    (void)pd_writes_parse(text, &w);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    pd_config_errors_t errs = {0};
    pd_config_t *cfg = pd_config_load_string((const char *)data, size, NAME, &errs);

    if (cfg != NULL) {
        if (errs.count != 0)
            abort();
        walk_config(cfg);
        pd_config_free(cfg);
    } else {
        if (errs.count == 0)
            abort(); /* a refusal always says why */
        for (size_t i = 0; i < errs.count; i++)
            check_error(errs.msgs[i]);
    }
    pd_config_errors_free(&errs);
    fuzz_flags(data, size);
    return 0;
}
