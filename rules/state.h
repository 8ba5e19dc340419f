/*
 * state.h — pgdual's runtime state: the flags operators set (they override the config's
 * initial flags and survive restarts), their history with who and when, job checkpoints
 * (backfill resumes from them) and verify results (cutover checks read them).
 *
 * Kept in memory as one JSON document (jansson) and written to the `state` file after
 * every change, atomically: a temporary file in the same directory, fsync, rename, fsync
 * of the directory. A state without a file (config has no `state`) lives in memory only.
 * All functions are thread-safe (jobs record checkpoints from their own threads).
 */
#ifndef PD_RULES_STATE_H
#define PD_RULES_STATE_H

#include <jansson.h>
#include <stdbool.h>

#include "rules/config.h"

#define PD_STATE_HISTORY_MAX 1000 /* flag changes kept; older ones are dropped */

typedef struct pd_state pd_state_t;

/* Opens the state at path (NULL: memory only), loading the file when it exists. Returns
 * NULL with *err (malloc'd) when the file exists but cannot be read or is not ours. */
pd_state_t *pd_state_open(const char *path, char **err);
void pd_state_free(pd_state_t *st);

/* The flags recorded for a rule: true and the values when the state has them. */
bool pd_state_flags(pd_state_t *st, const char *rule, pd_writes_t *writes, pd_reads_t *reads);

/* Records new flags for a rule, with who changed them, appends to the history and
 * persists. Returns 0, or -1 with *err (malloc'd) when the file could not be written (the
 * in-memory change is then undone, so memory and disk agree). */
int pd_state_set_flags(pd_state_t *st, const char *rule, pd_writes_t writes,
                       const pd_reads_t *reads, const char *who, char **err);

/* Forgets flags of rules not in keep (after a reload removed rules). */
void pd_state_prune(pd_state_t *st, const char *const *keep, unsigned n);

/* Job checkpoints, by key ("backfill/users-email"): set takes a reference to value
 * (NULL deletes); get returns a new reference or NULL. Persisted. */
int pd_state_set_checkpoint(pd_state_t *st, const char *key, json_t *value, char **err);
json_t *pd_state_checkpoint(pd_state_t *st, const char *key);

/* The last verify result of a rule (an object; a reference is taken). Persisted. */
int pd_state_record_verify(pd_state_t *st, const char *rule, json_t *result, char **err);
json_t *pd_state_verify(pd_state_t *st, const char *rule); /* new reference or NULL */

/*
 * Appends an operator event to the history: {time, event, by, ...the fields of `fields`}
 * (event: pause, resume, switchover, rollback, switchover_abandoned, and from
 * switchover --watch auto_rollback, auto_rollback_failed, watch_passed, watch_ended; fields
 * name the database and what was checked or measured). Takes a reference to fields.
 * Flag changes (pd_state_set_flags) are history entries without "event". Persisted.
 */
int pd_state_record_event(pd_state_t *st, const char *event, const char *who, json_t *fields,
                          char **err);

/* A copy of the history (an array, newest last), for status and reports. */
json_t *pd_state_history(pd_state_t *st);

#endif /* PD_RULES_STATE_H */
