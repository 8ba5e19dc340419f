/*
 * flags.h — which flags (writes, reads) this version can serve for a rule: the pure checks
 * that the server applies at start, on reload and to `pgdualctl flag`, and that
 * `pgdual -c FILE --check` applies to a config's initial flags, so that both say the same.
 * No I/O, no globals.
 */
#ifndef PD_RULES_FLAGS_H
#define PD_RULES_FLAGS_H

#include "rules/config.h"

/* The flags in force for one rule: the config's initial ones, or the state's. */
typedef struct {
    pd_writes_t writes;
    pd_reads_t reads;
} pd_rule_flags_t;

/* Which flag a refusal is about (for --check's position and message). */
typedef enum { PD_FLAG_WRITES, PD_FLAG_READS } pd_flag_key_t;

/*
 * NULL when this version can serve writes/reads for rule r on its own, else why not (a
 * static message). *key (may be NULL) says which flag is at fault.
 */
const char *pd_flags_refusal(const pd_rule_cfg_t *r, pd_writes_t writes, const pd_reads_t *reads,
                             pd_flag_key_t *key);

/*
 * NULL when writes/reads for cfg->rules[rule] agree with the flags of the other rules of
 * its database (flags: one per cfg->rules[i]; flags[rule] is not read), else why not.
 */
const char *pd_flags_database_refusal(const pd_config_t *cfg, const pd_rule_flags_t *flags,
                                      unsigned rule, pd_writes_t writes, const pd_reads_t *reads,
                                      pd_flag_key_t *key);

/*
 * The checks above over a config's initial flags, every rule: each refusal is appended to
 * errs as "FILE:LINE:COLUMN: rule "NAME": ..." at the `writes` or `reads` key at fault
 * (the rule's position when the key is absent). Returns how many were found.
 */
size_t pd_flags_check_config(const pd_config_t *cfg, pd_config_errors_t *errs);

#endif /* PD_RULES_FLAGS_H */
