/*
 * jobs.h — long operator jobs (backfill, verify) that run in the background on threads of
 * their own with their own libpq connections, never on the event loop. The loop starts
 * them, reads their progress and results, and may cancel them.
 *
 * For `columns` rules:
 *  backfill: sets new = up(old) (for each column pair) in key-ordered batches of `batch`
 *    rows, one short transaction per batch, sleeping `throttle_ms` between batches;
 *    after each batch the last key is checkpointed in the state ("backfill/RULE"), so a
 *    backfill started again after an interruption resumes there; a finished backfill
 *    clears its checkpoint.
 *  verify: scans in key order and counts rows where new IS DISTINCT FROM up(old) (and,
 *    when writes is dual-new, old IS DISTINCT FROM down(new)); lists the first 100 keys;
 *    with repair, sets them right from the authoritative side; records the result
 *    {time, rows_checked, divergent, repaired, keys, ok} with pd_state_record_verify.
 *
 * For `tables` rules (the rule's tables in the database's old side, mirrored to its new
 * side, columns renamed/transformed by the rule's `columns`; jobs_tables.c):
 *  backfill: copies each table old -> new in key-ordered batches with COPY, one
 *    transaction per batch on new, checkpointed ("backfill/RULE") and resumable; refuses
 *    a fresh start when a table on new has rows; at the end sets the sequences owned by
 *    the tables' columns on new to old's values.
 *  verify: compares old and new in key-ordered chunks by checksum, narrows mismatching
 *    chunks down to rows, classifies each divergent key (missing on new, extra on new,
 *    different), re-checks them after short pauses (the application may be writing), and
 *    with repair sets them right from the authoritative side. With `touched`, checks only
 *    the keys written since the last verify (pd_jobs_touched), or a whole table when
 *    those are not known. Records {time, writes, repair, touched, rows_checked,
 *    divergent, missing, extra, different, repaired, in_flight (differed at first, agreed
 *    when re-checked), tables: [per table: table, mode (full|touched|checksum), key, the
 *    same counts, note?, not_compared?, rows_old/rows_new/checksum_match (no key),
 *    repair_failed/repair_error?], keys: {table: [first 100 {kind, key}]}, ok}.
 */
#ifndef PD_ADMIN_JOBS_H
#define PD_ADMIN_JOBS_H

#include <jansson.h>
#include <stdbool.h>
#include <uv.h>

#include "rules/config.h"
#include "rules/state.h"
#include "rules/touched.h"

typedef struct pd_jobs pd_jobs_t;

typedef struct {
    unsigned batch;       /* rows per batch, default 1000 */
    unsigned throttle_ms; /* pause between batches, default 0 */
    bool repair;          /* verify: fix what differs */
    bool touched;         /* verify of a tables rule: only the keys written since the last */
} pd_job_options_t;

/* The registry; state must outlive it. */
pd_jobs_t *pd_jobs_new(pd_state_t *state);

/*
 * The registry's touched-key sets (rules/touched.h), owned by it and valid until
 * pd_jobs_free: the proxy's mirror records in it the keys it writes to the rules'
 * tables; `verify --touched` reads them.
 */
pd_touched_t *pd_jobs_touched(pd_jobs_t *jobs);

/* Cancels running jobs, waits for their threads, frees everything. */
void pd_jobs_free(pd_jobs_t *jobs);

/*
 * Starts a job for a rule of cfg (the job copies what it needs: cfg may be freed after).
 * `writes` is the rule's current writes flag (verify uses it to choose what to check).
 * Returns the job id (> 0), or -1 with *err (malloc'd; says what to do), e.g. when a job
 * of the same kind already runs for the rule.
 */
int pd_jobs_start(pd_jobs_t *jobs, const char *kind /* "backfill" | "verify" */,
                  const pd_config_t *cfg, const pd_rule_cfg_t *rule, pd_writes_t writes,
                  const pd_job_options_t *opt, char **err);

/*
 * One job as JSON: {id, kind, rule, state: running|done|failed|cancelled, rows_done,
 * rows_total (estimate), rows_per_s, eta_s, started_at, finished_at, phase? (what a tables
 * job is at), error?, hint?, result?}. NULL when no such id.
 */
json_t *pd_jobs_get(pd_jobs_t *jobs, int id);

/* Every job (running first, then the last finished ones, at most 50), as an array. */
json_t *pd_jobs_list(pd_jobs_t *jobs);

/* Asks a running job to stop at its next batch boundary. -1 when no such running job. */
int pd_jobs_cancel(pd_jobs_t *jobs, int id);

#endif /* PD_ADMIN_JOBS_H */
