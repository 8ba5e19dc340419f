/*
 * state.h — pgdual's runtime state: the flags operators set (they override the config's
 * initial flags and survive restarts), their history with who and when, job checkpoints
 * (backfill resumes from them) and verify results (cutover checks read them).
 *
 * Kept in memory as one JSON document (jansson), stored after every change in one of:
 * - a file (`state: PATH`), atomically: a temporary file in the same directory, fsync,
 *   rename, fsync of the directory;
 * - PostgreSQL (`state: postgres`), shared by every instance: schema `pgdual`, created and
 *   migrated by pgdual (pgdual.migrations says to which version), holds the document in
 *   pgdual.state with a version that every change raises, under the row's lock, in the
 *   transaction that also notifies channel `pgdual_state`; instances re-read it then;
 * - nowhere (no `state`): memory only.
 * Changes are edits of the document; memory changes only once the store has the change.
 * All functions are thread-safe (jobs record checkpoints from their own threads). With
 * PostgreSQL, a change waits for the store (statement_timeout 5 s, connect_timeout 5 s).
 */
#ifndef PD_RULES_STATE_H
#define PD_RULES_STATE_H

#include <jansson.h>
#include <libpq-fe.h>
#include <stdbool.h>
#include <stdint.h>

#include "rules/config.h"

#define PD_STATE_HISTORY_MAX 1000 /* flag changes kept; older ones are dropped */

/* pg_advisory_xact_lock(class, 1): migrations; (class, 2): fleet operations */
#define PD_STATE_LOCK_CLASS_SQL "1885823092" /* "pgdu" */

typedef struct pd_state pd_state_t;

/* Opens the state at path (NULL: memory only), loading the file when it exists. Returns
 * NULL with *err (malloc'd) when the file exists but cannot be read or is not ours. */
pd_state_t *pd_state_open(const char *path, char **err);
void pd_state_free(pd_state_t *st);

/* Opens the state kept in PostgreSQL at conninfo: connects, creates or migrates schema
 * pgdual, loads the document. NULL with *err (malloc'd) when any of it fails. */
pd_state_t *pd_state_open_postgres(const char *conninfo, char **err);
bool pd_state_shared(const pd_state_t *st); /* kept in PostgreSQL */
int pd_state_schema_version(void);          /* the control schema version this pgdual makes */
/* The version of the document in memory (PostgreSQL; 0 otherwise). */
int64_t pd_state_version(pd_state_t *st);
/* Re-reads the stored document when its version is newer: 1 when it was, 0 when not (and
 * always for a file), -1 with *err when the store could not be read. */
int pd_state_refresh(pd_state_t *st, char **err);
/* A libpq connection for the control schema, with the state's timeouts (5 s). */
PGconn *pd_state_connect(const char *conninfo, const char *application_name, char **err);

/*
 * One change of the document: fn edits it (0, or -1: out of memory). With PostgreSQL, in
 * one transaction: guard (a query with parameter $1 = guard_arg), when given, runs first
 * and must return a row, else nothing changes and 1 is returned. 0 when stored, -1 with
 * *err (malloc'd). Edits used by several changes at once: */
typedef int (*pd_state_edit_fn)(json_t *doc, void *arg);
int pd_state_edit(pd_state_t *st, const char *guard, const char *guard_arg, pd_state_edit_fn fn,
                  void *arg, char **err);
int pd_state_doc_set_flags(json_t *doc, const char *rule, pd_writes_t writes,
                           const pd_reads_t *reads, const char *who);
int pd_state_doc_event(json_t *doc, const char *event, const char *who, json_t *fields);

/* The flags recorded for a rule: true and the values when the state has them. */
bool pd_state_flags(pd_state_t *st, const char *rule, pd_writes_t *writes, pd_reads_t *reads);

/* Records new flags for a rule, with who changed them, appends to the history and
 * persists. Returns 0, or -1 with *err (malloc'd) when the file could not be written (the
 * in-memory change is then undone, so memory and disk agree). */
int pd_state_set_flags(pd_state_t *st, const char *rule, pd_writes_t writes,
                       const pd_reads_t *reads, const char *who, char **err);

/* Forgets flags of rules not in keep (after a reload removed rules); a shared state
 * keeps them (other instances may run them). */
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
